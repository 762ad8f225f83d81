"""Open a run once: the model, the calibration windows, device and dtype, and the plan check (which
also chooses where the activation store lives). The prune and gradient entry points start here."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from lowmem_gblm.calib.samples import TOKENS, Samples
from lowmem_gblm.config import RunConfig
from lowmem_gblm.engine.modality import adapter
from lowmem_gblm.errors import InputError
from lowmem_gblm.io.model import StreamedModel
from lowmem_gblm.io.runstate import (
    CALIB_IDS_NAME,
    CALIB_PIXELS_NAME,
    CPU_THREADS,
    GRADIENTS_JSON,
    MANIFEST_NAME,
    OWN_GRADIENTS,
    STATE_DIR,
    thread_identity,
    written_bytes,
)
from lowmem_gblm.memory.budget import machine_budgets, plan_run
from lowmem_gblm.memory.matmul_peak import achieved_here
from lowmem_gblm.memory.plan import Plan, PlanSettings
from lowmem_gblm.memory.shape import shape_of
from lowmem_gblm.memory.tracker import PhaseStats, PhaseTracker, limit_heap_retention
from lowmem_gblm.memory.work import phase_work
from lowmem_gblm.ranks import Ranks, current, local_world
from lowmem_gblm.runtime import resolve_device, resolve_dtype
from lowmem_gblm.stream.context import BlockContext
from lowmem_gblm.stream.partition import Partition, auto_chunk
from lowmem_gblm.stream.store import ActivationStore
from lowmem_gblm.units import fmt_size, parse_size

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What every step of a run shares (options stay in ``config``)."""

    config: RunConfig
    model: StreamedModel
    samples: Samples  # calibration windows [N, T] (language models) or images [N, 3, H, W] (vision)
    device: torch.device
    dtype: torch.dtype
    out: Path
    plan: Plan
    settings: PlanSettings | None = None  # what the plan was made for (the work counts use it)
    phases: list[PhaseStats] = field(default_factory=list)
    work: dict[str, dict] = field(default_factory=dict)  # phase -> counted work and achieved fraction of peak
    done_blocks: int = 0  # blocks of the next phase an earlier, interrupted run already did
    ranks: Ranks = field(default_factory=Ranks)
    part: Partition | None = None  # the windows' chunks and this rank's share (set by open_run)
    scratch_root: Path | None = None  # a non-writing rank's disk store folder (it writes nothing in OUT_DIR)
    threads: list[int] = field(default_factory=list)  # every rank's torch CPU thread count, by rank

    @property
    def threads_identity(self) -> dict:
        """{"cpu_threads": ...} for a CPU run's identity (the thread count splits its float sums, so it decides the
        bytes); empty on other devices, whose sums do not run on the CPU's threads."""
        if self.device.type != "cpu" or not self.threads:
            return {}
        return {CPU_THREADS: thread_identity(self.threads)}

    @property
    def offload(self) -> str:
        """Where the store lives (cpu | disk): ``--offload``, or the plan check's choice for auto."""
        return self.plan.settings.offload

    @property
    def checkpoint_every(self) -> int:
        """The gradient sweep keeps every k-th block input (``--checkpoint-every``, or the plan's choice)."""
        return self.plan.settings.checkpoint_every

    @property
    def nsamples(self) -> int:
        """All windows of the run (every rank's); this rank holds ``part.nlocal`` of them."""
        return len(self.samples)

    @property
    def ids(self) -> torch.Tensor:
        """[N, T] calibration windows (language models)."""
        return self.samples.ids

    @cached_property
    def seqlen(self) -> int:
        """Tokens per sample: T of a window, or an image's patches and special tokens (StreamedModel.seqlen)."""
        return self.model.seqlen(self.samples)

    @cached_property
    def local_samples(self) -> Samples:
        """This rank's samples, in its store's order."""
        return self.samples.select(self.part.local_windows)

    @cached_property
    def local_ids(self) -> torch.Tensor:
        """[n_local, T]: this rank's windows, in its store's order (language models)."""
        return self.local_samples.ids

    @cached_property
    def ctx(self) -> BlockContext:
        return BlockContext.build(self.model, self.seqlen, self.device, self.dtype)

    @cached_property
    def calib_sha256(self) -> str:
        return self.samples.sha256

    @property
    def calib_file(self) -> str:
        """The file beside the outputs that keeps the exact calibration samples."""
        return CALIB_IDS_NAME if self.samples.kind == TOKENS else CALIB_PIXELS_NAME

    def store_folder(self, folder: Path) -> Path:
        """Where a disk store named by its place in OUT_DIR lives on this rank: there on the writer, under this
        rank's own scratch folder (``LOWMEM_GBLM_SCRATCH`` or the temp dir) on the others."""
        if self.ranks.writer:
            return folder
        if self.scratch_root is None:
            base = Path(os.environ.get("LOWMEM_GBLM_SCRATCH") or tempfile.gettempdir())
            remove_dead_scratch(base)
            self.scratch_root = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=base))
        return self.scratch_root / folder.name

    def close(self) -> None:
        """Remove a non-writing rank's scratch folder."""
        if self.scratch_root is not None:
            shutil.rmtree(self.scratch_root, ignore_errors=True)
            self.scratch_root = None

    def store(self, folder: Path) -> ActivationStore:
        """An activation store of this run's kind and ``--store-dtype`` (disk files under ``folder``, or this
        rank's scratch folder)."""
        return ActivationStore(self.offload, self.store_folder(folder), self.config.store_dtype)

    @property
    def boundary_shape(self) -> tuple[int, int, int]:
        """[n_local, T, D]: the hidden states of this rank's windows."""
        return self.part.nlocal, self.seqlen, self.model.hidden_size

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @contextlib.contextmanager
    def phase(self, name: str):
        """Measure a phase (seconds, peak RSS, device peak, I/O) into ``phases`` and log it."""
        with PhaseTracker(name, self.device) as tracker:
            yield tracker
        self.phases.append(tracker.stats)
        s = tracker.stats
        log.info("%s: %.1f s, peak RSS %s, device peak %s", name, s.seconds, fmt_size(s.peak_rss_bytes),
                 fmt_size(s.device_peak_allocated_bytes))
        self.count_work(name, s.seconds)  # after the phase: the peak benchmark is in neither its time nor peaks

    def count_work(self, name: str, seconds: float) -> None:
        """The phase's matmul FLOPs and bytes (memory.work), and the fraction of this machine's measured
        matmul peak it achieved, into ``work``. A failure here costs the report a field, never the run."""
        if self.settings is None:
            return
        try:
            settings = dataclasses.replace(self.settings, offload=self.offload,  # this rank's windows' work
                                           checkpoint_every=self.checkpoint_every, nsamples=self.part.nlocal,
                                           nproc=1, rank=0)
            done, self.done_blocks = self.done_blocks, 0
            counted = phase_work(shape_of(self.model), settings, name, done=done)
            result = achieved_here(counted, seconds, self.device, self.dtype)
        except Exception as exc:  # noqa: BLE001 (accounting only)
            log.warning("%s: could not count the work (%s: %s)", name, type(exc).__name__, exc)
            return
        self.work[name] = result
        if result.get("fraction_of_peak") is not None:
            log.info("%s: %.4g GFLOP of matmuls, %.1f GFLOP/s, %.1f%% of this machine's measured peak", name,
                     result["flops"] / 1e9, result["achieved_flops_per_s"] / 1e9, 100 * result["fraction_of_peak"])

    def rank_phases(self) -> dict:
        """{"ranks": world size and every rank's windows and per-phase seconds and peaks} (a collective: every rank
        calls it); empty for a one-process run."""
        if not self.ranks.many:
            return {}
        mine = {"rank": self.ranks.rank, "windows": self.part.nlocal,
                "phases": [{k: v for k, v in p.to_dict().items() if k in _RANK_FIELDS} for p in self.phases]}
        every = self.ranks.all_objects(mine, "gathering every rank's measured peaks")
        return {"ranks": {"world_size": self.ranks.world, "chunk_windows": self.part.chunk, "per_rank": every}}

    def phase_dicts(self) -> list[dict]:
        """Each phase's measured stats with its counted work, for a report."""
        return [p.to_dict() | ({"work": self.work[p.phase]} if p.phase in self.work else {}) for p in self.phases]


