"""Progress of a phase: blocks done, windows done inside the current block, elapsed time and an ETA.

In a terminal (stderr is a TTY) a live rich progress bar per phase; elsewhere (CI, a log file) one log
line per block. The ETA counts only blocks computed in this process: blocks replayed from finished
shards on a resume are fast and would make it optimistic.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger("lowmem_gblm.engine")

CONSOLE = Console(stderr=True)  # the CLI's log handler prints through it too, above a live bar


def live_terminal() -> bool:
    return sys.stderr.isatty() and CONSOLE.is_terminal


class PhaseProgress:
    """``with PhaseProgress("prune", blocks, windows) as p: ... p.windows(k) ... p.block("pruned")``."""

    def __init__(self, what: str, blocks: int, windows: int, enabled: bool = True):
        self.what, self.total, self.nwindows, self.enabled = what, blocks, windows, enabled
        self.done = self.worked = 0
        self.t0 = time.perf_counter()
        self.work_seconds = 0.0  # time spent on blocks computed here (not replayed)
        self._block_t0 = self.t0
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> PhaseProgress:
        if self.enabled and live_terminal():
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("blocks  {task.fields[inner]}"), TimeElapsedColumn(),
                                 TextColumn("ETA {task.fields[eta]}"), console=CONSOLE, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total, inner=self._inner(0), eta="-")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _inner(self, k: int) -> str:
        return f"windows {k}/{self.nwindows}"

    def eta(self) -> float | None:
        """Seconds left at the rate of the blocks computed so far (None before the first one)."""
        if not self.worked:
            return None
        return self.work_seconds / self.worked * (self.total - self.done)

    def windows(self, done: int) -> None:
        """``done`` windows of the current block are through."""
        if self._bar is not None:
            self._bar.update(self._task, inner=self._inner(done))

    def block(self, label: str, replayed: bool = False) -> None:
        """The current block is finished (``replayed``: from its shard, not computed here)."""
        now = time.perf_counter()
        self.done += 1
        if not replayed:
            self.worked += 1
            self.work_seconds += now - self._block_t0
        self._block_t0 = now
        if not self.enabled:
            return
        eta = self.eta()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, inner=self._inner(self.nwindows),
                             eta="-" if eta is None else f"{eta:.0f}s")
            return
        rate = self.work_seconds / self.worked if self.worked else 0.0
        log.info("%s %d/%d %s (%.2f s/block, ETA %s)", self.what, self.done, self.total, label, rate,
                 "-" if eta is None else f"{eta:.0f} s")
