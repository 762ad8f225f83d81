"""The plan: predicted device / host / disk peaks per phase, and the settings that fit the budgets.

Device terms are the probe's (``memory.probe``: the engine's own steps on fake tensors). The stores
(calibration boundaries, the incoming-gradient buffer, accumulators, output shards) are added
analytically, as is the host side: a measured python + torch + transformers baseline RSS, stores kept
in RAM, the block read from disk in its storage dtype, and everything the device holds when the device
is the CPU.

Phases (the names in the report): ``gradient_sweep`` (GBLM only), ``prune_sweep``, ``eval``.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.io.checkpoint import FINITE_CHUNK, ROW_CHUNK
from lowmem_gblm.memory.probe import (
    ACC_BYTES,
    Probe,
    baseline_rss,
    cublas_workspace_bytes,
    cuda_host_bytes,
    input_groups,
    probe,
)
from lowmem_gblm.memory.shape import ModelShape
from lowmem_gblm.methods import get_method
from lowmem_gblm.methods.update import AUTO_MIN_COLUMNS, resolve_solver
from lowmem_gblm.runtime import COMPUTE_DTYPES, GRAD_FILE_DTYPES, auto_dtype, dtype_bytes, dtype_name, named_dtype
from lowmem_gblm.stream.partition import Partition, auto_chunk
from lowmem_gblm.stream.segments import boundaries_held, candidates, recomputed_blocks
from lowmem_gblm.stream.store import store_nbytes
from lowmem_gblm.units import check_count, fmt_budget, fmt_size, parse_size

HEAD_CHUNKS = (None, 512, 128)  # head_chunk="auto": tokens per head call, tried in this order (None: the window)
OFFLOADS = ("cpu", "disk")


@dataclass(frozen=True)
class PlanSettings:
    """What the run will do. ``plan`` resolves "auto" / None to concrete values."""

    method: str
    nsamples: int
    seqlen: int
    device: str = "cpu"  # "cpu" | "cuda"
    compute_dtype: str | torch.dtype = "auto"
    store_dtype: str | torch.dtype | None = None  # None/"auto": compute dtype; "int8" stays a name
    offload: str | None = None  # None or "auto": chosen
    head_chunk: int | None | str = None  # "auto": tried (None, 512, 128) in that order
    batch_size: int = 1  # windows per call in every sweep (forwards, the gradient sweep's head and backward)
    grad_dtype: str | torch.dtype = "float32"
    prefetch: bool = True  # one more block read ahead in host memory
    phases: tuple[str, ...] | None = None  # only these phases count
    checkpoint_every: int | str = 1  # gradient sweep: keep every k-th block input; "auto": the first k that fits
    nproc: int = 1  # data-parallel ranks (torchrun / accelerate launch): the prediction is for one of them
    rank: int = 0  # which: rank 0 writes OUT_DIR and folds the chunk sums; the others hold windows only
    chunk_windows: int | None = None  # windows per reduction chunk (None: ceil(N/8), as the engine)
    sample_bytes: int | None = None  # one calibration sample's inputs in host memory (None: T int64 token ids;
    # images: 3 x H x W float32 pixel values and an int64 label)
    solver: str = "auto"  # --update lsq's --solver (methods.update.resolve_solver decides per linear width)

    def input_bytes(self, seqlen: int) -> int:
        """Every calibration sample's inputs, held by every rank (token ids, or pixel values and labels)."""
        return self.nsamples * (self.sample_bytes if self.sample_bytes is not None else seqlen * 8)

    @property
    def partition(self) -> Partition:
        """The windows' chunks dealt to the ranks, as the engine deals them."""
        return Partition(self.nsamples, self.chunk_windows or auto_chunk(self.nsamples), self.nproc, self.rank)

    @property
    def local(self) -> int:
        """Windows this rank holds (its activation store's N)."""
        return self.partition.nlocal

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def folds(self) -> bool:
        """Whether chunk sums are folded into separate totals (more than one chunk; on the writer)."""
        return self.writer and len(self.partition.chunks) > 1

    def resolved(self, storage: torch.dtype) -> PlanSettings:
        """Validated, with torch dtypes (store_dtype: a float dtype or "int8"); offload and head_chunk
        stay as given (see ``offloads`` / ``head_chunks``)."""
        get_method(self.method)
        resolve_solver(str(self.solver), AUTO_MIN_COLUMNS)  # refuses an unknown --solver
        for flag, value, lo in (("--nsamples", self.nsamples, 1), ("--seqlen", self.seqlen, 2),
                                ("--batch-size", self.batch_size, 1), ("--nproc", self.nproc, 1),
                                ("--chunk-windows", self.chunk_windows, 1)):
            check_count(flag, value, lo)
        compute = _dtype(self.compute_dtype, "--dtype", (None, "auto"))
        compute = auto_dtype(self.device, storage)[0] if compute in (None, "auto") else compute
        store = _dtype(self.store_dtype, "--store-dtype", (None, "auto", "int8"))
        store = compute if store in (None, "auto") else store
        if dtype_name(self.grad_dtype) not in GRAD_FILE_DTYPES:
            raise UsageError(f"--grad-dtype must be float32 or bfloat16, got {self.grad_dtype!r}")
        if self.offload not in (None, "auto", *OFFLOADS):
            raise UsageError(f"--offload must be cpu or disk, got {self.offload!r}")
        if self.nproc < 1 or not 0 <= self.rank < self.nproc:
            raise UsageError(f"--nproc must be >= 1, got {self.nproc}")
        if self.chunk_windows is not None and self.chunk_windows < 1:
            raise UsageError(f"--chunk-windows must be >= 1, got {self.chunk_windows}")
        chunks = len(self.partition.chunks)
        if chunks < self.nproc:
            raise UsageError(f"{self.nproc} ranks but only {chunks} chunk(s) of windows: pass --chunk-windows "
                             f"{max(1, self.nsamples // self.nproc)} or fewer, or fewer ranks")
        # a call never crosses a chunk (stream.partition): the probe runs the batch the engine will run
        batch = min(self.batch_size, self.partition.chunk)
        return replace(self, compute_dtype=compute, store_dtype=store, grad_dtype=named_dtype(self.grad_dtype),
                       solver=str(self.solver), batch_size=batch)

    def offloads(self) -> list[str]:
        return list(OFFLOADS) if self.offload in (None, "auto") else [self.offload]

    def checkpoint_choices(self, num_blocks: int) -> list[int]:
        if self.checkpoint_every in (None, "auto"):
            return candidates(num_blocks) if get_method(self.method).needs_gradients else [1]
        k = int(self.checkpoint_every)
        if k < 1:
            raise UsageError(f"--checkpoint-every must be >= 1, got {k}")
        return [min(k, max(num_blocks, 1))]

    def head_chunks(self) -> list[int | None]:
        if self.head_chunk == "auto":
            return list(HEAD_CHUNKS)
        return [None if self.head_chunk in (None, 0) else int(self.head_chunk)]


