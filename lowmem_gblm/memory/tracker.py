"""Measured peaks per phase: compute-device peak (CUDA counters), sampled process RSS (and its anonymous,
file-backed and shared-memory parts), I/O bytes, seconds."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from dataclasses import asdict, dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


RSS_PARTS = ("RssAnon", "RssFile", "RssShmem")  # /proc/self/status lines (kB); Linux 4.5+


def rss_parts() -> dict[str, int]:
    """Bytes of RSS by kind: RssAnon (heap, tensors), RssFile (mapped file pages: libraries, memory-mapped
    checkpoints or stores), RssShmem. The total alone cannot tell a store's mapped pages, which the kernel
    may reclaim, from live tensors, which it cannot. Zeros where /proc/self/status lacks the lines."""
    out = dict.fromkeys(RSS_PARTS, 0)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


MMAP_THRESHOLD_ENV = "LOWMEM_MMAP_THRESHOLD"
MMAP_THRESHOLD = 1 << 20  # bytes; see limit_heap_retention
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_configured = False


def release_freed_heap() -> None:
    """Hand memory freed by the previous phase back to the OS (glibc ``malloc_trim``).

    glibc keeps freed heap pages resident; without this a phase's peak RSS would carry the high-water
    mark of the phase before it (the gradient sweep's boundaries into the prune sweep). A no-op where
    the C library has no ``malloc_trim``.
    """
    limit_heap_retention()
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def limit_heap_retention() -> None:
    """Once per process: allocations of MMAP_THRESHOLD bytes or more get their own mappings (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), so freeing one returns it to the OS at once.

    glibc's default raises that threshold as large blocks are freed (up to 32 MiB), after which the
    per-block tensors of a small model come from the heap and freed ones stay resident: on SmolLM2 the
    prune sweep's RSS sat ~40 MiB (10%) above its live bytes. A fixed threshold keeps RSS at what is
    alive, which is what the planner predicts, at the price of page faults on each new tensor (the
    prune sweep of a small model runs up to ~25% slower; tensors of a large model are mapped either
    way). ``LOWMEM_MMAP_THRESHOLD=BYTES`` changes it, ``=0`` leaves glibc's default.
    """
    global _configured
    if _configured:
        return
    _configured = True
    try:
        threshold = int(os.environ.get(MMAP_THRESHOLD_ENV, MMAP_THRESHOLD))
    except ValueError:
        threshold = MMAP_THRESHOLD
    libc = _libc()
    if threshold > 0 and libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def io_counters() -> tuple[int, int]:
    """(bytes read, bytes written) by this process through read/write calls (rchar/wchar)."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return 0, 0


@dataclass
class PhaseStats:
    phase: str
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    # each part's own peak (they need not peak together, so they need not add up to peak_rss_bytes)
    peak_rss_anon_bytes: int = 0
    peak_rss_file_bytes: int = 0
    peak_rss_shmem_bytes: int = 0
    device_peak_allocated_bytes: int = 0
    device_peak_reserved_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class PhaseTracker:
    """with PhaseTracker("prune", device) as t: ...; t.stats. Samples RSS every ``interval`` seconds."""

    def __init__(self, phase: str, device: torch.device, interval: float = 0.02):
        self.stats = PhaseStats(phase)
        self.device = device
        self.interval = interval
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._observe()
            self._stop.wait(self.interval)

    def _observe(self) -> None:
        """Raise each peak to the current value (total RSS from statm, its parts from status)."""
        s = self.stats
        s.peak_rss_bytes = max(s.peak_rss_bytes, current_rss())
        parts = rss_parts()
        s.peak_rss_anon_bytes = max(s.peak_rss_anon_bytes, parts["RssAnon"])
        s.peak_rss_file_bytes = max(s.peak_rss_file_bytes, parts["RssFile"])
        s.peak_rss_shmem_bytes = max(s.peak_rss_shmem_bytes, parts["RssShmem"])

    def __enter__(self) -> PhaseTracker:
        release_freed_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._io0 = io_counters()
        self._t0 = time.perf_counter()
        s = self.stats
        s.peak_rss_bytes = s.peak_rss_anon_bytes = s.peak_rss_file_bytes = s.peak_rss_shmem_bytes = 0
        self._observe()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._observe()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.stats.device_peak_allocated_bytes = torch.cuda.max_memory_allocated(self.device)
            self.stats.device_peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        io1 = io_counters()
        self.stats.bytes_read = io1[0] - self._io0[0]
        self.stats.bytes_written = io1[1] - self._io0[1]
        self.stats.seconds = time.perf_counter() - self._t0

