"""This machine's budgets and the engine's plan check: predict the run's peaks against the memory this
machine has now, choose ``--offload auto``, and refuse before any heavy work when the run cannot fit.

Budgets: device = free CUDA memory (torch.cuda.mem_get_info) plus what this process already holds;
host = this process's RSS plus MemAvailable (/proc/meminfo), or ``--cpu-memory``; disk = free space
of the filesystem holding the output folder. The baseline of the prediction is this process's RSS
now (calibration data, tokenizer and libraries already loaded), not a separate measurement.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from lowmem_gblm.errors import InputError
from lowmem_gblm.memory.plan import Budgets, Plan, PlanSettings, advice, plan
from lowmem_gblm.memory.shape import ModelShape
from lowmem_gblm.memory.tracker import current_rss
from lowmem_gblm.units import fmt_budget, fmt_size, parse_size

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


def machine_budgets(device: torch.device, out: Path, cpu_memory: str | None, gpu_memory: str | None,
                    share: int = 1) -> Budgets:
    """What this run may use here: the options when given, else what the machine has free now; ``share``
    processes of one run on this machine split its available RAM (``--cpu-memory`` is per process)."""
    gpu = parse_size(gpu_memory)
    if gpu is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu = free + torch.cuda.memory_allocated(device)
    cpu = parse_size(cpu_memory)
    if cpu is None:
        avail = mem_available()
        cpu = None if avail is None else current_rss() + avail // max(share, 1)
    return Budgets(gpu if device.type == "cuda" else None, cpu, _disk_free(Path(out)), Path(out))


def plan_run(shape: ModelShape, settings: PlanSettings, budgets: Budgets, *, check: bool) -> Plan:
    """The plan for this run; the store it chose is ``plan.settings.offload`` (offload "auto": the RAM
    store when its peak is under RAM_MARGIN of the host budget, else the disk store). Raises InputError
    naming the knob when the run cannot fit and ``check`` is on; with ``check`` off it only warns."""
    base = current_rss()
    cache: dict = {}

    def make(off: str, cpu: int | None) -> Plan:
        return plan(shape, replace(settings, offload=off), replace(budgets, cpu_memory=cpu), baseline=base,
                    probe_cache=cache)

    auto = settings.offload in (None, "auto")
    candidates = ["cpu", "disk"] if auto else [settings.offload]
    cpu = budgets.cpu_memory
    chosen = None
    if auto and cpu is not None:  # RAM only with a margin
        chosen = next((p for p in (make(o, int(cpu * RAM_MARGIN)) for o in candidates) if p.fits), None)
    if chosen is None:
        tried = [make(o, cpu) for o in candidates]
        chosen = next((p for p in tried if p.fits), tried[-1])
    off = chosen.settings.offload
    for p in chosen.phases:
        log.info("plan: %s: device %s, host %s, disk %s (store %s; budgets: device %s, host %s, disk %s)", p.name,
                 fmt_size(p.device_peak_bytes), fmt_size(p.host_peak_bytes), fmt_size(p.disk_bytes), off,
                 fmt_budget(budgets.gpu_memory), fmt_budget(budgets.cpu_memory), fmt_budget(budgets.disk_free))
    if not chosen.fits:
        disk_store = make("disk", cpu) if "cpu_memory" in chosen.shortfalls and off == "cpu" else None
        msg = refusal(chosen, disk_store)
        if check:
            raise InputError(msg)
        log.warning("%s (continuing: --no-plan-check)", msg)
    return chosen


def refusal(p: Plan, disk_store: Plan | None = None) -> str:
    """Why the run cannot fit this machine, and the knobs that would help (``advice``, engine wording)."""
    return ("the run does not fit this machine: " + "; ".join(advice(p, run=True, disk_store=disk_store))
            + " (or --no-plan-check to run anyway)")
