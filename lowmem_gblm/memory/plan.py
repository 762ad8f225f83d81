"""The plan: predicted device / host / disk peaks per phase, and the settings that fit the budgets.

Device terms are the probe's (``memory.probe``: the engine's own steps on fake tensors). The stores
(calibration boundaries, the incoming-gradient buffer, accumulators, output shards) are added
analytically, as is the host side: a measured python + torch + transformers baseline RSS, stores kept
in RAM, the block read from disk in its storage dtype, and everything the device holds when the device
is the CPU.

Phases (the names in the report): ``gradient_sweep`` (GBLM only), ``prune_sweep``, ``eval``.
``settings`` holds what a plan is asked (settings, budgets), ``predict`` one choice's per-phase peaks; this
module tries the choices, keeps the one that fits and writes the advice.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace

from lowmem_gblm.errors import UsageError
from lowmem_gblm.memory.predict import PhasePlan, predict
from lowmem_gblm.memory.probe import baseline_rss
from lowmem_gblm.memory.settings import HEAD_CHUNKS, Budgets, PlanSettings
from lowmem_gblm.memory.shape import ModelShape
from lowmem_gblm.runtime import dtype_name
from lowmem_gblm.stream.segments import boundaries_held, recomputed_blocks
from lowmem_gblm.units import fmt_budget, fmt_size

# settings types: settings.py
__all__ = ["HOST_PEAK_BOUND", "Budgets", "Chosen", "Plan", "PlanSettings", "advice", "plan"]

# What the plan promises: its host peak is within this share of the peak RSS a run measures, for every method,
# update and activation store (benchmarks/planner_conformance.py and tests/test_planner.py hold it to that).
HOST_PEAK_BOUND = 0.15


@dataclass(frozen=True)
class Chosen:
    """The settings a plan chose (``--offload``, ``--head-chunk``, ``--checkpoint-every`` auto resolved) and what it
    was made for; ``as_dict`` is the report's ``predicted.settings``."""

    device: str
    compute_dtype: str
    store_dtype: str
    storage_dtype: str
    offload: str  # cpu | disk
    head_chunk: int | None  # tokens per head call (None: the whole window)
    forward_microbatch: int  # windows per block call
    grad_dtype: str
    checkpoint_every: int
    chunk_windows: int
    solver: str | None = None  # the solved updates only
    nproc: int | None = None  # data-parallel runs only: ranks, this rank, its windows
    rank: int | None = None
    windows_on_rank: int | None = None
    disk_dir: str | None = None  # the disk store's folder (offload disk)

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("solver", "nproc", "rank", "windows_on_rank"):
            if out[key] is None:
                del out[key]
        if self.offload != "disk":
            del out["disk_dir"]
        return out


