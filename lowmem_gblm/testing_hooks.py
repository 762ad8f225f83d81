"""Fault-injection points for crash tests. No-ops unless LOWMEM_TEST_CRASH_AT names the point.

``LOWMEM_TEST_CRASH_AT="block_done:1"`` kills the process with SIGKILL the moment ``crash_point("block_done:1")``
runs, exactly like a power loss at that point (no cleanup, no atexit).
"""

from __future__ import annotations

import os
import signal

ENV = "LOWMEM_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    target = os.environ.get(ENV)
    if target and target == name:
        os.kill(os.getpid(), signal.SIGKILL)
