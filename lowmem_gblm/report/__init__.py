"""``lowmem-gblm report``: a finished run's diagnostics as a text table and (optionally) PNG figures.

``summary`` reads ``prune_report.json`` and the output shards and computes the numbers (pure functions:
per-block rows, per-linear-kind aggregates, downsampled keep masks, the model check of ``--compare``);
``figures`` draws them with matplotlib, an optional extra (``pip install 'lowmem-gblm[report]'``): the
text summary works without it.
"""

from __future__ import annotations

from lowmem_gblm.errors import require_extra

INSTALL_HINT = "pip install 'lowmem-gblm[report]'"


def require_matplotlib() -> None:
    """Refuse with the install command when matplotlib is missing."""
    require_extra("matplotlib", "--png needs matplotlib", "report",
                  " (the text summary works without it: drop --png)")
