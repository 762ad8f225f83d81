"""Zero-shot accuracy through lm-evaluation-harness on the streamed model (``lowmem-gblm eval --tasks``).

``lm.StreamedLM`` is an lm-eval ``LM`` whose log-likelihoods come from engine.loglik (one decoder block on
the device at a time); ``run.evaluate_tasks`` runs lm-eval's tasks on it; ``wiki_task`` writes a small
offline multiple-choice task from the Wikipedia evaluation split. lm-eval is an optional extra
(``pip install 'lowmem-gblm[zeroshot]'``); only ``wiki_task`` works without it.
"""

from __future__ import annotations

from lowmem_gblm.errors import require_extra

INSTALL_HINT = "pip install 'lowmem-gblm[zeroshot]'"


def require_lm_eval() -> None:
    """Refuse with the install command when lm-evaluation-harness is missing."""
    require_extra("lm_eval", "--tasks needs lm-evaluation-harness", "zeroshot")
