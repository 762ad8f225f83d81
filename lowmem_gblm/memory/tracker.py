"""Measured peaks per phase: compute-device peak (CUDA counters), sampled process RSS, I/O bytes, seconds."""

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


def release_freed_heap() -> None:
    """Hand memory freed by the previous phase back to the OS (glibc ``malloc_trim``).

    glibc keeps freed heap pages resident; without this a phase's peak RSS would carry the high-water
    mark of the phase before it (the gradient sweep's boundaries into the prune sweep). A no-op where
    the C library has no ``malloc_trim``.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
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
            self.stats.peak_rss_bytes = max(self.stats.peak_rss_bytes, current_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PhaseTracker:
        release_freed_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._io0 = io_counters()
        self._t0 = time.perf_counter()
        self.stats.peak_rss_bytes = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.stats.peak_rss_bytes = max(self.stats.peak_rss_bytes, current_rss())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.stats.device_peak_allocated_bytes = torch.cuda.max_memory_allocated(self.device)
            self.stats.device_peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        io1 = io_counters()
        self.stats.bytes_read = io1[0] - self._io0[0]
        self.stats.bytes_written = io1[1] - self._io0[1]
        self.stats.seconds = time.perf_counter() - self._t0


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
