"""lowmem-gblm: block-streamed GBLM-Pruner, Wanda, SparseGPT and magnitude pruning."""

__version__ = "0.1.0"
