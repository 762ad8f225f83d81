from lowmem_gblm.mask.pattern import Pattern, flip_fraction, select_keep

__all__ = ["Pattern", "flip_fraction", "select_keep"]
