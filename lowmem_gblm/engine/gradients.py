"""The gradient sweep (GBLM): per-sample full-model gradient norms of every decoder linear, streamed.

For each calibration window n the loss is the mean next-token cross-entropy over its T-1 predicted
positions (labels = inputs), g_n = dL_n/dW for every nn.Linear weight inside the decoder blocks, and
G = sum_n |g_n| (l1) or sqrt(sum_n g_n^2) (l2), accumulated in fp32. This is the exact full-model
gradient of the published method, computed without holding the model:

1. forward: embed the windows and run every block under no_grad, keeping each block's *input*
   (the boundaries) in the activation store (RAM or disk);
2. head: final norm + lm_head, --batch-size windows per call (stream.backward.head_windows), fp32 logits
   and losses; the gradient w.r.t. the last hidden state is the incoming gradient of the last block;
3. reverse walk: load block i, recompute its forward from the stored input and backpropagate the incoming
   gradient, --batch-size windows per call; each window's own weight gradient d_n^T x_n is formed from the
   linear's input and output gradient and folded into fp32 accumulators (stream.backward.block_windows);
   x.grad is the incoming gradient of block i-1.

The folder (io.gradfiles.GradientFolder) is resumable per block: after block i's file is durable, the
incoming gradient of block i-1 is persisted under the folder's state dir, then block i is recorded
done. A rerun recomputes the forward boundaries it still needs and continues from there.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from lowmem_gblm.config import CalibConfig, GradientConfig, RunConfig
from lowmem_gblm.engine.modality import adapter
from lowmem_gblm.engine.progress import PhaseProgress
from lowmem_gblm.engine.run import Run, open_model, open_run
from lowmem_gblm.errors import InputError, ResumeMismatch
from lowmem_gblm.io.gradfiles import BlockGradients, GradientFolder, block_file, tensor_sha256
from lowmem_gblm.io.prefetch import BlockReader
from lowmem_gblm.io.runstate import (
    CALIB_IDS_NAME,
    CALIB_PIXELS_NAME,
    CPU_THREADS,
    GRADIENTS_JSON,
    OWN_GRADIENTS,
    STATE_DIR,
    OutputLock,
    RunState,
    check_out_dir,
    diff_dicts,
    prepare_out_dir,
    with_defaults,
)
from lowmem_gblm.io.writer import file_sha256, save_tensors_atomic
from lowmem_gblm.options import named
from lowmem_gblm.runtime import dtype_name, named_dtype
from lowmem_gblm.stream.backward import block_windows, finish, grad_accumulators
from lowmem_gblm.stream.reduce import ChunkFold
from lowmem_gblm.stream.segments import kept_boundaries, segments
from lowmem_gblm.stream.stats import collect_inputs
from lowmem_gblm.stream.store import save_windows, saved_windows, scratch
from lowmem_gblm.stream.sweep import embed_samples, forward
from lowmem_gblm.testing_hooks import crash_point

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INCOMING_NAME = "incoming.safetensors"  # in the state dir: dL/d(input of the next block to do)
# identity fields a reused folder must match (compute dtype / device type may differ); the lossy or
# optional ones are in an identity only when not at their defaults, so older folders still match
REUSE_KEYS = ("format_version", "model", "calibration_sha256", *named(CalibConfig, gradients=True),
              *named(RunConfig, gradients=True))  # the options declared gradients=True


# what a gradient folder holds besides its state file and block files
_OWN = (STATE_DIR, CALIB_IDS_NAME, CALIB_PIXELS_NAME)


def gradient_identity(run: Run) -> dict:
    cfg = run.config
    optional = {"store_dtype": str(cfg.store_dtype) if cfg.store_dtype != "auto" else None,  # changes the gradients
                "grad_dtype": str(cfg.grad_dtype) if cfg.grad_dtype != "float32" else None,
                "head_chunk": cfg.head_chunk}
    return {k: v for k, v in optional.items() if v is not None} | {
        "format_version": FORMAT_VERSION,
        "model": run.model.index.fingerprint(),
        "calibration_sha256": run.calib_sha256,
        "nsamples": run.nsamples,
        "seqlen": run.seqlen,
        "grad_norm": str(cfg.grad_norm),
        "chunk_windows": run.part.chunk,  # the order the windows' gradients are summed in
        "compute_dtype": dtype_name(run.dtype),
        "device_type": run.device.type,
    } | run.threads_identity


def gradient_sweep(run: Run, path: Path) -> GradientFolder | None:
    """Compute (or resume, or find finished) the gradient folder at ``path``. Every rank calls it; the writer
    alone opens, locks and writes the folder (and returns it; the others return None)."""
    ranks = run.ranks
    with contextlib.ExitStack() as stack:

        def open_folder() -> GradientFolder:
            path.mkdir(parents=True, exist_ok=True)
            stack.enter_context(OutputLock(path))
            identity = gradient_identity(run)
            state = RunState.open(path, GRADIENTS_JSON, identity, what="gradient folder", fix="choose another folder",
                                  own=_OWN, older=lambda recorded: with_defaults(recorded, identity, (CPU_THREADS,)))
            return GradientFolder(path, GRADIENTS_JSON, state.data)

        folder = ranks.on_writer(open_folder, f"opening the gradient folder {path}")
        if ranks.broadcast_object(folder.complete if folder else None, "is the gradient folder complete"):
            log.info("gradient folder %s is complete; reusing it", path)
            run.done_blocks = run.model.num_blocks
            return folder
        store = run.store_folder(path / STATE_DIR / "store")
        with scratch(store):
            _Sweep(run, folder, path).sweep()
        shutil.rmtree(store, ignore_errors=True)
        if folder is not None:
            (path / STATE_DIR / INCOMING_NAME).unlink(missing_ok=True)
            folder.finish()
    return folder


class _Sweep:
    """One gradient sweep into ``folder``: the forward boundaries, the head, the reverse walk. On the ranks
    that do not write, ``folder`` is None: they compute on their windows and send the writer their parts."""

    def __init__(self, run: Run, folder: GradientFolder | None, path: Path):
        self.run, self.folder, self.ranks = run, folder, run.ranks
        self.incoming = path / STATE_DIR / INCOMING_NAME
        self.store = run.store(path / STATE_DIR / "store")
        self.file_dtype = named_dtype(str(run.config.grad_dtype))
        shape = run.boundary_shape
        # incoming-gradient buffers stay exact in the compute dtype whatever --store-dtype says
        self.g_in = self.store.new(shape, run.dtype, "grad_a", exact=True)
        self.g_out = self.store.new(shape, run.dtype, "grad_b", exact=True)

    @property
    def full_shape(self) -> tuple[int, int, int]:
        return self.run.nsamples, *self.run.boundary_shape[1:]

    def _start(self) -> int:
        """First block not to do: blocks start..L-1 are done and the gradient into block start-1 is persisted
        (the writer decides; every rank receives its windows of that gradient)."""
        nblocks = self.run.model.num_blocks
        start = nblocks
        with contextlib.ExitStack() as stack:
            saved = None
            if self.folder is not None:
                while start > 0 and self.folder.block_done(start - 1):
                    start -= 1
                if 0 < start < nblocks:
                    saved = stack.enter_context(saved_windows(self.incoming, str(start - 1), self.full_shape))
                    if saved is None:
                        log.warning("gradient folder %s: no usable incoming gradient for block %d; starting from the "
                                    "head", self.folder.folder, start - 1)
                        start = nblocks
            start = self.ranks.broadcast_object(start, "where the gradient sweep resumes")
            if 0 < start < nblocks:
                self._scatter(saved)
        return start

    def _scatter(self, saved) -> None:
        """The persisted incoming gradient (the writer's file) into every rank's g_in, window by window."""
        part, ranks, what = self.run.part, self.ranks, "sending the persisted incoming gradient"
        if ranks.writer:
            for n in range(self.run.nsamples):
                owner, local = part.locate(n)
                window = saved[n:n + 1].to(self.run.dtype)
                if owner == 0:
                    self.g_in.put(local, window)
                else:
                    ranks.send(window.contiguous(), owner, what)
            return
        buf = torch.empty((1, *self.full_shape[1:]), dtype=self.run.dtype)
        for local in range(len(self.g_in)):
            ranks.recv(buf, 0, what)
            self.g_in.put(local, buf)

    def _save_incoming(self, i: int) -> None:
        """g_out (dL/d input of block i) of every rank's windows into the writer's file, in window order."""
        part, ranks, what = self.run.part, self.ranks, f"gathering the incoming gradient of block {i - 1}"
        self.g_out.flush()
        if not ranks.writer:
            for local in range(len(self.g_out)):
                ranks.send(self.g_out.get(local).contiguous(), 0, what)
            return
        buf = torch.empty((1, *self.full_shape[1:]), dtype=self.run.dtype)

        def window(n: int) -> torch.Tensor:
            owner, local = part.locate(n)
            if owner == 0:
                return self.g_out.get(local)
            ranks.recv(buf, owner, what)
            return buf

        save_windows(self.incoming, self.full_shape, self.run.dtype, str(i - 1), window)

    def sweep(self) -> None:
        run, nblocks = self.run, self.run.model.num_blocks
        start = self._start()
        run.done_blocks = nblocks - start
        if start == 0:
            return
        n, t = run.nsamples, run.seqlen
        log.info("gradient sweep: %d/%d blocks to do, %d windows x %d tokens, %s norm, compute %s on %s "
                 "(logits, loss and accumulators fp32), store %s (%s)", start, nblocks, n, t, run.config.grad_norm,
                 dtype_name(run.dtype), run.device, run.offload, run.config.store_dtype)
        if start < nblocks:
            log.info("resuming the gradient sweep at block %d", start - 1)
        last = nblocks if start == nblocks else start - 1  # highest boundary needed
        k = run.checkpoint_every
        kept = kept_boundaries(last, k)
        walk = segments(start, kept)
        if k > 1:
            log.info("gradient sweep: keeping every %d-th block input (%d of %d); the reverse walk recomputes %d "
                     "block forwards", k, len(kept), last + 1, sum(e - c - 1 for c, e in walk))
        # blocks 0..last-1 forward; then per segment (top first) its recompute forward and its reverse walk;
        # the next block is read while one computes
        schedule = [(i, None) for i in range(last)]
        for c, e in walk:
            schedule += [(i, None) for i in range(c, e - 1)] + [(i, None) for i in range(e - 1, c - 1, -1)]
        with BlockReader(run.model, schedule, run.device, run.dtype, run.config.prefetch) as reader:
            bounds = self.forward(reader, last, set(kept))
            if start == nblocks:
                self.head(bounds.pop(nblocks))
            with PhaseProgress("gradients", start, run.part.nlocal, self.progress) as progress:
                for c, e in walk:
                    self.segment(reader, bounds, c, e, progress)
        self.g_in.release()
        self.g_out.release()

    @property
    def progress(self) -> bool:
        return self.run.config.progress and self.ranks.writer

    def forward(self, reader: BlockReader, last: int, kept: set[int]) -> dict:
        """{i: input of block i} for the kept i <= last (bounds[L]: the head's input); the inputs not kept
        pass through two scratch buffers."""
        run = self.run
        new = partial(self.store.new, run.boundary_shape, run.dtype)
        bounds = {i: new(f"h{i:05d}") for i in sorted(kept)}
        scratch = [new("scratch_a"), new("scratch_b")] if len(kept) < last + 1 else []
        embed_samples(run.model, run.local_samples, bounds[0], run.dtype)
        src = bounds[0]
        # a whole dense forward (not a resumed one) also records every linear's input statistics for OWL
        norms = {} if last == run.model.num_blocks else None
        with PhaseProgress("gradient forward", last, run.part.nlocal, self.progress) as progress:
            for i in range(last):
                block = reader.next(i)
                dst = bounds[i + 1] if i + 1 in bounds else next(b for b in scratch if b is not src)
                names = run.model.block_linears(i) if norms is not None else []
                with collect_inputs(block, names, frozenset({"scaler_row"}), run.model.expert_units) as stats:
                    fold = ChunkFold(self.ranks, run.part, f"input statistics of block {i}")
                    forward(block, run.ctx, src, dst, run.device, run.dtype, run.part, run.batch_size,
                            progress.windows, partial(_fold_scalers, fold, stats) if names else None)
                if names and self.folder is not None:
                    prefix = run.model.family.block_prefix(i)
                    norms.update({prefix + n: fold.result(n).cpu() for n in names})
                del block
                src = dst
                progress.block(f"block {i}")
        for buf in scratch:
            buf.release()
        if norms is not None and self.folder is not None:
            self.folder.save_input_norms(norms)
        return bounds

    def head(self, top) -> None:
        """Per-window loss and dL/d(last hidden state) into g_in; the losses gathered on the writer."""
        run = self.run
        modality = adapter(run.model)
        head = modality.gradient_head(run)  # the loss: next-token (language models) or the classifier's (images)
        losses: dict[int, float] = {}
        for n, count in run.part.all_batches(run.batch_size):
            loss, grad = head(top.get(n, count), n, count)
            self.g_in.put(n, grad)
            losses.update(zip(run.part.local_windows[n:n + count], loss.tolist(), strict=True))
            del loss, grad
        del head
        top.release()
        every = {k: v for part in self.ranks.all_objects(losses, "gathering the calibration losses") for k, v in
                 part.items()}
        if self.folder is not None:
            self.folder.data["mean_loss"] = sum(every[k] for k in range(run.nsamples)) / run.nsamples
            self.folder.data |= modality.gradient_record(run)
            log.info("gradient sweep: mean calibration loss %.4f", self.folder.data["mean_loss"])

    def segment(self, reader: BlockReader, bounds: dict, c: int, e: int, progress: PhaseProgress) -> None:
        """Blocks e-1..c in reverse: first the inputs of blocks c+1..e-1 are recomputed from block c's kept
        input, then each block's recomputed forward and backward (block_windows), chunk by chunk, each chunk's
        accumulators folded on the writer (stream.reduce), its file written."""
        run = self.run
        for i in range(c, e - 1):
            block = reader.next(i)
            bounds[i + 1] = self.store.new(run.boundary_shape, run.dtype, f"h{i + 1:05d}")
            forward(block, run.ctx, bounds[i], bounds[i + 1], run.device, run.dtype, run.part, run.batch_size)
            del block
        grad_norm = str(run.config.grad_norm)
        for i in range(e - 1, c - 1, -1):
            block = reader.next(i)
            names = run.model.block_linears(i)
            experts = run.model.expert_units
            linears, accs = grad_accumulators(block, names, run.device, experts)
            fold, done = ChunkFold(self.ranks, run.part, f"gradients of block {i}"), 0
            for step in range(run.part.steps):
                for n, count in run.part.batches(step, run.batch_size):
                    self.g_out.put(n, block_windows(block, run.ctx, linears, accs, bounds[i].get(n, count),
                                                    self.g_in.get(n, count), grad_norm, run.device, run.dtype,
                                                    experts))
                    done += count
                    progress.windows(done)
                fold.step(step, accs)
            del linears, block  # the weights go before the accumulators are finished and written
            accs.clear()
            self.write_block(i, names, fold)
            bounds.pop(i).release()
            self.g_in, self.g_out = self.g_out, self.g_in
            progress.block(f"block {i} written")

    def write_block(self, i: int, names: list[str], fold: ChunkFold) -> None:
        """Block i's finished norms to its file, the incoming gradient of block i-1 persisted, then block i
        recorded done (in that order, so a kill anywhere resumes correctly). Only the writer writes; the other
        ranks send it their windows of the incoming gradient."""
        if self.folder is None:
            if i > 0:
                self._save_incoming(i)
            return
        prefix = self.run.model.family.block_prefix(i)
        tensors = {}
        for name in names:  # one accumulator at a time: an fp32 one is dropped once its file copy exists
            acc = fold.result(name)
            tensors[f"{prefix}{name}.weight"] = finish(acc, str(self.run.config.grad_norm)).to(self.file_dtype).cpu()
            del acc
        sha = save_tensors_atomic(self.folder.folder / block_file(i), tensors)
        hashes = {name: tensor_sha256(t) for name, t in tensors.items()}
        del tensors
        if i > 0:
            self._save_incoming(i)
        self.folder.mark_block(i, sha, hashes)
        crash_point("gradient_block")  # after block i (reverse order) is durable


def _fold_scalers(fold: ChunkFold, stats: dict, step: int) -> None:
    fold.step(step, {n: accs["scaler_row"].total for n, accs in stats.items()})


def _exact_inputs(path: Path) -> str:
    """The flag and file that repeat a gradient folder's own calibration samples."""
    if (path / CALIB_PIXELS_NAME).is_file():
        return f"--calib-pixels {path / CALIB_PIXELS_NAME}"
    return f"--calib-ids {path / CALIB_IDS_NAME}"


def open_for_reuse(path: Path, expected: dict) -> GradientFolder:
    """A finished ``--gradients`` folder whose identity matches ``expected`` on REUSE_KEYS."""
    if not path.is_dir():
        raise InputError(f"--gradients {path}: no such folder")
    folder = GradientFolder.load_folder(path)
    if folder is None:
        raise InputError(f"--gradients {path}: not a gradient folder (no readable {GRADIENTS_JSON}); "
                         "create one with: lowmem-gblm gradients MODEL_DIR GRAD_DIR")
    old = {k: folder.identity.get(k) for k in REUSE_KEYS}
    new = {k: expected.get(k) for k in REUSE_KEYS}
    if old != new:
        raise ResumeMismatch(
            f"--gradients {path} was computed with other settings ({'; '.join(diff_dicts(old, new)[:4])}); "
            "pass matching --grad-norm/--calib/--nsamples/--seqlen/--seed/--store-dtype/--head-chunk (or "
            f"{_exact_inputs(path)}), or drop --gradients to compute them")
    if not folder.complete:
        raise InputError(f"--gradients {path} is incomplete ({len(folder.done)} blocks done); "
                         "rerun the same lowmem-gblm gradients command to finish it")
    return folder


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


def gradient_feed(run: Run, manifest: RunState | None, gradients: str | None) -> GradientFeed | None:
    """The prune run's gradients: ``--gradients DIR`` (a finished folder with a matching identity), or the
    sweep run (or resumed) into OUT_DIR/.lowmem/gradients. The folder's identity and block hashes are
    recorded in the prune manifest, so a resumed prune refuses gradients that changed under it. Every rank
    calls it (all of them run the sweep); only the writer gets a feed (it alone prunes)."""
    ranks, error = run.ranks, None
    if gradients:
        folder = ranks.on_writer(lambda: open_for_reuse(Path(gradients), gradient_identity(run)),
                                 f"opening --gradients {gradients}")
        if folder is not None:
            log.info("using gradients from %s (%s norm, computed in %s on %s)", folder.folder, folder.identity[
                "grad_norm"], folder.identity.get("compute_dtype"), folder.identity.get("device_type"))
    else:
        if ranks.writer and manifest is not None:
            forget_lost_gradients(run.out / STATE_DIR / OWN_GRADIENTS, manifest)
        with run.phase("gradient_sweep"):
            folder = gradient_sweep(run, run.out / STATE_DIR / OWN_GRADIENTS)
    if folder is not None:
        record = {"identity": {k: folder.identity[k] for k in REUSE_KEYS if k in folder.identity},
                  "sha256": {k: v["sha256"] for k, v in sorted(folder.done.items())}}
        old = manifest.data.get("gradients")
        if old is not None and old != record:
            error = ResumeMismatch(
                f"OUT_DIR {run.out} was being pruned with other gradients ({'; '.join(diff_dicts(old, record)[:3])});"
                " pass the same --gradients folder to resume, or --overwrite to start over")
        elif old is None:
            manifest.data["gradients"] = record
            manifest.save()
    ranks.agree(error, "checking the gradients against OUT_DIR's manifest")
    return GradientFeed(folder, private=not gradients) if folder is not None else None


def forget_lost_gradients(path: Path, manifest: RunState) -> list[int]:
    """A prune run's own gradient folder drops block i's file once block i's shard is durable (GradientFeed). A block
    the resume must redo (its shard deleted, resized or changed since: sha256 against the manifest) needs that file
    again: such shards leave OUT_DIR and the manifest, and the folder is removed, so the sweep computes the gradients
    again (the same bytes, so the manifest's gradient record still holds). Returns the blocks to redo that lost their
    gradients (call it on the writer, under the lock)."""
    folder = GradientFolder.load_folder(path) if path.is_dir() else None
    if folder is None:
        return []
    lost = sorted(int(key) for key in folder.done if key.isdigit() and not folder.is_done(key))
    redo = [i for i in lost if not _shard_intact(manifest, f"block.{i}")]
    if not redo:
        return []
    for i in redo:  # the file first: a kill in between leaves an entry whose file is missing, which is redone too
        entry = manifest.done.get(f"block.{i}")
        if entry is not None:
            (manifest.folder / entry["file"]).unlink(missing_ok=True)
            del manifest.done[f"block.{i}"]
    manifest.save()
    log.warning("block(s) %s must be redone (shard missing or changed since this run wrote it) and this run's gradient "
                "folder had already dropped their gradients: computing the gradients again", redo)
    shutil.rmtree(path)
    return redo


def _shard_intact(manifest: RunState, key: str) -> bool:
    """``key``'s shard is there with the size and sha256 the manifest recorded."""
    if not manifest.is_done(key):
        return False
    entry = manifest.entry(key)
    return file_sha256(manifest.folder / entry["file"]) == entry["sha256"]


def compute_gradients(config: GradientConfig) -> dict:
    """``lowmem-gblm gradients``: the sweep alone into ``config.out_dir`` (the writing rank's)."""
    model = open_model(config.model_dir)
    run = open_run(config, model, "gblm", ("gradient_sweep",))
    try:

        def prepare() -> None:
            check_out_dir(run.out, model.root)  # refuse before anything is written
            RunState.refuse_foreign(run.out, GRADIENTS_JSON, "gradient folder", _OWN)
            prepare_out_dir(run.out, model.root)

        run.ranks.on_writer(prepare, f"opening {run.out}")
        with run.phase("gradient_sweep"):
            folder = gradient_sweep(run, run.out)
    finally:
        run.close()
    ranks_report = run.rank_phases()
    if folder is None:
        return {"rank": run.ranks.rank}
    calib_path = run.out / run.calib_file
    if not calib_path.is_file():
        save_tensors_atomic(calib_path, run.samples.file_tensors())
    return {"folder": str(run.out), "identity": folder.identity, "blocks": len(folder.done),
            "mean_loss": folder.data.get("mean_loss"), "phase": run.phase_dicts()[0],
            "offload": run.offload, "predicted": run.plan.summary()} | ranks_report
