"""The one orchestration loop: plan -> (gradient sweep) -> prune sweep -> finalize.

Blocks stream from disk one at a time; calibration hidden states live in the activation store;
each pruned block is written to its own shard and recorded in the manifest before the next starts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lowmem_gblm.calib.data import resolve_windows
from lowmem_gblm.config import PruneConfig, diff_dicts
from lowmem_gblm.errors import InputError, ResumeMismatch
from lowmem_gblm.io.model import StreamedModel, linear_names
from lowmem_gblm.io.prefetch import BlockReader
from lowmem_gblm.io.writer import (
    INDEX_NAME,
    STATE_DIR,
    Manifest,
    OutputLock,
    atomic_write_text,
    copy_side_files,
    prepare_out_dir,
    remove_stale_temps,
    save_tensors_atomic,
    shard_name,
)
from lowmem_gblm.memory.tracker import PhaseStats, PhaseTracker, fmt_bytes, limit_heap_retention
from lowmem_gblm.methods import LinearJob, get_method
from lowmem_gblm.runtime import resolve_device, resolve_dtype, storage_dtype
from lowmem_gblm.stream.context import BlockContext, run_block
from lowmem_gblm.stream.stats import STATISTICS, collect_inputs
from lowmem_gblm.stream.store import ActivationBuffer, ActivationStore
from lowmem_gblm.testing_hooks import crash_point

log = logging.getLogger(__name__)

CALIB_IDS_NAME = "calibration_ids.safetensors"
REPORT_NAME = "prune_report.json"


@dataclass
class Session:
    """Runtime objects of one run (not options: those are in ``config``)."""

    config: PruneConfig
    model: StreamedModel
    device: torch.device
    dtype: torch.dtype
    ids: torch.Tensor  # [N, T] calibration windows
    out: Path
    store: ActivationStore
    phases: list[PhaseStats] = field(default_factory=list)

    @property
    def ctx(self) -> BlockContext:
        if not hasattr(self, "_ctx"):
            self._ctx = BlockContext.build(self.model, self.ids.shape[1], self.device, self.dtype)
        return self._ctx

    def new_buffer(self, name: str) -> ActivationBuffer:
        n, t = self.ids.shape
        return self.store.new((n, t, self.model.hidden_size), self.dtype, name)


class Progress:
    """blocks done / total with a rate and an ETA, logged."""

    def __init__(self, what: str, total: int, enabled: bool = True):
        self.what, self.total, self.enabled = what, total, enabled
        self.done, self.t0, self.worked = 0, time.perf_counter(), 0

    def step(self, label: str, replayed: bool = False) -> None:
        self.done += 1
        if not replayed:
            self.worked += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / max(self.done, 1)
        eta = rate * (self.total - self.done)
        log.info("%s %d/%d %s (%.2f s/block, ETA %.0f s)", self.what, self.done, self.total, label, rate, eta)


# ---------------------------------------------------------------------------------------------
# streamed forward over the store


def embed_windows(session: Session, dst: ActivationBuffer) -> None:
    """ids [N, T] -> hidden [N, T, D] in the store; only the embedding is loaded."""
    table, local = session.model.load_embedding_rows(session.ids, torch.device("cpu"), session.dtype)  # [U, D]
    for n in range(session.ids.shape[0]):
        dst.put(n, F.embedding(local[n:n + 1], table))
    del table


@torch.no_grad()
def forward_all(session: Session, block, src: ActivationBuffer, dst: ActivationBuffer | None) -> None:
    """Run every sample through ``block``, ``batch_size`` per call (default 1); write outputs to ``dst``
    (None: statistics only)."""
    step = session.config.batch_size
    for n in range(0, len(src), step):
        count = min(step, len(src) - n)
        x = src.get(n, count).to(device=session.device, dtype=session.dtype)  # [B, T, D]
        y = run_block(block, session.ctx, x)
        if dst is not None:
            dst.put(n, y)


# ---------------------------------------------------------------------------------------------
# pruning one block


def prune_block(session: Session, block, i: int, src: ActivationBuffer, grads: dict | None) -> tuple[dict, dict]:
    """Collect statistics on the dense block, prune every linear in place.

    Returns (tensors to write under their checkpoint names in the stored dtypes, per-linear report).
    """
    config, model = session.config, session.model
    method = get_method(config.method)
    pattern = config.parsed_pattern
    prefix = model.family.block_prefix(i)
    names = linear_names(block)
    modules = dict(block.named_modules())
    wanted = frozenset(s for s in method.needs if s in STATISTICS)
    with collect_inputs(block, names, wanted) as accs:
        if wanted:
            forward_all(session, block, src, None)
    raw = original_tensors(model, block, i, session.dtype)  # stored bytes, for exact unchanged tensors
    nsamples = session.ids.shape[0]
    report = {}
    for name in names:
        linear = modules[name]
        full = f"{prefix}{name}.weight"
        stats = {s: accs[name][s].result(nsamples) for s in wanted}
        if "gradient" in method.needs:
            stats["gradient"] = grads[full].to(session.device)
        accs[name].clear()
        job = LinearJob(full, linear.weight.data, stats, pattern, config)
        keep = method.prune(job)
        if method.updates_weights:
            written = job.weight.to(raw[full].dtype).cpu()
        else:
            written = raw[full].masked_fill(~keep.cpu(), 0)
        raw[full] = written
        linear.weight.data.copy_(written.to(session.device, session.dtype))  # next block sees what is written
        zeros = int((written == 0).sum())
        report[full] = {"shape": list(written.shape), "zeros": zeros, "sparsity": zeros / written.numel()}
        del stats, job, keep
    return raw, report


# dtypes that hold every value of a stored dtype exactly (a cast back gives the stored bytes)
_EXACT_WIDENING = {torch.float32: {torch.float32, torch.bfloat16, torch.float16}}


def original_tensors(model: StreamedModel, block, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Block i's tensors as the checkpoint stores them {full name: CPU tensor}, before any pruning.

    When the compute dtype holds every stored value exactly (the same dtype, or fp32 over bf16/fp16)
    they are cast back from the block already loaded, so the prune sweep reads each block once;
    otherwise (e.g. an fp32 checkpoint computed in bf16) they are read from the checkpoint again.
    """
    names = model.block_names(i)
    stored = {n: storage_dtype(model.index.tensors[n].dtype) for n in names}
    if not all(s == dtype or s in _EXACT_WIDENING.get(dtype, ()) for s in stored.values()):
        return model.index.read(names)
    prefix = model.family.block_prefix(i)
    state = block.state_dict()
    return {n: state[n[len(prefix):]].detach().to(device="cpu", dtype=stored[n], copy=True) for n in names}


