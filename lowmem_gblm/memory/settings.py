"""What a plan is asked: the run's settings (``PlanSettings``, validated and resolved once) and the budgets
each resource may take (``Budgets``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.methods import Method, get_method
from lowmem_gblm.methods.update import AUTO_MIN_COLUMNS, resolve_solver
from lowmem_gblm.runtime import COMPUTE_DTYPES, GRAD_FILE_DTYPES, auto_dtype, dtype_name, named_dtype
from lowmem_gblm.stream.partition import Partition, auto_chunk
from lowmem_gblm.stream.segments import candidates
from lowmem_gblm.units import check_count, parse_size

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

    @classmethod
    def of_report(cls, report: dict, *, device: str | None = None) -> PlanSettings:
        """The settings a finished prune run planned with, from its ``prune_report.json``: the options as given
        and what the engine resolved (``predicted.settings``: store, dtypes, chunking, head chunk, checkpoints),
        so that a run is re-planned after the fact with nothing guessed (benchmarks/planner_conformance.py).
        Token windows only (images: the engine's ``sample_bytes`` is not in the report)."""
        o, chosen = report["options"], report["predicted"]["settings"]
        update = str(o.get("update") or "none")
        return cls(method=str(o["method"]) + ("" if update == "none" else f"+{update}"),
                   nsamples=report["calibration"]["windows"][0], seqlen=report["calibration"]["windows"][1],
                   device=device or chosen["device"], compute_dtype=chosen["compute_dtype"],
                   store_dtype=chosen["store_dtype"], offload=chosen["offload"], head_chunk=chosen["head_chunk"],
                   batch_size=chosen["forward_microbatch"], grad_dtype=chosen["grad_dtype"],
                   prefetch=bool(o["prefetch"]), phases=tuple(p["phase"] for p in report["predicted"]["phases"]),
                   checkpoint_every=chosen["checkpoint_every"], nproc=chosen.get("nproc", 1),
                   rank=chosen.get("rank", 0), chunk_windows=chosen["chunk_windows"],
                   solver=chosen.get("solver", str(o.get("solver") or "auto")))

    @cached_property
    def spec(self) -> Method:
        """The method (with its update) parsed once from ``method`` (e.g. "gblm+lsq"): the registry's Method."""
        return get_method(self.method)

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
        self.spec  # noqa: B018 (refuses an unknown method)
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
            return candidates(num_blocks) if self.spec.needs_gradients else [1]
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