@dataclass
class Plan:
    model: str
    method: str
    nsamples: int
    seqlen: int
    budgets: dict[str, int | None]  # gpu_memory, cpu_memory, disk_free
    settings: Chosen
    phases: list[PhasePlan]
    fits: bool
    advice: list[str]
    notes: list[str]
    shortfalls: dict[str, int] = field(default_factory=dict)  # budget -> bytes missing (worst phase)

    @property
    def device_peak_bytes(self) -> int:
        return max(p.device_peak_bytes for p in self.phases)

    @property
    def host_peak_bytes(self) -> int:
        return max(p.host_peak_bytes for p in self.phases)

    @property
    def disk_bytes(self) -> int:
        return max(p.disk_bytes for p in self.phases)

    def phase(self, name: str) -> PhasePlan:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "method": self.method, "nsamples": self.nsamples, "seqlen": self.seqlen,
            "device_peak_bytes": self.device_peak_bytes, "host_peak_bytes": self.host_peak_bytes,
            "disk_bytes": self.disk_bytes, "fits": self.fits, "settings": self.settings.as_dict(),
            "budgets": self.budgets,
            "phases": [asdict(p) for p in self.phases], "advice": self.advice, "notes": self.notes,
        }

    def summary(self) -> dict:
        """For prune_report.json: next to the measured phases."""
        return {"settings": self.settings.as_dict(), "budgets": self.budgets, "fits": self.fits,
                "phases": [{"phase": q.name, "device_peak_bytes": q.device_peak_bytes,
                            "host_peak_bytes": q.host_peak_bytes, "disk_bytes": q.disk_bytes} for q in self.phases]}

    def fits_line(self) -> str:
        """"fits: yes" only for the budgets that were given: without one a peak is compared with nothing (an
        unlimited budget "fits" any prediction, 33,876 TiB of host memory too)."""
        if not self.fits:
            return "fits: NO"
        g = self.budgets
        names = [("host", "cpu_memory"), ("disk", "disk_free")]
        if self.settings.device != "cpu":
            names.insert(0, ("device", "gpu_memory"))
        unchecked = [name for name, key in names if g.get(key) is None]
        if len(unchecked) == len(names):
            return ("fits: not checked, no budget was given (pass --cpu-memory, --gpu-memory, --disk or "
                    "--disk-space to compare the peaks with one)")
        return "fits: yes" + (f" ({', '.join(unchecked)}: no budget given, not checked)" if unchecked else "")

    def table(self) -> str:
        g = self.budgets
        lines = [f"{self.model}: {self.method}, {self.nsamples} x {self.seqlen} tokens; budgets: device "
                 f"{fmt_budget(g['gpu_memory'])}, host {fmt_budget(g['cpu_memory'])}, "
                 f"disk {fmt_budget(g['disk_free'])}",
                 "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.as_dict().items()),
                 f"{'phase':<16}{'device peak':>14}{'host peak':>14}{'disk':>14}   largest device / host term"]
        for p in self.phases:
            dn, dv = p.dominant("device")
            hn, hv = p.dominant("host")
            lines.append(f"{p.name:<16}{fmt_size(p.device_peak_bytes):>14}{fmt_size(p.host_peak_bytes):>14}"
                         f"{fmt_size(p.disk_bytes):>14}   {dn} {fmt_size(dv)} / {hn} {fmt_size(hv)}")
        lines.append(f"{'peak':<16}{fmt_size(self.device_peak_bytes):>14}{fmt_size(self.host_peak_bytes):>14}"
                     f"{fmt_size(self.disk_bytes):>14}")
        lines.append(self.fits_line())
        lines += [f"advice: {a}" for a in self.advice]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan(shape: ModelShape, settings: PlanSettings, budgets: Budgets, *, baseline: int | None = None,
         probe_cache: dict | None = None) -> Plan:
    """Predict per-phase peaks and choose the settings that fit: ``offload`` None / "auto" tries cpu then
    disk, ``head_chunk`` "auto" tries HEAD_CHUNKS; the first that fits, else the one short by least.
    baseline: host RSS before the run (None: ``baseline_rss()``)."""
    s = settings.resolved(shape.storage_dtype)
    max_pos = getattr(shape.config, "max_position_embeddings", None)
    if max_pos is not None and s.seqlen > max_pos:
        raise UsageError(f"--seqlen {s.seqlen} exceeds the model's context ({max_pos} positions)")
    base = baseline if baseline is not None else baseline_rss()
    cache: dict = {} if probe_cache is None else probe_cache
    tried = []
    for k, off, chunk in itertools.product(s.checkpoint_choices(shape.num_blocks), s.offloads(), s.head_chunks()):
        phases, pr = predict(shape, replace(s, offload=off, head_chunk=chunk, checkpoint_every=k), base, cache)
        phases = [p for p in phases if s.phases is None or p.name in s.phases]
        short = _shortfalls(phases, budgets, off)
        tried.append((sum(short.values()), k, off, chunk, phases, pr, short))
        if not short:
            break
    _, k, off, chunk, phases, pr, short = tried[-1] if not tried[-1][-1] else min(tried, key=lambda r: r[0])
    ranks = {"nproc": s.nproc, "rank": s.rank, "windows_on_rank": s.local} if s.nproc > 1 else {}
    chosen = Chosen(device=s.device, compute_dtype=dtype_name(s.compute_dtype), store_dtype=dtype_name(s.store_dtype),
                    storage_dtype=dtype_name(shape.storage_dtype), offload=off, head_chunk=chunk,
                    forward_microbatch=s.batch_size, grad_dtype=dtype_name(s.grad_dtype), checkpoint_every=k,
                    chunk_windows=s.partition.chunk, solver=s.solver if s.spec.solve == "lsq" else None,
                    disk_dir=str(budgets.disk_dir) if off == "disk" and budgets.disk_dir is not None else None,
                    **ranks)
    notes = list(pr.notes)
    notes.append("device peaks measured on fake tensors (FakeTensorMode) through the real decoder layer "
                 f"{shape.family.layer_class}, SDPA; stores added analytically")
    if s.nproc > 1:
        notes.append(f"per rank: rank {s.rank} of {s.nproc} holds {s.local} of {s.nsamples} windows" +
                     (" and writes OUT_DIR (shards, gradient files), folding every chunk sum into totals" if s.writer
                      else "; it writes nothing in OUT_DIR (its disk store, if any, goes to its scratch folder)"))
    if off == "disk":
        notes.append("disk store: boundaries are read and written a sample at a time with positional I/O and "
                     "dropped from the page cache; only the samples in use are in RAM")
    if k > 1 and any(p.name == "gradient_sweep" for p in phases):
        L = shape.num_blocks
        notes.append(f"gradient sweep keeps one block input in {k} ({boundaries_held(L, k)[0]} of {L + 1}); the "
                     f"reverse walk recomputes {recomputed_blocks(L, k)} block forwards, about "
                     f"{recomputed_blocks(L, k) / L:.0%} of one more forward pass (gradients unchanged)")
    result = Plan(shape.name, s.method, s.nsamples, s.seqlen, budgets.as_dict(), chosen, phases, not short, [],
                  notes, short)
    result.advice = advice(result)
    return result