def _dtype(name, flag: str, keep: tuple) -> torch.dtype | str | None:
    """A torch dtype; ``keep``'s names stay names; anything else must be a compute dtype name."""
    if isinstance(name, torch.dtype) or name in keep:
        return name
    if name not in COMPUTE_DTYPES:
        choices = ", ".join([str(k) for k in keep if k] + list(COMPUTE_DTYPES))
        raise UsageError(f"{flag} must be one of {choices}, got {name!r}")
    return named_dtype(name)


@dataclass(frozen=True)
class Budgets:
    """Bytes each resource may take; None: unlimited (gpu_memory None / 0: no GPU)."""

    gpu_memory: int | None = None
    cpu_memory: int | None = None
    disk_free: int | None = None
    disk_dir: Path | None = None  # where a disk store would go

    @classmethod
    def from_options(cls, gpu_memory: str | int | None = None, cpu_memory: str | int | None = None,
                     disk_dir: str | Path | None = None, disk_space: str | int | None = None) -> Budgets:
        """The ``plan`` command's budgets: sizes as typed; the disk budget is ``disk_space``, else the free
        space of ``disk_dir``."""
        disk_free = parse_size(disk_space)
        if disk_free is None and disk_dir is not None:
            if not Path(disk_dir).is_dir():
                raise UsageError(f"--disk {disk_dir}: no such folder")
            disk_free = shutil.disk_usage(disk_dir).free
        return cls(parse_size(gpu_memory), parse_size(cpu_memory), disk_free,
                   None if disk_dir is None else Path(disk_dir))

    def as_dict(self) -> dict[str, int | None]:
        return {"gpu_memory": self.gpu_memory, "cpu_memory": self.cpu_memory, "disk_free": self.disk_free}