def run_prune_sweep(session: Session, manifest: Manifest, grads) -> dict:
    """Front to back: statistics, prune, forward the pruned block, write its shard, mark it done."""
    model, out = session.model, session.out
    total_shards = model.num_blocks + 1
    src, dst = session.new_buffer("h_a"), session.new_buffer("h_b")
    embed_windows(session, src)
    progress = Progress("prune", model.num_blocks, session.config.progress)
    linears: dict[str, dict] = {}
    # finished blocks replay from their own shards; the rest read from the input checkpoint
    schedule = [(i, out / shard_name(i, total_shards) if manifest.is_done(f"block.{i}") else None)
                for i in range(model.num_blocks)]
    with BlockReader(model, schedule, session.device, session.dtype, session.config.prefetch) as reader:
        return _prune_blocks(session, manifest, grads, reader, src, dst, progress, linears)


def _prune_blocks(session: Session, manifest: Manifest, grads, reader: BlockReader, src: ActivationBuffer,
                  dst: ActivationBuffer, progress: Progress, linears: dict) -> dict:
    model, out = session.model, session.out
    total_shards = model.num_blocks + 1
    for i in range(model.num_blocks):
        key, file = f"block.{i}", shard_name(i, total_shards)
        block = reader.next(i)
        if manifest.is_done(key):
            forward_all(session, block, src, dst)
            linears.update(manifest.entry(key)["linears"])
            del block
            src, dst = dst, src
            progress.step("replayed from its shard", replayed=True)
            continue
        tensors, report = prune_block(session, block, i, src, grads.read(i) if grads else None)
        forward_all(session, block, src, dst)
        del block
        sha = save_tensors_atomic(out / file, tensors)
        crash_point("manifest")
        manifest.mark_done(key, file, sha, {"linears": report, "names": sorted(tensors)})
        if grads:
            grads.consumed(i)
        crash_point("block_done")
        linears.update(report)
        del tensors
        src, dst = dst, src
        progress.step("pruned")
    for buf in (src, dst):
        buf.release()
    return linears