SCRATCH_PREFIX = "lowmem-gblm-scratch-pid"  # + the pid of the rank that made it


def remove_dead_scratch(base: Path) -> list[str]:
    """Remove the scratch folders in ``base`` that ranks of killed runs left (named with our prefix and the pid of a
    process that no longer exists); nothing else is touched."""
    removed = []
    for path in base.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's): not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if removed:
        log.info("removed %d scratch folder(s) left by killed ranks in %s", len(removed), base)
    return removed


_RANK_FIELDS = ("phase", "seconds", "peak_rss_bytes", "peak_rss_anon_bytes", "peak_rss_file_bytes",
                "device_peak_allocated_bytes")


def reusable_bytes(out: Path) -> int:
    """Bytes of files a previous run in ``out`` recorded as done: a prune output folder (its shards, its own
    gradient folder) or a gradient folder. A resume keeps them, --overwrite deletes them: either way the
    disk check counts them as space the run has."""
    return (written_bytes(out, f"{STATE_DIR}/{MANIFEST_NAME}") + written_bytes(out, GRADIENTS_JSON)
            + written_bytes(out / STATE_DIR / OWN_GRADIENTS, GRADIENTS_JSON))


def open_model(model_dir: str | Path) -> StreamedModel:
    limit_heap_retention()  # before anything large is allocated
    return StreamedModel.open(model_dir)