def _shortfalls(phases: list[PhasePlan], budgets: Budgets, offload: str) -> dict[str, int]:
    """Budget name -> bytes missing (worst phase)."""
    short = {}
    if budgets.gpu_memory:
        over = max(p.device_peak_bytes for p in phases) - budgets.gpu_memory
        if over > 0:
            short["gpu_memory"] = over
    if budgets.cpu_memory is not None:
        over = max(p.host_peak_bytes for p in phases) - budgets.cpu_memory
        if over > 0:
            short["cpu_memory"] = over
    if offload == "disk" and budgets.disk_dir is None and budgets.disk_free is None:
        short["disk_dir"] = 1
    if budgets.disk_free is not None:
        over = max(p.disk_bytes for p in phases) - budgets.disk_free
        if over > 0:
            short["disk_free"] = over
    return short


def _head_knob(p: Plan, dominant: str) -> list[str]:
    """``--head-chunk`` first when the head's whole-window logits are what overflows (a large vocabulary)."""
    if "head step" not in dominant or p.settings.head_chunk is not None:
        return []
    return [f"--head-chunk {HEAD_CHUNKS[1]} (the head's fp32 logits for {HEAD_CHUNKS[1]} positions at a time "
            f"instead of the whole window)"]


def _host_knobs(p: Plan, q: PhasePlan) -> list[str]:
    """Knobs that shrink ``q``'s host terms without fewer windows: the prefetched block (same output) and, on the
    CPU, the chunk-sum totals (one reduction chunk; the sums fold in another order)."""
    knobs, host = [], q.terms.get("host", {})
    ahead = host.get("next block prefetched", 0)
    if ahead:
        knobs.append(f"--no-prefetch (-{fmt_size(ahead)}, the same output)")
    totals = sum(v for k, v in host.items() if "chunk-sum totals" in k)
    if totals and p.settings.nproc is None:
        knobs.append(f"--chunk-windows {p.nsamples} (one reduction chunk: -{fmt_size(totals)}; the sums fold in "
                     "another order, so their last bits change)")
    return knobs


def advice(p: Plan, *, run: bool = False, disk_store: Plan | None = None) -> list[str]:
    """One line per budget the plan is short of: what overflows and the knobs that would help.
    run: worded for the engine (the disk is OUT_DIR's); disk_store: the same run planned with
    ``--offload disk``, when a RAM store is too big (its host peak is quoted)."""
    out = []
    n, t, short = p.nsamples, p.seqlen, p.shortfalls
    fewer = f"a smaller --nsamples (now {n}) or --seqlen (now {t})"
    if "gpu_memory" in short:
        q = max(p.phases, key=lambda x: x.device_peak_bytes)
        name, val = q.dominant("device")
        steps = q.terms.get("device_steps", {})
        batch = p.settings.forward_microbatch
        knobs = [*_head_knob(p, name),
                 f"a smaller --seqlen (now {t})" + (f" or --batch-size (now {batch})" if batch > 1 else ""),
                 "--device cpu" if run else "raise --gpu-memory"]
        out.append(f"device memory short by {fmt_size(short['gpu_memory'])} in {q.name}: {name} = {fmt_size(val)}"
                   + (f" (block {fmt_size(steps['block'])}, head {fmt_size(steps['head'])})" if steps else "")
                   + f", {fmt_size(p.budgets['gpu_memory'])} available; try " + ", or ".join(knobs))
    if "cpu_memory" in short:
        q = max(p.phases, key=lambda x: x.host_peak_bytes)
        name, val = q.dominant("host")
        knobs = _head_knob(p, name) + _host_knobs(p, q)
        if p.settings.offload == "cpu":
            if run:
                if disk_store is not None and disk_store.host_peak_bytes < p.host_peak_bytes:
                    knobs.append(f"--offload disk (boundaries in files under OUT_DIR; host peak "
                                 f"{fmt_size(disk_store.host_peak_bytes)})")
            else:
                knobs.append("pass --disk DIR to keep the boundaries on disk (--offload disk)")
        knobs.append(fewer + ("" if run else " or raise --cpu-memory"))
        out.append(f"host RAM short by {fmt_size(short['cpu_memory'])} in {q.name}: {name} = {fmt_size(val)}, "
                   f"{fmt_size(p.budgets['cpu_memory'])} available; try " + ", or ".join(knobs))
    if "disk_dir" in short:
        out.append("the boundaries do not fit in RAM: pass --disk DIR (a folder with room for them)")
    if "disk_free" in short:
        q = max(p.phases, key=lambda x: x.disk_bytes)
        name, val = q.dominant("disk")
        where = "where OUT_DIR is" if run else "under --disk"
        knobs = ["an OUT_DIR on a larger disk (or free space there)" if run
                 else "free space or choose another --disk"]
        files = any("gradient files" in k for x in p.phases for k in x.terms.get("disk", {}))
        if files and p.settings.grad_dtype == "float32":
            knobs.append("--grad-dtype bfloat16 (half the gradient files)")
        knobs.append(fewer)
        out.append(f"disk short by {fmt_size(short['disk_free'])} in {q.name}: {name} = {fmt_size(val)}, "
                   f"{fmt_size(p.budgets['disk_free'])} free {where}; try " + ", or ".join(knobs))
    return out
