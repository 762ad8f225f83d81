"""Fault-injection points for the crash and disk-full tests. No-ops unless an env var is set.

``LOWMEM_TEST_CRASH_AT="point:K[,point:K...]"``  SIGKILL this process the K-th time ``point`` is reached.
``LOWMEM_TEST_ENOSPC_AT="point:K[,...]"``        raise OSError(ENOSPC) the K-th time ``point`` is reached.
``LOWMEM_TEST_HANG_AT="point:K[,...]"``          sleep forever (a hung rank) the K-th time ``point`` is reached.
``LOWMEM_TEST_RANK=R``                           only the process of rank R (under a launcher) does any of it.

Points used by the library (a gradient sweep adds its own names the same way):
  ``shard_write``     inside an atomic shard write, after half the bytes are in the temporary file
  ``manifest_write``  inside an atomic manifest write, after half the bytes
  ``write``           inside any other atomic write (config copies, report, index, calibration ids)
  ``manifest``        after a block's shard is renamed into place, before the manifest lists it
  ``block_done``      after a block's manifest entry is durable (and the run's own gradient file
                      for that block is dropped)
  ``finalize``        after prune_report.json is written, before the index
  ``gradient_block``  after a block's gradient file, the persisted incoming gradient and its
                      gradients.json entry are durable (blocks go last to first)
  ``fold``            every rank, before it folds a step's chunk sums (stream.reduce)
The pseudo-point ``any`` counts every point.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

CRASH_ENV = "LOWMEM_TEST_CRASH_AT"
ENOSPC_ENV = "LOWMEM_TEST_ENOSPC_AT"
HANG_ENV = "LOWMEM_TEST_HANG_AT"
RANK_ENV = "LOWMEM_TEST_RANK"
_ENVS = (CRASH_ENV, ENOSPC_ENV, HANG_ENV)

_counts: Counter[str] = Counter()


def _targets(env: str) -> dict[str, int]:
    spec = os.environ.get(env, "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, k = item.rpartition(":")
        out[name] = int(k)
    return out


def reset() -> None:
    """Forget how often each point was reached (in-process tests)."""
    _counts.clear()


def crash_point(name: str) -> None:
    """Count ``name``; kill the process, hang it or raise ENOSPC if a test asked for it here."""
    if not any(env in os.environ for env in _ENVS):
        return
    if RANK_ENV in os.environ and os.environ[RANK_ENV] != os.environ.get("RANK", "0"):
        return
    _counts[name] += 1
    _counts["any"] += 1
    for env in _ENVS:
        for target, k in _targets(env).items():
            if _counts[target] == k and target in (name, "any"):
                if env == CRASH_ENV:
                    os.kill(os.getpid(), signal.SIGKILL)
                if env == HANG_ENV:
                    while True:
                        time.sleep(3600)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
