"""``lowmem-gblm report``: a finished run's diagnostics as a text table and (optionally) PNG figures.

``summary`` reads ``prune_report.json`` and the output shards and computes the numbers (pure functions:
per-block rows, per-linear-kind aggregates, downsampled keep masks, the model check of ``--compare``);
``figures`` draws them with matplotlib, an optional extra (``pip install 'lowmem-gblm[report]'``): the
text summary works without it.
"""

from __future__ import annotations

from lowmem_gblm.errors import UsageError

INSTALL_HINT = "pip install 'lowmem-gblm[report]'"


def require_matplotlib() -> None:
    """Refuse with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--png needs matplotlib, which is not installed ({exc}); install it with: "
                         f"{INSTALL_HINT} (the text summary works without it: drop --png)") from exc
