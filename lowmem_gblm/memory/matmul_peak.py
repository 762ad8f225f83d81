"""The machine's own matmul peak (FLOP/s per device and dtype), measured once with a short benchmark and cached
under ``CACHE_DIR``, so a report can say what fraction of it each phase achieved (``memory.work.achieved``)."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch

from lowmem_gblm.memory.probe import _CACHE
from lowmem_gblm.memory.work import Work, achieved
from lowmem_gblm.runtime import dtype_name

log = logging.getLogger(__name__)

CACHE_DIR = _CACHE  # ~/.cache/lowmem_gblm (XDG_CACHE_HOME honoured), where baseline_rss caches too
PEAK_FILE = "matmul_peak.json"
PEAK_SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (1024, 2048, 4096, 8192)}  # square n, tried upward
PEAK_BUDGET_S = 1.0  # wall seconds the benchmark aims at (it stops growing n before; a loaded machine may overrun)
PEAK_REPEATS = 3  # timed spans per size; the best counts
PEAK_MIN_SPAN_S = 0.02  # a timed span holds enough calls to be measurable (a fast GPU does one in ~1 ms)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{device.type}:{model}"


def peak_key(device: torch.device | str, dtype: torch.dtype) -> str:
    """What a cached peak is valid for: torch version, the device's name, the dtype, the thread count."""
    device = torch.device(device)
    return f"{torch.__version__}|{_device_label(device)}|{dtype_name(dtype)}|threads={torch.get_num_threads()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _span(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, calls: int, device: torch.device) -> float:
    """Seconds for ``calls`` products a @ b into c, the device drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b, out=c)
    _sync(device)
    return time.perf_counter() - t0


def benchmark_matmul(device: torch.device, dtype: torch.dtype, budget_s: float | None = None) -> dict:
    """Square matmuls of growing n on ``device`` in ``dtype``; the best FLOP/s of a few timed spans.

    Before each size its cost (an untimed warm-up call, then at least one timed span) is predicted from the
    best rate so far; n stops growing when that would overrun ``budget_s`` (None: PEAK_BUDGET_S), so a slow
    dtype (bf16 on a CPU without bf16 instructions: ~1 GFLOP/s) stops at a small n instead of running for
    minutes. Returns {"flops_per_s", "n", "seconds"}.
    """
    budget_s = PEAK_BUDGET_S if budget_s is None else budget_s
    sizes = PEAK_SIZES.get(device.type, PEAK_SIZES["cpu"])
    t0 = time.perf_counter()
    best, best_n, measured = 0.0, 0, 0
    with torch.inference_mode():
        tiny = torch.ones(64, 64, device=device, dtype=dtype)
        _span(tiny, tiny, torch.empty_like(tiny), 1, device)  # thread pool / cuBLAS handle up
        for n in sizes:
            if best:
                guess = 2 * n**3 / best  # seconds of one call at the best rate so far (rates grow with n)
                if time.perf_counter() - t0 + guess * (1 + math.ceil(PEAK_MIN_SPAN_S / guess)) > budget_s:
                    break
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)
            one = max(_span(a, b, c, 1, device), 1e-9)  # warm-up at this size; sizes the spans
            calls = max(1, math.ceil(PEAK_MIN_SPAN_S / one))
            for k in range(PEAK_REPEATS):
                if k and time.perf_counter() - t0 + calls * one > budget_s:
                    break
                rate = calls * 2 * n**3 / _span(a, b, c, calls, device)
                if rate > best:
                    best, best_n = rate, n
            measured += 1
            del a, b, c
    if device.type == "cuda":  # hand the operands' cached blocks back: a phase's reserved peak must not see them
        torch.cuda.empty_cache()
    return {"flops_per_s": best, "n": best_n, "seconds": time.perf_counter() - t0, "sizes": measured}


def _read_peaks(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def measured_peak(device: torch.device | str, dtype: torch.dtype, refresh: bool = False,
                  at_least: float | None = None) -> float:
    """The machine's own matmul FLOP/s on ``device`` in ``dtype`` (a short square-matmul benchmark, at most
    PEAK_BUDGET_S), cached in CACHE_DIR / PEAK_FILE under ``peak_key``; ``refresh`` measures again, and so does a
    cached peak below ``at_least`` (a rate a phase just reached: that peak was measured on a loaded machine).

    Measured, not a datasheet number, because what a phase can reach is what this machine's BLAS reaches
    with this thread count (and on a shared machine, with its neighbours: refresh on a quiet one). A benchmark
    that a loaded machine stopped after its smallest size is used but not cached."""
    device = torch.device(device)
    key = peak_key(device, dtype)
    path = CACHE_DIR / PEAK_FILE
    if not refresh:
        entry = _read_peaks(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("flops_per_s"), (int, float)) \
                and math.isfinite(entry["flops_per_s"]) and entry["flops_per_s"] > 0:
            if at_least is None or entry["flops_per_s"] >= at_least:
                return float(entry["flops_per_s"])
            log.info("the cached matmul peak in %s (%.1f GFLOP/s) is below what a phase reached (%.1f): measuring "
                     "again", dtype_name(dtype), entry["flops_per_s"] / 1e9, at_least / 1e9)
    result = benchmark_matmul(device, dtype)
    log.info("matmul peak on %s in %s: %.1f GFLOP/s (n=%d, benchmark %.2f s)", key.split("|")[1],
             dtype_name(dtype), result["flops_per_s"] / 1e9, result["n"], result["seconds"])
    if result.get("sizes", 2) < 2:  # stopped by the budget at the first size: a loaded machine's number
        return float(result["flops_per_s"])
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        peaks = _read_peaks(path)
        peaks[key] = result
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(peaks, indent=1, sort_keys=True))
        os.replace(tmp, path)  # a concurrent writer may drop an entry: it is measured again next time
    except OSError:
        pass
    return float(result["flops_per_s"])


def achieved_here(work: Work, seconds: float, device: torch.device | str, dtype: torch.dtype) -> dict:
    """``memory.work.achieved`` against this machine's measured peak, measured again when the phase beat it."""
    rate = work.total_flops / seconds if seconds > 0 else None
    return achieved(work, seconds, measured_peak(device, dtype, at_least=rate))
