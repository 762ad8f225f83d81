"""Test-only crash points for kill-and-resume tests.

``LOWMEM_TEST_CRASH_AFTER=TAG`` makes the process exit at once with code 137 (as if SIGKILLed: no
cleanup, no finally blocks) when it reaches ``crash_point(TAG)``. Tags in use:

- ``gradients:block:K`` -- right after block K's gradient file, the incoming gradient of block K-1
  and the ``gradients.json`` entry for block K are durable.

Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os

ENV = "LOWMEM_TEST_CRASH_AFTER"


def crash_point(tag: str) -> None:
    if os.environ.get(ENV) == tag:
        os._exit(137)