def write_non_block_shard(session: Session, manifest: Manifest) -> None:
    model = session.model
    key, file = "rest", shard_name(model.num_blocks, model.num_blocks + 1)
    if manifest.is_done(key):
        return
    names = model.non_block_names()
    tensors = model.index.read(names)
    sha = save_tensors_atomic(session.out / file, tensors)
    crash_point("manifest")
    manifest.mark_done(key, file, sha, {"names": sorted(names)})


def finalize(session: Session, manifest: Manifest, linears: dict, report_extra: dict) -> dict:
    out, model = session.out, session.model
    weight_map, total_size = {}, 0
    for _key, entry in sorted(manifest.data["done"].items()):
        if "names" not in entry:
            continue
        for name in entry["names"]:
            weight_map[name] = entry["file"]
        total_size += model.index.nbytes(entry["names"])
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    copy_side_files(model.root, out)
    zeros = sum(r["zeros"] for r in linears.values())
    numel = sum(_numel(r["shape"]) for r in linears.values())
    report = {
        "method": session.config.method,
        "options": session.config.to_dict(),
        "pattern": str(session.config.parsed_pattern),
        "device": str(session.device),
        "compute_dtype": str(session.dtype).removeprefix("torch."),
        "calibration": {"windows": list(session.ids.shape), "sha256": _ids_sha(session.ids)},
        "sparsity": {"overall": zeros / max(numel, 1), "zeros": zeros, "numel": numel, "per_linear": linears},
        "phases": [p.to_dict() for p in session.phases],
        "versions": _versions(),
        **report_extra,
    }
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=1, sort_keys=True))
    crash_point("finalize")
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True))  # last: marks complete
    manifest.data["complete"] = True
    manifest.save()
    return report


# ---------------------------------------------------------------------------------------------
# entry point


def prune(config: PruneConfig) -> dict:
    """Prune ``config.model_dir`` into ``config.out_dir``; resume if a matching run is there."""
    t_start = time.perf_counter()
    limit_heap_retention()
    model_dir, out = Path(config.model_dir), Path(config.out_dir)
    model = StreamedModel.open(model_dir)
    method = get_method(config.method)
    pattern = config.parsed_pattern
    block0 = model.build_block(0)
    for name in linear_names(block0):
        pattern.check_columns(dict(block0.named_modules())[name].in_features, name)
    del block0
    max_pos = getattr(model.config, "max_position_embeddings", None)
    ids = resolve_windows(config.calib, model_dir, int(model.config.vocab_size), max_pos)
    if max_pos is not None and ids.shape[1] > max_pos:
        raise InputError(f"--seqlen {ids.shape[1]} exceeds the model's context ({max_pos} positions)")
    device = resolve_device(config.device)
    ckpt_dtype = storage_dtype(model.index.tensors[model.block_names(0)[0]].dtype)
    dtype = resolve_dtype(config.dtype, device, ckpt_dtype)
    offload, predicted = _plan_check(config, model_dir, method, ids, device, dtype, out)
    prepare_out_dir(out, model_dir, overwrite=False)
    with OutputLock(out):
        stale = remove_stale_temps(out)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted run: %s", len(stale), ", ".join(stale))
        if config.overwrite:
            _clear_out_dir(out)
        identity = {
            "config": config.fingerprint_dict(),
            "model": model.index.fingerprint(),
            "calibration_sha256": _ids_sha(ids),
            "device_type": device.type,
            "compute_dtype": str(dtype),
        }
        manifest = _open_manifest(out, identity)
        if manifest.data.get("complete") and (out / INDEX_NAME).is_file():
            log.info("%s is already complete (same options and model); nothing to do", out)
            return json.loads((out / REPORT_NAME).read_text())
        calib_path = out / CALIB_IDS_NAME
        if not calib_path.is_file():
            save_tensors_atomic(calib_path, {"input_ids": ids.contiguous()})
        store = ActivationStore(offload, out / STATE_DIR / "store", config.store_dtype)
        session = Session(config, model, device, dtype, ids, out, store)
        log.info("%s: %d blocks, %s, %d windows x %d tokens, method %s, pattern %s, store %s",
                 model_dir, model.num_blocks, model.family.name, ids.shape[0], ids.shape[1],
                 method.name, pattern, offload)
        grads = None
        if "gradient" in method.needs:
            from lowmem_gblm.stream.gradients import gradient_source

            grads = gradient_source(session, manifest)
        write_non_block_shard(session, manifest)
        with PhaseTracker("prune_sweep", device) as tracker:
            linears = run_prune_sweep(session, manifest, grads)
        session.phases.append(tracker.stats)
        report = finalize(session, manifest, linears, {"seconds_total": time.perf_counter() - t_start,
                                                         "offload": offload, "predicted": predicted})
        _cleanup_state(out)
    s = report["sparsity"]
    log.info("done: %s, sparsity %.4f over %d linears, prune sweep %.1f s, peak RSS %s", out, s["overall"],
             len(linears), tracker.stats.seconds, fmt_bytes(tracker.stats.peak_rss_bytes))
    return report


