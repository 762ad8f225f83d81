from lowmem_gblm.evaluate.perplexity import checkpoint_sparsity, eval_windows, streamed_perplexity

__all__ = ["checkpoint_sparsity", "eval_windows", "streamed_perplexity"]