def open_run(config: RunConfig, model: StreamedModel, method: str, phases: tuple[str, ...]) -> Run:
    """Windows, device, dtype and the plan check for ``phases`` of ``method`` on ``model``."""
    if "gradient_sweep" in phases and model.family.task == "image_features":
        raise InputError(f"{model.root} is a backbone without a classifier ({model.family.architectures[0]}): "
                         f"{method} needs a loss to take gradients of; prune it with wanda, sparsegpt or magnitude, "
                         "or give it a classifier (e.g. Dinov2ForImageClassification)")
    samples = adapter(model).samples(config.calib, model)
    device = resolve_device(config.device)
    ranks = current(device.type)
    device = ranks.device(device)
    dtype = resolve_dtype(config.dtype, device, model.checkpoint_dtype())
    out = Path(config.out_dir)
    n, t = len(samples), model.seqlen(samples)
    part = partition(n, config.chunk_windows, ranks)
    if config.batch_size > part.chunk:
        log.warning("--batch-size %d: a call never crosses a chunk of %d windows, so at most %d windows go per call; "
                    "pass --chunk-windows %d (or more) for batches of %d", config.batch_size, part.chunk, part.chunk,
                    config.batch_size, config.batch_size)
    settings = PlanSettings(method=method, nsamples=n, seqlen=t, device=device.type, compute_dtype=dtype,
                            phases=phases, nproc=ranks.world, rank=ranks.rank, chunk_windows=part.chunk,
                            sample_bytes=samples.sample_bytes, **config.plan_settings())
    # each rank plans with its own budgets: the host RAM the ranks on this machine share, split between them;
    # a non-writing rank's disk is its scratch folder's
    where = out if ranks.writer else Path(os.environ.get("LOWMEM_GBLM_SCRATCH") or tempfile.gettempdir())
    budgets = machine_budgets(device, where, config.cpu_memory, config.gpu_memory, share=local_world())
    if config.disk_space is not None:
        budgets = dataclasses.replace(budgets, disk_free=parse_size(config.disk_space))
    if budgets.disk_free is not None and ranks.writer:  # what an earlier run here wrote is kept or freed
        budgets = dataclasses.replace(budgets, disk_free=budgets.disk_free + reusable_bytes(out))
    plan = plan_run(shape_of(model), settings, budgets, check=config.plan_check)
    threads = ranks.all_objects(torch.get_num_threads(), "gathering every rank's CPU thread count")
    return Run(config, model, samples, device, dtype, out, plan, settings=settings, ranks=ranks, part=part,
               threads=threads)


def partition(nsamples: int, chunk_windows: int | None, ranks: Ranks) -> Partition:
    """The windows' chunks (``--chunk-windows``, default ceil(N/8)) dealt to ``ranks``; refused when there are
    more ranks than chunks (a rank with no window would only wait)."""
    chunk = chunk_windows or auto_chunk(nsamples)
    part = Partition(nsamples, chunk, ranks.world, ranks.rank)
    if len(part.chunks) < ranks.world:
        raise InputError(f"{ranks.world} ranks but only {len(part.chunks)} chunk(s) of {chunk} windows "
                         f"({nsamples} windows): pass --chunk-windows {max(1, nsamples // ranks.world)} or fewer, "
                         "or start fewer processes")
    if ranks.many:
        log.info("rank %d of %d: %d of %d windows (chunks of %d, %d chunks)", ranks.rank, ranks.world,
                 part.nlocal, nsamples, chunk, len(part.chunks))
    return part
