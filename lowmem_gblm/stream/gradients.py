"""The gradient sweep (GBLM): per-sample full-model gradient norms of every decoder linear, streamed.

For each calibration window n (batch size 1) the loss is the mean next-token cross-entropy over
its T-1 predicted positions (labels = inputs), g_n = dL_n/dW for every nn.Linear weight inside the
decoder blocks, and

    G = sum_n |g_n|          (l1, default)
    G = sqrt(sum_n g_n^2)    (l2)

accumulated in fp32. This is the exact full-model gradient of the published method, computed
without holding the model:

1. forward: embed the windows and run every block under no_grad, keeping each block's *input*
   (the boundaries) in an activation store (RAM or disk);
2. head: final norm + lm_head per sample, fp32 logits and loss; the gradient w.r.t. the last
   hidden state is the incoming gradient of the last block;
3. reverse walk: load block i, recompute its forward from the stored input (gradient
   checkpointing), backpropagate the incoming gradient one sample per backward call, add each
   sample's weight gradients into fp32 accumulators; x.grad is the incoming gradient of block i-1.

A gradient folder holds ``block_{i:05d}.safetensors`` (finished G, keyed by checkpoint weight
names) and ``gradients.json`` (identity, done blocks with sha256, complete flag). It is resumable
per block: after block i's file is durable, the incoming gradient of block i-1 is persisted under
the folder's state dir, then block i is recorded done. A rerun recomputes the forward boundaries
it still needs and continues from the persisted gradient.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from lowmem_gblm.config import GRAD_DTYPES as GRAD_DTYPE_NAMES
from lowmem_gblm.config import diff_dicts
from lowmem_gblm.errors import InputError, ResumeMismatch
from lowmem_gblm.io.checkpoint import read_header, read_tensors
from lowmem_gblm.io.model import StreamedModel, linear_names
from lowmem_gblm.io.prefetch import BlockReader
from lowmem_gblm.io.writer import STATE_DIR, OutputLock, atomic_write_text, file_sha256, fsync_dir, save_tensors_atomic
from lowmem_gblm.memory.tracker import PhaseStats, PhaseTracker, fmt_bytes, limit_heap_retention
from lowmem_gblm.pipeline import Progress
from lowmem_gblm.stream.context import BlockContext, run_block
from lowmem_gblm.stream.store import ActivationBuffer, ActivationStore
from lowmem_gblm.testing_hooks import crash_point

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GRADIENTS_JSON = "gradients.json"
CALIB_IDS_NAME = "calibration_ids.safetensors"
INCOMING_NAME = "incoming.safetensors"  # in the state dir: dL/d(input of the next block to do)
ACC_DTYPE = torch.float32  # gradient accumulators, logits and loss: fp32 whatever the compute dtype
# identity fields a reused folder must match (compute dtype / device type may differ); store_dtype
# is in an identity only when not "auto", so folders made before it existed still match
REUSE_KEYS = ("format_version", "model", "calibration_sha256", "nsamples", "seqlen", "grad_norm", "store_dtype",
              "grad_dtype")
# dtypes the finished gradient norms may be written in (accumulation is fp32 either way); bfloat16 halves
# the files (the sweep's largest disk use: 4 bytes per linear weight) at ~3 significant digits
GRAD_DTYPES = {name: getattr(torch, name) for name in GRAD_DTYPE_NAMES}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def block_file(i: int) -> str:
    return f"block_{i:05d}.safetensors"


def ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of the calibration windows as int64 bytes (the same as the prune manifest's)."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def gradient_identity(model: StreamedModel, ids: torch.Tensor, grad_norm: str, dtype: torch.dtype,
                      device: torch.device, store_dtype: str = "auto", grad_dtype: str = "float32") -> dict:
    lossy = {} if store_dtype == "auto" else {"store_dtype": store_dtype}  # it changes the gradients
    if grad_dtype != "float32":
        lossy["grad_dtype"] = grad_dtype
    return lossy | {
        "format_version": FORMAT_VERSION,
        "model": model.index.fingerprint(),
        "calibration_sha256": ids_sha256(ids),
        "nsamples": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]),
        "grad_norm": grad_norm,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "device_type": device.type,
    }


# ---------------------------------------------------------------------------------------------
# the folder


@dataclass
class GradientFolder:
    """A folder of per-block gradient norms plus ``gradients.json``."""

    path: Path
    data: dict

    @property
    def state(self) -> Path:
        return self.path / STATE_DIR

    @property
    def identity(self) -> dict:
        return self.data["identity"]

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @classmethod
    def load(cls, path: Path) -> GradientFolder | None:
        meta = path / GRADIENTS_JSON
        if not meta.is_file():
            return None
        try:
            return cls(path, json.loads(meta.read_text()))
        except json.JSONDecodeError as exc:
            raise InputError(f"{meta} is not valid JSON; remove the folder and compute the gradients again") from exc

    @classmethod
    def open_for_sweep(cls, path: Path, identity: dict) -> GradientFolder:
        """The folder to write: resume a matching one, start a new one, refuse anything else."""
        folder = cls.load(path)
        if folder is None:
            leftovers = [p.name for p in path.iterdir() if p.name not in (STATE_DIR, CALIB_IDS_NAME)]
            if leftovers:
                raise InputError(
                    f"gradient folder {path} is not empty and holds no {GRADIENTS_JSON} "
                    f"({', '.join(sorted(leftovers)[:3])}...); choose an empty folder"
                )
            folder = cls(path, {"identity": identity, "done": {}, "complete": False})
            folder.save()
            return folder
        if folder.identity != identity:
            diffs = diff_dicts(folder.identity, identity)
            raise ResumeMismatch(
                f"gradient folder {path} holds gradients made with other settings ({'; '.join(diffs[:4])}); "
                "rerun with the same options to resume, or choose another folder"
            )
        return folder

    @classmethod
    def open_for_reuse(cls, path: Path, expected: dict) -> GradientFolder:
        """A finished folder whose identity matches ``expected`` on REUSE_KEYS."""
        if not path.is_dir():
            raise InputError(f"--gradients {path}: no such folder")
        folder = cls.load(path)
        if folder is None:
            raise InputError(
                f"--gradients {path}: not a gradient folder (no {GRADIENTS_JSON}); "
                "create one with: lowmem-gblm gradients MODEL_DIR GRAD_DIR"
            )
        old = {k: folder.identity.get(k) for k in REUSE_KEYS}
        new = {k: expected.get(k) for k in REUSE_KEYS}
        if old != new:
            diffs = diff_dicts(old, new)
            raise ResumeMismatch(
                f"--gradients {path} was computed with other settings ({'; '.join(diffs[:4])}); "
                "pass matching --grad-norm/--calib/--nsamples/--seqlen/--seed/--store-dtype (or --calib-ids "
                f"{path / CALIB_IDS_NAME}), or drop --gradients to compute them"
            )
        if not folder.complete:
            raise InputError(
                f"--gradients {path} is incomplete ({len(folder.data['done'])} blocks done); "
                "rerun the same lowmem-gblm gradients command to finish it"
            )
        return folder

    def save(self) -> None:
        atomic_write_text(self.path / GRADIENTS_JSON, json.dumps(self.data, sort_keys=True, indent=1))

    def is_done(self, i: int) -> bool:
        entry = self.data["done"].get(str(i))
        if entry is None:
            return False
        file = self.path / entry["file"]
        return file.is_file() and file.stat().st_size == entry["size"]

    def mark_done(self, i: int, sha256: str, tensors: dict[str, str] | None = None) -> None:
        """Record block i's file: its sha256 and size, and (``tensors``) the sha256 of each tensor's bytes,
        which lets ``read`` check a tensor as it reads it instead of reading the whole file twice."""
        file = block_file(i)
        entry = {"file": file, "sha256": sha256, "size": (self.path / file).stat().st_size}
        if tensors is not None:
            entry["tensors"] = tensors
        self.data["done"][str(i)] = entry
        self.save()

    def read(self, i: int) -> BlockGradients:
        """Block i's G tensors {full weight name: [out, in] fp32 CPU}, checked against the recorded sha256;
        each tensor is read when it is looked up (one linear's G in memory at a time)."""
        entry = self.data["done"].get(str(i))
        if entry is None:
            raise InputError(f"gradient folder {self.path}: block {i} is missing; compute the gradients again")
        file = self.path / entry["file"]
        per_tensor = entry.get("tensors")
        if not file.is_file() or file.stat().st_size != entry["size"] or (
                per_tensor is None and file_sha256(file) != entry["sha256"]):
            raise _changed(self.path, entry["file"])
        return BlockGradients(file, per_tensor, self.path)

    def discard(self, i: int) -> None:
        """Delete block i's file (its entry stays, so hashes recorded elsewhere still match); the prune
        sweep calls this once block i's output shard is durable, so the folder shrinks as the output grows."""
        entry = self.data["done"].get(str(i))
        if entry is not None:
            (self.path / entry["file"]).unlink(missing_ok=True)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a CPU tensor's bytes (any dtype)."""
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _changed(folder: Path, file: str) -> InputError:
    return InputError(f"gradient folder {folder}: {file} is missing or changed since it was written; "
                      "compute the gradients again")


class BlockGradients(Mapping):
    """One block's gradient file as a read-on-lookup mapping: name -> fp32 CPU tensor (bfloat16 files are
    widened). Lookups go through the checkpoint's read path (finite check included) and, when the folder
    recorded them, are checked against each tensor's sha256 as they are read."""

    def __init__(self, file: Path, sha256: dict[str, str] | None = None, folder: Path | None = None):
        self.file, self.sha256, self.folder = file, sha256, folder or file.parent
        self._names = tuple(k for k in read_header(file) if k != "__metadata__")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        t = read_tensors(self.file, [name])[name]
        if self.sha256 is not None and self.sha256.get(name) != tensor_sha256(t):
            raise _changed(self.folder, self.file.name)
        return t.float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ---------------------------------------------------------------------------------------------
# persisted incoming gradient (streamed safetensors: one sample in memory at a time)


def _persist_incoming(path: Path, buf: ActivationBuffer, block: int) -> None:
    """Write ``buf`` [N, T, D] as a safetensors file {"grad"} with metadata block=<block>, atomically."""
    n, t, d = buf.shape
    nbytes = buf.nbytes
    header = {"__metadata__": {"format": "pt", "block": str(block)},
              "grad": {"dtype": _ST_DTYPE[buf.dtype], "shape": [n, t, d], "data_offsets": [0, nbytes]}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in range(n):
            f.write(buf.get(k).contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _restore_incoming(path: Path, buf: ActivationBuffer, block: int) -> bool:
    """Fill ``buf`` from a persisted incoming gradient for ``block``; False if there is none that fits."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("block") != str(block):
                return False
            grad = f.get_slice("grad")
            if list(grad.get_shape()) != list(buf.shape):
                return False
            for k in range(len(buf)):
                buf.put(k, grad[k:k + 1])
    except Exception:  # a torn or foreign file: recompute from the head
        return False
    return True


# ---------------------------------------------------------------------------------------------
# the sweep


def _accumulate(acc: torch.Tensor, grad: torch.Tensor, grad_norm: str) -> None:
    """acc (fp32) += |g| or g*g. A 16-bit g is widened inside the op (exact), not copied to fp32 first."""
    if grad_norm == "l1":
        acc.add_(grad.abs())
    else:
        acc.addcmul_(grad, grad)


def _finish(acc: torch.Tensor, grad_norm: str) -> torch.Tensor:
    return acc if grad_norm == "l1" else acc.sqrt_()


def as_leaf(sample: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A stored sample [1, T, D] as a fresh leaf on ``device`` that requires grad (always a copy)."""
    return sample.to(device=device, dtype=dtype, copy=True).requires_grad_(True)


# The two per-sample steps below are the whole device-side work of the sweep; the planner
# (memory.planner.probe) runs these same functions on fake tensors to predict their peaks.


def head_sample(norm, head: torch.Tensor, sample: torch.Tensor, labels: torch.Tensor, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One window through the final norm and the head. sample: [1, T, D] (stored), labels: [T-1] (on device).

    Returns (mean next-token loss, fp32 scalar; dL/dh [1, T, D] in ``dtype``). Every other tensor
    (fp32 logits [1, T, V], log-softmax, their gradients) is freed when this returns.
    """
    h = as_leaf(sample, device, dtype)  # [1, T, D]
    with torch.enable_grad():
        logits = F.linear(norm(h), head).to(ACC_DTYPE)  # [1, T, V] fp32
        loss = F.cross_entropy(logits[0, :-1], labels)  # mean over the T-1 predicted positions
        del logits
        loss.backward()
    return loss.detach(), h.grad


def block_sample(block, ctx: BlockContext, weights: dict[str, torch.Tensor], accs: dict[str, torch.Tensor],
                 sample: torch.Tensor, incoming: torch.Tensor, grad_norm: str, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Recompute one sample's block forward (gradient checkpointing), backpropagate ``incoming``
    (dL/d output [1, T, D]), fold each weight's gradient into its fp32 accumulator.

    Each weight's gradient is folded and dropped as soon as backward has produced it (a post-accumulate
    hook), so at most one linear's gradient is alive at a time, not the whole block's.
    weights / accs: linear name -> weight (requires grad) / accumulator. Returns dL/d input [1, T, D].
    """
    x = as_leaf(sample, device, dtype)  # [1, T, D]
    hooks = [w.register_post_accumulate_grad_hook(partial(_fold, accs[name], grad_norm))
             for name, w in weights.items()]
    try:
        with torch.enable_grad():
            y = run_block(block, ctx, x)  # recompute
            y.backward(incoming.to(device=device, dtype=y.dtype))
        del y
    finally:
        for hook in hooks:
            hook.remove()
    return x.grad


def _fold(acc: torch.Tensor, grad_norm: str, weight: torch.Tensor) -> None:
    _accumulate(acc, weight.grad, grad_norm)
    weight.grad = None


def gradient_sweep(model: StreamedModel, ids: torch.Tensor, path: Path, *, grad_norm: str, device: torch.device,
                   dtype: torch.dtype, offload: str = "cpu", progress: bool = True, store_dtype: str = "auto",
                   prefetch: bool = True, grad_dtype: str = "float32") -> GradientFolder:
    """Compute (or resume, or find finished) the gradient folder at ``path``. ids: [N, T].

    ``store_dtype`` applies to the stored block-input boundaries (int8: lossy); the incoming-gradient
    buffers stay exact in the compute dtype. ``prefetch`` reads the next block on a background thread.
    ``grad_dtype``: the dtype the finished norms are written in (float32 exact, bfloat16 half the disk).
    """
    path.mkdir(parents=True, exist_ok=True)
    identity = gradient_identity(model, ids, grad_norm, dtype, device, store_dtype, grad_dtype)
    with OutputLock(path):
        folder = GradientFolder.open_for_sweep(path, identity)
        if folder.complete:
            log.info("gradient folder %s is complete; reusing it", path)
            return folder
        _sweep(folder, model, ids, grad_norm, device, dtype, offload, progress, store_dtype, prefetch,
               GRAD_DTYPES[grad_dtype])
        shutil.rmtree(folder.state / "store", ignore_errors=True)
        (folder.state / INCOMING_NAME).unlink(missing_ok=True)
        folder.data["complete"] = True
        folder.save()
    return folder


def _sweep(folder: GradientFolder, model: StreamedModel, ids: torch.Tensor, grad_norm: str, device: torch.device,
           dtype: torch.dtype, offload: str, progress: bool, store_dtype: str = "auto", prefetch: bool = True,
           file_dtype: torch.dtype = ACC_DTYPE) -> None:
    nblocks, (nsamples, seqlen) = model.num_blocks, ids.shape
    shape = (nsamples, seqlen, model.hidden_size)
    store = ActivationStore(offload, folder.state / "store", store_dtype)
    incoming = folder.state / INCOMING_NAME
    g_in, g_out = store.new(shape, dtype, "grad_a", exact=True), store.new(shape, dtype, "grad_b", exact=True)

    # where to start: blocks start..L-1 are done and the gradient into block start-1 is persisted
    start = nblocks
    while start > 0 and folder.is_done(start - 1):
        start -= 1
    if 0 < start < nblocks and not _restore_incoming(incoming, g_in, start - 1):
        log.warning("gradient folder %s: no usable incoming gradient for block %d; starting from the head",
                    folder.path, start - 1)
        start = nblocks
    if start == 0:
        return
    log.info("gradient sweep: %d/%d blocks to do, %d windows x %d tokens, %s norm, compute %s on %s "
             "(logits, loss and accumulators fp32), store %s (%s)", start, nblocks, nsamples, seqlen, grad_norm,
             str(dtype).removeprefix("torch."), device, offload, store_dtype)
    if start < nblocks:
        log.info("resuming the gradient sweep at block %d in %s", start - 1, folder.path)
    ctx = BlockContext.build(model, seqlen, device, dtype)

    # 1. forward: bounds[i] = input of block i, for every block still to do (and the head's input)
    last = nblocks if start == nblocks else start - 1  # highest boundary needed
    # blocks 0..last-1 forward, then start-1..0 in reverse; the next one is read while one computes
    schedule = [(i, None) for i in range(last)] + [(i, None) for i in range(start - 1, -1, -1)]
    with BlockReader(model, schedule, device, dtype, prefetch) as reader:
        _walk(folder, model, ids, grad_norm, device, dtype, progress, reader, ctx, store, shape, start, last,
              g_in, g_out, file_dtype)


def _walk(folder: GradientFolder, model: StreamedModel, ids: torch.Tensor, grad_norm: str, device: torch.device,
          dtype: torch.dtype, progress: bool, reader: BlockReader, ctx: BlockContext, store: ActivationStore,
          shape: tuple[int, int, int], start: int, last: int, g_in: ActivationBuffer, g_out: ActivationBuffer,
          file_dtype: torch.dtype = ACC_DTYPE) -> None:
    nblocks, nsamples = model.num_blocks, ids.shape[0]
    incoming = folder.state / INCOMING_NAME
    bounds = [store.new(shape, dtype, f"h{i:05d}") for i in range(last + 1)]
    table, local = model.load_embedding_rows(ids, torch.device("cpu"), dtype)  # [U, D]: the rows ids use
    for n in range(nsamples):
        bounds[0].put(n, F.embedding(local[n:n + 1], table))
    del table
    fwd = Progress("gradient forward", last, progress)
    with torch.no_grad():
        for i in range(last):
            block = reader.next(i)
            for n in range(nsamples):
                bounds[i + 1].put(n, run_block(block, ctx, bounds[i].get(n).to(device=device, dtype=dtype)))
            del block
            fwd.step(f"block {i}")

    # 2. head: per-sample loss and dL/d(last hidden state)
    if start == nblocks:
        norm, head = model.load_head(device, dtype)  # head: [V, D]
        losses = []
        for n in range(nsamples):
            loss, grad = head_sample(norm, head, bounds[nblocks].get(n), ids[n, 1:].to(device), device, dtype)
            g_in.put(n, grad)
            losses.append(float(loss))
            del loss, grad
        del norm, head
        bounds[nblocks].release()
        folder.data["mean_loss"] = sum(losses) / len(losses)
        log.info("gradient sweep: mean calibration loss %.4f", folder.data["mean_loss"])

    # 3. reverse walk
    bwd = Progress("gradients", start, progress)
    for i in range(start - 1, -1, -1):
        block = reader.next(i)
        modules = dict(block.named_modules())
        names = linear_names(block)
        for name in names:
            modules[name].weight.requires_grad_(True)
        accs = {name: torch.zeros(modules[name].weight.shape, dtype=ACC_DTYPE, device=device) for name in names}
        weights = {name: modules[name].weight for name in names}
        for n in range(nsamples):
            g_out.put(n, block_sample(block, ctx, weights, accs, bounds[i].get(n), g_in.get(n), grad_norm,
                                      device, dtype))
        del weights, modules, block  # the weights go before the accumulators are finished and written
        prefix = model.family.block_prefix(i)
        tensors = {}
        for name in names:  # one accumulator at a time: an fp32 one is dropped once its file copy exists
            acc = accs.pop(name)
            tensors[f"{prefix}{name}.weight"] = _finish(acc, grad_norm).to(file_dtype).cpu()
            del acc
        sha = save_tensors_atomic(folder.path / block_file(i), tensors)
        hashes = {name: tensor_sha256(t) for name, t in tensors.items()}
        del tensors
        if i > 0:
            g_out.flush()
            _persist_incoming(incoming, g_out, i - 1)
        folder.mark_done(i, sha, hashes)
        crash_point("gradient_block")  # after block i (reverse order) is durable
        bounds[i].release()
        g_in, g_out = g_out, g_in
        bwd.step(f"block {i} written")
    g_in.release()
    g_out.release()


# ---------------------------------------------------------------------------------------------
# entry points


def compute_gradients(config) -> dict:
    """``lowmem-gblm gradients``: the sweep alone into ``config.out_dir`` (a GradientConfig)."""
    from lowmem_gblm.calib.data import resolve_windows
    from lowmem_gblm.io.writer import prepare_out_dir
    from lowmem_gblm.runtime import resolve_device, resolve_dtype, storage_dtype

    limit_heap_retention()
    model_dir, out = Path(config.model_dir), Path(config.out_dir)
    model = StreamedModel.open(model_dir)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    ids = resolve_windows(config.calib, model_dir, int(model.config.vocab_size), max_pos)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, storage_dtype(model.index.tensors[model.block_names(0)[0]].dtype))
    from lowmem_gblm.memory.check import plan_run, predicted_block

    offload, plan = plan_run(model_dir, "gblm", tuple(ids.shape), device, dtype, config.offload, out,
                             ("gradient_sweep",), cpu_memory=config.cpu_memory, gpu_memory=config.gpu_memory,
                             check=config.plan_check, store_dtype=config.store_dtype, grad_dtype=config.grad_dtype,
                             prefetch=config.prefetch)
    prepare_out_dir(out, model_dir, overwrite=False)
    with PhaseTracker("gradient_sweep", device) as tracker:
        folder = gradient_sweep(model, ids, out, grad_norm=config.grad_norm, device=device, dtype=dtype,
                                offload=offload, progress=config.progress, store_dtype=config.store_dtype,
                                prefetch=config.prefetch, grad_dtype=config.grad_dtype)
    calib_path = out / CALIB_IDS_NAME
    if not calib_path.is_file():
        save_tensors_atomic(calib_path, {"input_ids": ids.contiguous()})
    _log_phase(tracker.stats, out)
    return {"folder": str(out), "identity": folder.identity, "blocks": len(folder.data["done"]),
            "mean_loss": folder.data.get("mean_loss"), "phase": tracker.stats.to_dict(),
            "offload": offload, "predicted": predicted_block(plan)}


@dataclass
class GradientFeed:
    """What the prune sweep sees of a gradient folder: ``read(i)`` block i's G tensors {full weight
    name: [out, in] fp32 CPU}; ``consumed(i)`` once block i's output shard is durable. A run's own
    folder (OUT_DIR/.lowmem/gradients) then drops block i's file, so gradients and output never take
    their full sizes on disk at once; a ``--gradients`` folder is the user's and is never touched."""

    folder: GradientFolder
    private: bool

    def read(self, i: int) -> BlockGradients:
        return self.folder.read(i)

    def consumed(self, i: int) -> None:
        if self.private:
            self.folder.discard(i)


def gradient_source(session, manifest) -> GradientFeed:
    """For the prune pipeline: the gradient feed of this run.

    ``--gradients DIR`` reuses a finished folder with a matching identity; otherwise the sweep
    runs (or resumes) into OUT_DIR/.lowmem/gradients. The folder's identity and block hashes are
    recorded in the prune manifest, so a resumed prune refuses gradients that changed under it.
    """
    config, model = session.config, session.model
    identity = gradient_identity(model, session.ids, config.grad_norm, session.dtype, session.device,
                                 config.store_dtype, config.grad_dtype)
    if config.gradients:
        folder = GradientFolder.open_for_reuse(Path(config.gradients), identity)
        log.info("using gradients from %s (%s norm, computed in %s on %s)", folder.path,
                 folder.identity["grad_norm"], folder.identity.get("compute_dtype"), folder.identity.get("device_type"))
    else:
        with PhaseTracker("gradient_sweep", session.device) as tracker:
            folder = gradient_sweep(model, session.ids, session.out / STATE_DIR / "gradients",
                                    grad_norm=config.grad_norm, device=session.device, dtype=session.dtype,
                                    offload=session.store.kind, progress=config.progress,
                                    store_dtype=config.store_dtype, prefetch=config.prefetch,
                                    grad_dtype=config.grad_dtype)
        session.phases.append(tracker.stats)
        _log_phase(tracker.stats, folder.path)
    record = {"identity": {k: folder.identity[k] for k in REUSE_KEYS if k in folder.identity},
              "sha256": {k: v["sha256"] for k, v in sorted(folder.data["done"].items())}}
    old = manifest.data.get("gradients")
    if old is not None and old != record:
        raise ResumeMismatch(
            f"OUT_DIR {session.out} was being pruned with other gradients ({'; '.join(diff_dicts(old, record)[:3])}); "
            "pass the same --gradients folder to resume, or --overwrite to start over"
        )
    if old is None:
        manifest.data["gradients"] = record
        manifest.save()
    return GradientFeed(folder, private=not config.gradients)


def _log_phase(stats: PhaseStats, where: Path) -> None:
    log.info("gradient sweep -> %s: %.1f s, peak RSS %s, device peak %s", where, stats.seconds,
             fmt_bytes(stats.peak_rss_bytes), fmt_bytes(stats.device_peak_allocated_bytes))
