"""The only orchestration: open a run, the gradient sweep, the prune sweep, finalize; eval.

Entry points: ``prune(PruneConfig)``, ``compute_gradients(GradientConfig)``, ``evaluate_checkpoint(EvalConfig)``.
"""

from lowmem_gblm.engine.evaluate import evaluate_checkpoint, streamed_perplexity
from lowmem_gblm.engine.gradients import compute_gradients
from lowmem_gblm.engine.prune import prune

__all__ = ["compute_gradients", "evaluate_checkpoint", "prune", "streamed_perplexity"]