@dataclass
class PhasePlan:
    name: str
    device_peak_bytes: int
    host_peak_bytes: int
    disk_bytes: int
    terms: dict[str, dict[str, int]] = field(default_factory=dict)  # device/host/disk -> term -> bytes

    def dominant(self, where: str) -> tuple[str, int]:
        items = self.terms.get(where, {})
        return max(items.items(), key=lambda kv: kv[1]) if items else ("", 0)


@dataclass
class Plan:
    model: str
    method: str
    nsamples: int
    seqlen: int
    budgets: dict[str, int | None]  # gpu_memory, cpu_memory, disk_free
    settings: dict  # device, compute_dtype, store_dtype, offload, head_chunk, grad_dtype, ...
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
            "disk_bytes": self.disk_bytes, "fits": self.fits, "settings": self.settings, "budgets": self.budgets,
            "phases": [asdict(p) for p in self.phases], "advice": self.advice, "notes": self.notes,
        }

    def summary(self) -> dict:
        """For prune_report.json: next to the measured phases."""
        return {"settings": self.settings, "budgets": self.budgets, "fits": self.fits,
                "phases": [{"phase": q.name, "device_peak_bytes": q.device_peak_bytes,
                            "host_peak_bytes": q.host_peak_bytes, "disk_bytes": q.disk_bytes} for q in self.phases]}

    def fits_line(self) -> str:
        """"fits: yes" only for the budgets that were given: without one a peak is compared with nothing (an
        unlimited budget "fits" any prediction, 33,876 TiB of host memory too)."""
        if not self.fits:
            return "fits: NO"
        g = self.budgets
        names = [("host", "cpu_memory"), ("disk", "disk_free")]
        if self.settings.get("device") != "cpu":
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
                 "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
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
    chosen = {"device": s.device, "compute_dtype": dtype_name(s.compute_dtype),
              "store_dtype": dtype_name(s.store_dtype), "storage_dtype": dtype_name(shape.storage_dtype),
              "offload": off, "head_chunk": chunk,
              "forward_microbatch": s.batch_size, "grad_dtype": dtype_name(s.grad_dtype), "checkpoint_every": k,
              "chunk_windows": s.partition.chunk}
    if get_method(s.method).solve == "lsq":
        chosen["solver"] = s.solver
    if s.nproc > 1:
        chosen |= {"nproc": s.nproc, "rank": s.rank, "windows_on_rank": s.local}
    if off == "disk":
        chosen["disk_dir"] = str(budgets.disk_dir) if budgets.disk_dir is not None else None
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
    if "head step" not in dominant or p.settings.get("head_chunk") is not None:
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
    if totals and "nproc" not in p.settings:
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
        batch = p.settings.get("forward_microbatch", 1)
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
        if p.settings["offload"] == "cpu":
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
        if files and p.settings["grad_dtype"] == "float32":
            knobs.append("--grad-dtype bfloat16 (half the gradient files)")
        knobs.append(fewer)
        out.append(f"disk short by {fmt_size(short['disk_free'])} in {q.name}: {name} = {fmt_size(val)}, "
                   f"{fmt_size(p.budgets['disk_free'])} free {where}; try " + ", or ".join(knobs))
    return out


def _phase(name: str, device: dict[str, int], host: dict[str, int], disk: dict[str, int],
           on_cpu: bool) -> PhasePlan:
    if on_cpu:  # the compute device is the host: its terms are host terms too
        host = {**host, **{f"compute: {k}": v for k, v in device.items()}}
        device = {}
    return PhasePlan(name, sum(device.values()), sum(host.values()), sum(disk.values()),
                     {"device": device, "host": host, "disk": disk})


