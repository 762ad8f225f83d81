from lowmem_gblm.mask.pattern import Pattern, select_keep

__all__ = ["Pattern", "select_keep"]
