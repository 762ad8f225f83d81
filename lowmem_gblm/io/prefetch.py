"""Overlap block reads with compute: the next block's tensors are read on one background thread.

``BlockReader`` walks a fixed schedule of (block index, source) pairs. When block k is taken, the
read of block k+1 starts on the reader thread while block k computes. The prefetched tensors stay
in host memory (pinned when the device is CUDA) and move to the device only when their block is
taken, so the device never holds more than the current block; the host holds at most one read
block beyond the current one. Reads and dtype conversions are the same either way, so outputs are
byte-identical with and without prefetch.

An exception on the reader thread is re-raised in the main thread, unchanged, when its block is
taken (a damaged shard still names its file and tensor, and blocks before it finish first).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from lowmem_gblm.io.checkpoint import ShardFile

log = logging.getLogger(__name__)


class BlockReader:
    """Blocks in schedule order; with ``prefetch`` the next one is read while the current one computes.

    A schedule entry's source is None (the model's checkpoint), a checkpoint-like object with
    ``read(names)``, the path of a finished shard, or (path, sha256) of a finished shard whose bytes are
    checked as they are read (opened when that block is read).
    """

    def __init__(self, model, schedule: Sequence[tuple[int, object | None]], device: torch.device,
                 dtype: torch.dtype, prefetch: bool = True):
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.schedule = list(schedule)
        self._pos = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowmem-prefetch") if prefetch else None
        self._pending: tuple[int, Future] | None = None
        self._submit(0)

    def _read(self, k: int) -> dict[str, torch.Tensor]:
        i, source = self.schedule[k]
        if isinstance(source, (str, os.PathLike)):
            source = ShardFile(source)
        elif isinstance(source, tuple):
            source = ShardFile(*source)
        return self.model.read_block(i, self.device, self.dtype, source)

    def _submit(self, k: int) -> None:
        if self._pool is not None and k < len(self.schedule):
            self._pending = (k, self._pool.submit(self._read, k))

    def next(self, i: int) -> nn.Module:
        """The next block of the schedule, which must be block ``i``, on the device."""
        k = self._pos
        if k >= len(self.schedule) or self.schedule[k][0] != i:
            raise RuntimeError(f"block reader: asked for block {i}, schedule has {self.schedule[k:k + 1]}")
        self._pos += 1
        if self._pending is not None and self._pending[0] == k:
            future, self._pending = self._pending[1], None
            host = future.result()  # re-raises the reader thread's exception here
        else:
            host = self._read(k)
        self._submit(k + 1)  # read the next block while this one computes
        return self.model.assemble_block(i, host, self.device, self.dtype)

    def close(self) -> None:
        """Drop a pending read (its exception, if any, is not ours to raise) and stop the thread."""
        if self._pending is not None:
            future, self._pending = self._pending[1], None
            future.cancel()
            with contextlib.suppress(BaseException):  # an unneeded read; the caller's error matters
                future.result()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