def _probe(shape: ModelShape, s: PlanSettings, cache: dict | None) -> Probe:
    key = (s.method, s.seqlen, s.compute_dtype, s.nsamples, s.head_chunk, s.batch_size, s.solver)
    if cache is not None and key in cache:
        return cache[key]
    pr = probe(shape, s.method, s.seqlen, s.compute_dtype, s.nsamples, s.head_chunk, batch=s.batch_size,
               solver=s.solver)
    if cache is not None:
        cache[key] = pr
    return pr


def predict(shape: ModelShape, s: PlanSettings, baseline: int,
            probe_cache: dict | None = None) -> tuple[list[PhasePlan], Probe]:
    """Per-phase peaks for one choice of settings: ``s`` resolved (``PlanSettings.resolved``) with a
    concrete offload and head_chunk. store_dtype: a float dtype or "int8" (boundaries only; incoming-
    gradient buffers stay exact). prefetch: one more block read ahead in host memory (compute dtype on
    the CPU, storage dtype pinned for a GPU)."""
    meth = get_method(s.method)
    pr = _probe(shape, s, probe_cache)
    compute_dtype, store_dtype = s.compute_dtype, s.store_dtype
    on_cpu = s.device == "cpu"
    n, t, d, L = s.local, s.seqlen, shape.hidden, shape.num_blocks  # this rank's windows
    sd = dtype_bytes(shape.storage_dtype)
    boundary = store_nbytes((n, t, d), store_dtype)
    block_store = shape.block_numel * sd
    ahead = shape.block_numel * dtype_bytes(compute_dtype if on_cpu else shape.storage_dtype) if s.prefetch else 0
    grad_file = shape.linear_numel * dtype_bytes(s.grad_dtype)  # one block's gradient file on disk
    head_store = (shape.vocab * d + d) * sd
    ids = s.input_bytes(t)  # every rank reads all the ids (images: pixel values)
    ram = s.offload == "cpu"
    # read path: safetensors copies the block out in its storage dtype, then .to(device, dtype); on the
    # CPU in the same dtype that copy *is* the block (counted in the device step)
    read_host = 0 if on_cpu and compute_dtype == shape.storage_dtype else block_store
    serialized = 2 * block_store  # safetensors.torch.save: per-tensor bytes, then the joined buffer
    phases = []

    if meth.needs_gradients:
        phases.append(_gradient_phase(shape, pr, s, ram=ram, baseline=baseline, read_host=read_host, ahead=ahead,
                                      grad_file=grad_file))
    cuda_host = {} if on_cpu else {"CUDA runtime (context, kernels, cuBLAS; estimate)": cuda_host_bytes()}
    ws = {} if on_cpu else {"cuBLAS workspace (1 thread)": cublas_workspace_bytes()}

    # prune sweep: two buffers, block loaded, its stored bytes for the shard, shard written
    host = {"baseline": baseline, **cuda_host, "calibration ids": ids,
            "block's stored bytes for writing (storage dtype)": block_store, "next block prefetched": ahead}
    if on_cpu and pr.prune_step < serialized:
        host["shard being serialized (2 copies)"] = serialized - pr.prune_step  # after the block is freed
    elif not on_cpu:
        host["shard being serialized (2 copies)"] = max(serialized, read_host)
    if meth.needs_gradients and not on_cpu:
        # read one linear at a time; on the CPU it is the block step's own
        host["one linear's gradient read (fp32)"] = max(o * i for o, i in shape.linear_shapes.values()) * ACC_BYTES
    if ram:
        host["two boundaries [N,T,D]"] = 2 * boundary
    dev = {"block step (weights + statistics + forward micro-batch + prune)": pr.prune_step, **ws}
    if s.folds:
        dev["statistics' chunk-sum totals (writer)"] = _statistics_bytes(shape, meth.needs, input_groups(shape))
    disk = {"output checkpoint": shape.model_bytes()}
    if not s.writer:
        disk = {}
        for key in ("block's stored bytes for writing (storage dtype)", "shard being serialized (2 copies)",
                    "one linear's gradient read (fp32)"):
            host.pop(key, None)
    elif meth.needs_gradients:
        # block i's gradient file goes once its shard is durable: peak at the first or the last block
        rest, blk = shape.model_bytes() - L * block_store, block_store
        disk = {"output shards + gradient files not yet consumed (peak)":
                rest + max(L * grad_file + blk, grad_file + L * blk)}
    if not ram:
        disk["two boundaries [N,T,D]"] = 2 * boundary
    p = _phase("prune_sweep", dev, host, disk, on_cpu)
    # its first step (stream.sweep.embed) reads the embedding rows the windows use (at most N*T of them),
    # ROW_CHUNK rows at a time (io.checkpoint.read_rows): the result, one chunk and the rows picked out
    # of it, the chunked finiteness mask, then the compute-dtype copy
    rows = min(shape.vocab, n * t) * d
    first = {"baseline": baseline, **cuda_host, "calibration ids": ids,
             "embedding rows read (result + one chunk x2 + finite mask)":
             rows * sd + 2 * min(ROW_CHUNK, shape.vocab) * d * sd + min(rows, FINITE_CHUNK)}
    if compute_dtype != shape.storage_dtype:
        first["embedding rows in the compute dtype"] = rows * dtype_bytes(compute_dtype)
    p.terms["host_stages"] = {"embedding read": sum(first.values()), "blocks": p.host_peak_bytes}
    if sum(first.values()) > p.host_peak_bytes:
        p.terms["host"], p.host_peak_bytes = first, sum(first.values())
    phases.append(p)

    # eval (streamed perplexity of the pruned model, as many windows as calibration): plain forwards, the head
    eb = n * t * d * dtype_bytes(compute_dtype if store_dtype == "int8" else store_dtype)  # no int8 eval store
    host = {"baseline": baseline, **cuda_host, "block read (storage dtype)": block_store,
            "head read (storage dtype)": 0, "next block prefetched": ahead}
    if ram:
        host["two boundaries [N,T,D]"] = 2 * eb
    dev_block = {"block step (weights + 1-sample forward)": pr.forward_step, **ws}
    dev_head = {"head step (norm + lm_head + 1-sample loss)": pr.head_eval, **ws}
    if pr.head_eval > pr.forward_step:
        host["block read (storage dtype)"] = 0
        host["head read (storage dtype)"] = head_store
    disk = {} if ram else {"two boundaries [N,T,D]": 2 * eb}
    p = _phase("eval", dev_block if pr.forward_step >= pr.head_eval else dev_head, host, disk, on_cpu)
    p.terms["device_steps"] = {"block": pr.forward_step, "head": pr.head_eval}
    phases.append(p)
    return phases, pr


