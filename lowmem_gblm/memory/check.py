"""The engine's plan check: predict the run's peaks with the planner against the memory this machine
has now, choose ``--offload auto``, and refuse before any heavy work when the run cannot fit.

Budgets: device = free CUDA memory (torch.cuda.mem_get_info) plus what this process already holds;
host = this process's RSS plus MemAvailable (/proc/meminfo), or ``--cpu-memory``; disk = free space
of the filesystem holding the output folder. The baseline of the prediction is this process's RSS
now (calibration data, tokenizer and libraries already loaded), not a separate measurement.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from lowmem_gblm.errors import InputError
from lowmem_gblm.memory.planner import Plan, fmt_size, grad_dtype_knob, load_shape, parse_size, plan
from lowmem_gblm.memory.tracker import current_rss

log = logging.getLogger(__name__)

RAM_MARGIN = 0.8  # --offload auto keeps the store in RAM only when the predicted peak is under this share


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _disk_free(path: Path) -> int:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def budgets(device: torch.device, out: Path, cpu_memory: str | None, gpu_memory: str | None) -> dict:
    gpu = parse_size(gpu_memory)
    if gpu is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu = free + torch.cuda.memory_allocated(device)
    cpu = parse_size(cpu_memory)
    if cpu is None:
        avail = mem_available()
        cpu = None if avail is None else current_rss() + avail
    return {"gpu_memory": gpu if device.type == "cuda" else None, "cpu_memory": cpu, "disk_free": _disk_free(out)}


def plan_run(model_dir: Path, method: str, ids_shape: tuple[int, int], device: torch.device, dtype: torch.dtype,
             offload: str, out: Path, phases: tuple[str, ...], *, batch_size: int = 1, cpu_memory: str | None = None,
             gpu_memory: str | None = None, check: bool = True, store_dtype: str = "auto",
             grad_dtype: str = "float32", prefetch: bool = True) -> tuple[str, Plan]:
    """(the store to use: cpu | disk, the plan made for it). Raises InputError naming the knob when the
    run cannot fit and ``check`` is on; with ``check`` off it only logs and resolves auto."""
    n, t = ids_shape
    shape = load_shape(model_dir)
    limit = budgets(device, out, cpu_memory, gpu_memory)
    base = current_rss()
    cache: dict = {}

    def make(off: str, cpu: int | None) -> Plan:
        return plan(shape, method, n, t, gpu_memory=limit["gpu_memory"], cpu_memory=cpu, disk_dir=out,
                    disk_space=limit["disk_free"], compute_dtype=dtype, store_dtype=store_dtype, offload=off,
                    head_chunk=None, grad_dtype=grad_dtype, baseline=base, device=device.type,
                    batch_size=batch_size, phases=phases, probe_cache=cache, prefetch=prefetch)

    candidates = ["cpu", "disk"] if offload == "auto" else [offload]
    cpu = limit["cpu_memory"]
    chosen = None
    if offload == "auto" and cpu is not None:  # RAM only with a margin
        chosen = next((p for p in (make(o, int(cpu * RAM_MARGIN)) for o in candidates) if p.fits), None)
    if chosen is None:
        tried = [make(o, cpu) for o in candidates]
        chosen = next((p for p in tried if p.fits), tried[-1])
    off = chosen.settings["offload"]
    for p in chosen.phases:
        log.info("plan: %s: device %s, host %s, disk %s (store %s; budgets: device %s, host %s, disk %s)", p.name,
                 fmt_size(p.device_peak_bytes), fmt_size(p.host_peak_bytes), fmt_size(p.disk_bytes), off,
                 _opt(limit["gpu_memory"]), _opt(limit["cpu_memory"]), _opt(limit["disk_free"]))
    if not chosen.fits:
        msg = refusal(chosen, make, offload, n, t, batch_size, device)
        if check:
            raise InputError(msg)
        log.warning("%s (continuing: --no-plan-check)", msg)
    return off, chosen


def refusal(p: Plan, make, offload: str, n: int, t: int, batch_size: int, device: torch.device) -> str:
    """Why the run cannot fit, and the knob that would help."""
    g = p.budgets
    parts, knobs = [], []
    worst = max(p.phases, key=lambda q: q.host_peak_bytes)
    if g["cpu_memory"] is not None and worst.host_peak_bytes > g["cpu_memory"]:
        name, val = worst.dominant("host")
        parts.append(f"host RAM: {worst.name} needs {fmt_size(worst.host_peak_bytes)} ({name} {fmt_size(val)}), "
                     f"{fmt_size(g['cpu_memory'])} available")
        if p.settings["offload"] == "cpu":
            alt = make("disk", g["cpu_memory"])
            if alt.host_peak_bytes < p.host_peak_bytes:
                knobs.append(f"--offload disk (boundaries in files under OUT_DIR; host peak "
                             f"{fmt_size(alt.host_peak_bytes)})")
        knobs.append(f"a smaller --nsamples (now {n}) or --seqlen (now {t})")
    worst = max(p.phases, key=lambda q: q.device_peak_bytes)
    if g["gpu_memory"] and worst.device_peak_bytes > g["gpu_memory"]:
        name, val = worst.dominant("device")
        parts.append(f"device memory: {worst.name} needs {fmt_size(worst.device_peak_bytes)} ({name} "
                     f"{fmt_size(val)}), {fmt_size(g['gpu_memory'])} free on {device}")
        knobs.append(f"a smaller --seqlen (now {t})" + (f" or --batch-size (now {batch_size})" if batch_size > 1
                                                         else "") + " or --device cpu")
    worst = max(p.phases, key=lambda q: q.disk_bytes)
    if g["disk_free"] is not None and worst.disk_bytes > g["disk_free"]:
        name, val = worst.dominant("disk")
        parts.append(f"disk: {worst.name} needs {fmt_size(worst.disk_bytes)} ({name} {fmt_size(val)}), "
                     f"{fmt_size(g['disk_free'])} free where OUT_DIR is")
        knobs.append("an OUT_DIR on a larger disk (or free space there)")
        knob = grad_dtype_knob(p.phases, p.settings["grad_dtype"])
        if knob:
            knobs.append(knob)
        if p.settings["offload"] == "disk":
            knobs.append(f"a smaller --nsamples (now {n}) or --seqlen (now {t})")
    return ("the run does not fit this machine: " + "; ".join(parts) + ". Try " + ", or ".join(dict.fromkeys(knobs))
            + " (or --no-plan-check to run anyway)")


def predicted_block(p: Plan) -> dict:
    """For prune_report.json: next to the measured phases."""
    return {"settings": p.settings, "budgets": p.budgets, "fits": p.fits,
            "phases": [{"phase": q.name, "device_peak_bytes": q.device_peak_bytes,
                        "host_peak_bytes": q.host_peak_bytes, "disk_bytes": q.disk_bytes} for q in p.phases]}


def _opt(n: int | None) -> str:
    return "unlimited" if n is None else fmt_size(n)