def _plan_check(config: PruneConfig, model_dir: Path, method, ids, device, dtype, out: Path) -> tuple[str, dict]:
    """The planner on this run's settings and this machine's free memory: (store to use, prediction)."""
    from lowmem_gblm.memory.check import plan_run, predicted_block

    needs_sweep = "gradient" in method.needs and not config.gradients
    phases = ("gradient_sweep", "prune_sweep") if needs_sweep else ("prune_sweep",)
    offload, plan = plan_run(model_dir, config.method, tuple(ids.shape), device, dtype, config.offload, out, phases,
                             batch_size=config.batch_size, cpu_memory=config.cpu_memory,
                             gpu_memory=config.gpu_memory, check=config.plan_check,
                             store_dtype=config.store_dtype, grad_dtype=config.grad_dtype, prefetch=config.prefetch)
    return offload, predicted_block(plan)


def _open_manifest(out: Path, identity: dict) -> Manifest:
    manifest = Manifest.load(out)
    if manifest is None:
        leftovers = [p.name for p in out.iterdir() if p.name != STATE_DIR]
        if leftovers:
            raise InputError(
                f"OUT_DIR {out} is not empty and holds no lowmem-gblm run ({', '.join(sorted(leftovers)[:3])}...); "
                "choose an empty folder or pass --overwrite"
            )
        return Manifest.new(out, identity)
    old = manifest.data.get("identity", {})
    if old != identity:
        diffs = diff_dicts(old, identity)
        changed = sorted({d.split(":")[0].removeprefix("model.") for d in diffs if d.startswith("model.")})
        if changed:
            raise ResumeMismatch(
                f"the input model changed since the run in {out} started ({', '.join(changed[:3])} differs in "
                "size, time or header); restore it, or pass --overwrite to start over with the new model"
            )
        raise ResumeMismatch(
            f"OUT_DIR {out} holds a run with other settings ({'; '.join(diffs[:4])}); "
            "rerun with the same options to resume, or pass --overwrite to start over"
        )
    done = sum(1 for k in manifest.data["done"] if k.startswith("block."))
    if done and not manifest.data.get("complete"):
        log.info("resuming: %d blocks already done in %s", done, out)
    return manifest


def _clear_out_dir(out: Path) -> None:
    for child in out.iterdir():
        if child.name == STATE_DIR:
            for sub in child.iterdir():
                if sub.name != "lock":
                    shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
        elif child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _cleanup_state(out: Path) -> None:
    shutil.rmtree(out / STATE_DIR / "store", ignore_errors=True)
    shutil.rmtree(out / STATE_DIR / "gradients", ignore_errors=True)  # fp32, model-sized: keep with `gradients`


def _ids_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _versions() -> dict:
    out = {}
    for pkg in ("lowmem-gblm", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