def _statistics_bytes(shape: ModelShape, needs, groups: tuple[tuple[str, ...], ...]) -> int:
    """One block's input statistics (fp32): Σx² per input column and SparseGPT's [in, in] Hessian, one set per
    distinct input (``groups``: the linears reading the same input share theirs, stream.stats.collect_inputs)."""
    per = {"scaler_row": lambda i: i * ACC_BYTES, "hessian": lambda i: i * i * ACC_BYTES}
    return sum(per[n](shape.linear_shapes[g[0]][1]) for g in groups for n in needs if n in per)


def _gradient_phase(shape: ModelShape, pr: Probe, s: PlanSettings, *, ram: bool, baseline: int, read_host: int,
                    ahead: int, grad_file: int) -> PhasePlan:
    """The gradient sweep: boundaries and both gradient buffers are in the compute dtype.

    Host peak is the larger of two stages: the head (all L+1 boundaries, the incoming-gradient buffer
    being filled, on the CPU the head weight and one window's fp32 logits / log-softmax / gradients)
    and the first reverse block (L boundaries, both gradient buffers, the block step, accumulators
    being written). Store pages count once written (torch.empty pages are not resident before).
    """
    on_cpu = s.device == "cpu"
    L, d, n, t = shape.num_blocks, shape.hidden, s.local, s.seqlen  # this rank's windows
    boundary = n * t * d * dtype_bytes(s.compute_dtype)  # gradient buffers: always exact
    persisted = s.nsamples * t * d * dtype_bytes(s.compute_dtype)  # the writer's file holds every rank's windows
    stored = store_nbytes((n, t, d), s.store_dtype)  # inputs (int8 ok)
    acc_block = shape.linear_numel * ACC_BYTES
    common = {"baseline": baseline, "calibration ids": s.input_bytes(t)}
    if not on_cpu:
        common["CUDA runtime (context, kernels, cuBLAS; estimate)"] = cuda_host_bytes()
    head_stage = dict(common)
    # the next block is read (storage-dtype bytes, then converted) on the prefetch thread meanwhile
    walk_stage = dict(common) | {"block read (storage dtype)": read_host, "next block prefetched": ahead}
    k = int(s.checkpoint_every)
    held_head, held_walk = boundaries_held(L, k)
    # with k > 1 the inputs not kept pass through two scratch boundaries during the forward
    scratch = {"two scratch boundaries (forward, inputs not kept)": 2 * stored} if k > 1 else {}
    forward_stage = dict(common) | {f"boundaries {held_head} x [N,T,D]": held_head * stored} | scratch
    if ram:
        head_stage |= {f"boundaries {held_head} x [N,T,D]": held_head * stored, "incoming-gradient buffer": boundary}
        walk_stage |= {f"boundaries {held_walk} x [N,T,D]": held_walk * stored, "two gradient buffers": 2 * boundary}
    head_dev = {"head step (norm + lm_head + 1-window fp32 loss/grad)": pr.head_grad}
    block_dev = {"block step (weights + fp32 accumulators + 1-sample fwd/bwd)": pr.grad_step}
    if s.folds:  # the writer adds each chunk's accumulators into totals of the same size
        block_dev["accumulators' chunk-sum totals (writer)"] = acc_block
    if on_cpu:
        head_stage |= {f"compute: {k}": v for k, v in head_dev.items()}
        # a block's step, then (its weights freed) its accumulators and their file copy being written
        # (fp32: the serialized bytes; bf16: the cast, then the serialized bytes): one after the other
        write = acc_block + grad_file
        walk_stage |= ({f"compute: {k}": v for k, v in block_dev.items()} if pr.grad_step >= write
                       else {"accumulators being written (+ file copy)": write})
        dev = {}
    else:  # the incoming gradient is copied to the device; backward runs on autograd's own thread
        walk_stage["accumulators copied to the host (+ serialized copy)"] = 2 * grad_file
        block_dev["incoming gradient on the device"] = s.batch_size * t * d * dtype_bytes(s.compute_dtype)
        ws = {"cuBLAS workspaces (forward + autograd threads)": 2 * cublas_workspace_bytes()}
        dev = (head_dev if pr.head_grad >= sum(block_dev.values()) else block_dev) | ws
    stages = {"head": sum(head_stage.values()), "reverse walk": sum(walk_stage.values())}
    if ram and scratch:
        stages["forward"] = sum(forward_stage.values())
    named = {"head": head_stage, "reverse walk": walk_stage, "forward": forward_stage}
    host = named[max(stages, key=stages.get)]
    disk = {f"gradient files ({'fp32' if grad_file == acc_block else 'bf16'}, all blocks)": L * grad_file,
            # the incoming gradient persisted after each block for resume, replaced atomically (two copies)
            "persisted incoming gradient (old + new while replaced)": 2 * persisted} if s.writer else {}
    if not ram:
        disk |= {f"boundaries {max(held_head, held_walk)} x [N,T,D]": max(held_head, held_walk) * stored,
                 "two gradient buffers": 2 * boundary} | scratch
    p = PhasePlan("gradient_sweep", sum(dev.values()), max(stages.values()), sum(disk.values()),
                  {"device": dev, "host": host, "disk": disk})
    p.terms["device_steps"] = {"block": sum(block_dev.values()), "head": pr.head_grad}
    p.terms["host_stages"] = stages
    return p
