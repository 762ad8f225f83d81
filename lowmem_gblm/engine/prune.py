"""``lowmem-gblm prune``: (gradient sweep) -> prune sweep -> finalize, resumable block by block.

Blocks stream from disk one at a time; calibration hidden states live in the activation store; each
pruned block is written to its own shard and recorded in the manifest before the next one starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import shutil
import time
from functools import partial
from pathlib import Path

from lowmem_gblm.config import PruneConfig, without_paths
from lowmem_gblm.engine.gradients import GradientFeed, gradient_feed
from lowmem_gblm.engine.layerwise import layer_sparsity
from lowmem_gblm.engine.progress import PhaseProgress
from lowmem_gblm.engine.run import Run, open_model, open_run
from lowmem_gblm.engine.walk import BlockWalk, Step
from lowmem_gblm.errors import InputError, UsageError
from lowmem_gblm.io.checkpoint import INDEX_NAME, ShardChanged
from lowmem_gblm.io.runstate import (
    CALIB_IDS_NAME,
    CALIB_PIXELS_NAME,
    CPU_THREADS,
    MANIFEST_NAME,
    OWN_GRADIENTS,
    REPORT_NAME,
    STATE_DIR,
    OutputLock,
    RunState,
    check_out_dir,
    prepare_out_dir,
    remove_stale_temps,
    with_defaults,
)
from lowmem_gblm.io.writer import (
    TMP_MARK,
    atomic_write_text,
    copy_side_files,
    save_tensors_atomic,
    shard_name,
    shard_total,
    side_files,
)
from lowmem_gblm.mask import Pattern
from lowmem_gblm.methods import Method
from lowmem_gblm.methods.apply import BlockPruner, linear_report, statistics_needed
from lowmem_gblm.runtime import dtype_name
from lowmem_gblm.stream.compare import OutputError, output_error_entry
from lowmem_gblm.stream.reduce import ChunkFold
from lowmem_gblm.stream.stats import STATISTICS, collect_inputs
from lowmem_gblm.stream.store import ActivationBuffer, scratch
from lowmem_gblm.stream.sweep import embed_samples, forward
from lowmem_gblm.testing_hooks import crash_point
from lowmem_gblm.units import fmt_size, prod

log = logging.getLogger(__name__)


def prune(config: PruneConfig) -> dict:
    """Prune ``config.model_dir`` into ``config.out_dir``; resume if a matching run is there. Under a launcher
    every rank calls it; the writer (rank 0) alone touches OUT_DIR, every rank returns the report."""
    t_start = time.perf_counter()
    method = config.method_spec
    model = open_model(config.model_dir)
    pattern = config.parsed_pattern
    chosen = [model.block_linears(i, config.prunes) for i in range(model.num_blocks)]
    if not any(chosen):
        raise UsageError(f"--targets {config.targets!r} / --ignore {config.ignore!r} select no linear of the "
                         f"model's blocks (names look like {model.family.block_prefix(0)}"
                         f"{next(iter(model.linear_shapes))})")
    if str(config.layer_sparsity) == "owl" and not all(chosen):
        empty = [i for i, names in enumerate(chosen) if not names]
        raise UsageError(f"--layer-sparsity owl gives every block a sparsity, but --targets/--ignore leave block(s) "
                         f"{empty[:5]} with no linear to prune")
    for name, (_, columns) in model.linear_shapes.items():
        if any(name in names for names in chosen):
            pattern.check_columns(columns, name)
    phases = ("gradient_sweep", "prune_sweep") if config.runs_gradient_sweep else ("prune_sweep",)
    run = open_run(config, model, method.name, phases)
    try:
        with contextlib.ExitStack() as stack:
            manifest, report = run.ranks.on_writer(lambda: _open_output(run, config, stack),
                                                   f"opening OUT_DIR {run.out}") or (None, None)
            finished = run.ranks.broadcast_object(report, "whether OUT_DIR is already complete")
            if finished is not None:
                return finished
            report = _prune_run(run, config, method, manifest, t_start, chosen)
    finally:
        run.close()
    if report is None:
        return {}
    s = report["sparsity"]
    log.info("done: %s, sparsity %.4f over %d linears, peak RSS %s", run.out, s["overall"],
             len(s["per_linear"]), fmt_size(max(p.peak_rss_bytes for p in run.phases)))
    if s["overall"] < pattern.sparsity / 2:  # e.g. --sparsity 1e-9: int(in * sparsity) = 0 weights per row
        log.warning("asked for sparsity %g, got %.6f: the pattern removes (almost) no weight of these linears; "
                    "raise --sparsity", pattern.sparsity, s["overall"])
    return report


def _open_output(run: Run, config: PruneConfig, stack: contextlib.ExitStack) -> tuple[RunState, dict | None]:
    """The writer's side of opening OUT_DIR: refusals, ``--overwrite``, the lock (held until ``stack`` closes),
    the manifest. Returns (manifest, the finished report when OUT_DIR is already complete, else None)."""
    out, model = run.out, run.model
    # refuse before anything is written (a refused run leaves nothing behind)
    check_out_dir(out, model.root)
    if config.overwrite:
        _previous_run_files(out, config, model.root)
    else:
        RunState.refuse_foreign(out, f"{STATE_DIR}/{MANIFEST_NAME}", "OUT_DIR")
    prepare_out_dir(out, model.root)
    stack.enter_context(OutputLock(out))
    stale = remove_stale_temps(out)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run: %s", len(stale), ", ".join(stale))
    if config.overwrite:
        _remove_previous_run(out, config, model.root)
    identity = {"config": config.fingerprint_dict(), "model": model.index.fingerprint(),
                "calibration_sha256": run.calib_sha256, "device_type": run.device.type,
                "compute_dtype": str(run.dtype), "chunk_windows": run.part.chunk} | run.threads_identity
    manifest = RunState.open(out, f"{STATE_DIR}/{MANIFEST_NAME}", identity, what="OUT_DIR",
                             fix="pass --overwrite to start over", older=partial(_older_identity, identity))
    if manifest.data.get(TOTAL_SHARDS) != model.num_blocks + 1:  # before any shard: --overwrite knows their names
        manifest.data[TOTAL_SHARDS] = model.num_blocks + 1
        manifest.save()
    missing = sorted(entry["file"] for key, entry in manifest.done.items() if not manifest.is_done(key))
    if manifest.complete and (out / INDEX_NAME).is_file() and (out / REPORT_NAME).is_file() and not missing:
        log.info("%s is already complete (same options and model); nothing to do", out)
        return manifest, json.loads((out / REPORT_NAME).read_text())
    if manifest.complete:  # finished once, but a shard (or the index/report) went missing or changed size
        log.warning("%s was complete but %s is missing or changed size; redoing what is missing", out,
                    ", ".join(missing) or f"{INDEX_NAME} / {REPORT_NAME}")
        (out / INDEX_NAME).unlink(missing_ok=True)  # ours; written again last, when the run is whole
        manifest.data["complete"] = False
        manifest.save()
    done = sum(1 for k in manifest.done if k.startswith("block."))
    if done:
        log.info("resuming: %d blocks already done in %s", done, out)
    if not (out / run.calib_file).is_file():
        save_tensors_atomic(out / run.calib_file, run.samples.file_tensors())
    return manifest, None


def _older_identity(current: dict, recorded: dict) -> dict:
    """A manifest identity in this version's terms: path-valued options dropped (an older version recorded them as
    typed), no thread count taken as this run's (runs that did not record it resume as before)."""
    recorded = with_defaults(recorded, current, (CPU_THREADS,))
    if isinstance(recorded.get("config"), dict):
        recorded = recorded | {"config": without_paths(recorded["config"])}
    return recorded


def _prune_run(run: Run, config: PruneConfig, method: Method, manifest: RunState | None,
               t_start: float, chosen: list[list[str]]) -> dict | None:
    """(Gradient sweep), prune sweep and finalize on every rank; the report on the writer (None elsewhere).
    chosen[i]: block i's linears to prune (--targets / --ignore)."""
    model, out = run.model, run.out
    n, t = run.nsamples, run.seqlen
    log.info("%s: %d blocks, %s, %d windows x %d tokens, method %s, pattern %s, store %s", model.root,
             model.num_blocks, model.family.name, n, t, method.name, config.parsed_pattern, run.offload)
    grads = gradient_feed(run, manifest, config.gradients) if method.needs_gradients else None
    owl_norms = grads.folder.input_norms() if grads is not None and str(config.layer_sparsity) == "owl" else None
    owl = layer_sparsity(run, config, manifest, owl_norms)
    del owl_norms
    if manifest is not None:
        _write_non_block_shard(run, manifest)
        run.done_blocks = sum(1 for k in manifest.done if k.startswith("block."))
    store = run.store_folder(out / STATE_DIR / "store")
    sweep = _PruneSweep(run, config, method, manifest, grads, owl and owl["sparsity"], chosen)
    with run.phase("prune_sweep"), scratch(store):
        linears = sweep.sweep()
    ranks = run.rank_phases()
    if manifest is None:
        return None
    report = _finalize(run, config, manifest, linears, {"seconds_total": time.perf_counter() - t_start,
                                                         "offload": run.offload,
                                                         "predicted": run.plan.summary(),
                                                         "layer_sparsity": {"kind": str(config.layer_sparsity),
                                                                            **(owl or {})},
                                                         "skipped": _skipped(model, chosen),
                                                         "diagnostics": _diagnostics(sweep.output_errors, model),
                                                         "magnitude_fallback": sorted(
                                                             n for n, r in linears.items() if "fallback" in r)}
                      | ranks)
    _cleanup_state(out)
    return report


class _PruneSweep:
    """Front to back: statistics on the dense block, prune, forward the pruned block, write its shard,
    mark it done. Finished blocks replay from their own shards (forward only).

    With several ranks every rank streams the same block over its own windows: the statistics' chunk sums
    are folded on the writer (stream.reduce), which prunes (or replays from its shard) and sends every rank
    the block's tensors as written; every rank then runs its windows through them. Only the writer reads
    OUT_DIR and the gradients, and writes."""

    def __init__(self, run: Run, config: PruneConfig, method: Method, manifest: RunState | None,
                 grads: GradientFeed | None, sparsities: list[float] | None, selected: list[list[str]]):
        self.run, self.config, self.method, self.manifest, self.grads = run, config, method, manifest, grads
        self.selected = selected  # per block: the linears pruned (--targets / --ignore)
        self.total_shards = run.model.num_blocks + 1
        options = dataclasses.replace(config.method_options(), calib_tokens=run.nsamples * run.seqlen)
        self.pruner = BlockPruner(method, config.parsed_pattern, options, run.device, run.dtype)
        self.sparsities = sparsities  # per block (--layer-sparsity owl), else the pattern's everywhere

    def pruner_for(self, i: int) -> BlockPruner:
        if self.sparsities is None:
            return self.pruner
        return dataclasses.replace(self.pruner, pattern=Pattern.parse("unstructured", self.sparsities[i]))

    def sweep(self) -> dict:
        run = self.run
        store = run.store(run.out / STATE_DIR / "store")
        src, dst = store.new(run.boundary_shape, run.dtype, "h_a"), store.new(run.boundary_shape, run.dtype, "h_b")
        embed_samples(run.model, run.local_samples, src, run.dtype)
        # finished blocks replay from their own shards (on the writer); the rest read from the input checkpoint
        schedule = [(i, self._replay_source(i)) for i in range(run.model.num_blocks)]
        linears: dict[str, dict] = {}
        self.output_errors: list[dict | None] = []  # per block (the writer's): output_error_entry, None if unknown
        walk = BlockWalk(run.model, run.device, run.dtype, "prune", run.part.nlocal,
                         run.config.progress and run.ranks.writer, run.config.prefetch, schedule)
        for report in walk.run(self.block, (src, dst), release=True):
            linears.update(report)
        return linears

    def _replay_source(self, i: int) -> tuple[Path, str] | None:
        """(shard, recorded sha256) when block i is done: replayed from its shard, its bytes checked as read."""
        key = f"block.{i}"
        if self.manifest is None or not self.manifest.is_done(key):
            return None
        entry = self.manifest.entry(key)
        return self.run.out / entry["file"], entry["sha256"]

    def _forward(self, block, src: ActivationBuffer, dst: ActivationBuffer | None, progress: PhaseProgress,
                 on_step=None, on_output=None) -> None:
        run = self.run
        forward(block, run.ctx, src, dst, run.device, run.dtype, run.part, run.batch_size, progress.windows,
                on_step, on_output)

    def _forward_pruned(self, i: int, block, src: ActivationBuffer, dst: ActivationBuffer,
                        progress: PhaseProgress) -> dict | None:
        """The pruned block's forward into ``dst`` (the next block's inputs); ``dst`` holds the dense block's outputs
        until each batch replaces them: the output error's chunk sums, folded on the writer like the statistics
        (stream.compare). Returns block i's output_error_entry on the writer, None elsewhere."""
        run = self.run
        error = OutputError(dst, run.device)
        fold = ChunkFold(run.ranks, run.part, f"output error of block {i}")
        self._forward(block, src, dst, progress, lambda step: fold.step(step, {"output_error": error.part}), error)
        return output_error_entry(fold.result("output_error")) if run.ranks.writer else None

    def block(self, step: Step) -> dict:
        """Block i pruned (or replayed), its outputs in ``dst``; returns its per-linear report (the writer's).
        The block is freed before its shard is serialized (this frame holds the only reference)."""
        i, src, dst, progress = step.i, step.src, step.dst, step.bar
        run, key, ranks = self.run, f"block.{i}", self.run.ranks
        try:
            block = step.take()
        except ShardChanged as exc:  # a finished shard was changed since: its damage must not reach later blocks
            (run.out / self.manifest.entry(key)["file"]).unlink(missing_ok=True)  # ours; written again below
            del self.manifest.done[key]
            self.manifest.save()
            if self.grads is not None and not self.grads.folder.block_done(i):  # changed after the resume's check
                raise InputError(f"{exc}; block {i} must be redone and this run's gradients for it were already "
                                 "dropped: run the same command again (it computes them again and resumes)") from None
            log.warning("%s; redoing block %d from the input model", exc, i)
            block = run.model.load_block(i, run.device, run.dtype)
        replay = ranks.broadcast_object(self.manifest is not None and self.manifest.is_done(key),
                                        f"block {i}: replayed or pruned")
        if replay:
            ranks.broadcast_(list(block.state_dict().values()), f"block {i}: sending its tensors as written")
            self._forward(block, src, dst, progress)
            progress.block("replayed from its shard", replayed=True)
            if self.manifest is None:
                return {}
            # what the run that pruned it recorded (None when it recorded none: that code predates the record)
            self.output_errors.append(self.manifest.entry(key).get("output_error"))
            return self.manifest.entry(key)["linears"]
        tensors, report = self.prune_block(i, block, src, dst, progress)
        ranks.broadcast_(list(block.state_dict().values()), f"block {i}: sending its tensors as written")
        output_error = self._forward_pruned(i, block, src, dst, progress)
        del block
        if self.manifest is None:
            progress.block("pruned")
            return {}
        self.output_errors.append(output_error)
        file = shard_name(i, self.total_shards)
        tensors = run.model.stored_names(tensors)  # the checkpoint's names (vision: transformers 4's)
        sha = save_tensors_atomic(run.out / file, tensors)
        crash_point("manifest")
        self.manifest.mark_done(key, file, sha, {"linears": report, "names": sorted(tensors),
                                                 "output_error": output_error})
        if self.grads:
            self.grads.consumed(i)
        crash_point("block_done")
        progress.block("pruned")
        return report

    def prune_block(self, i: int, block, src: ActivationBuffer, dst: ActivationBuffer,
                    progress: PhaseProgress) -> tuple[dict, dict]:
        """Statistics on the dense block (every rank's chunks folded on the writer), its outputs written to ``dst``
        (the output error compares the pruned outputs with them), then, on the writer, every linear pruned in
        place. Returns (block i's tensors to write under their checkpoint names in the stored dtypes, per-linear
        report); empty on the other ranks."""
        run, method = self.run, self.method
        names = self.selected[i]
        wanted = statistics_needed(method, STATISTICS)
        # linears reading the same input (q/k/v, gate/up) share one set of statistics, made at their first call
        with collect_inputs(block, names, wanted, run.model.expert_units, share=True) as stats:
            if wanted:  # the dense outputs go to dst: the output error reads them back (stream.compare)
                fold = ChunkFold(run.ranks, run.part, f"statistics of block {i}")
                parts: dict[str, object] = {}

                def fold_step(step: int) -> None:
                    # the distinct sets, built at every step: they are made during step 0, which every rank runs
                    # (each rank holds a chunk there), so every rank folds the same names at every step
                    parts.clear()
                    parts.update(stats.accumulators())
                    fold.step(step, {k: acc.total for k, acc in parts.items()})

                self._forward(block, src, dst, progress, fold_step)
                if run.ranks.writer:
                    for key, acc in parts.items():
                        acc.total = fold.result(key)
        if not wanted:  # no statistics forward (magnitude): one dense forward for the output error
            self._forward(block, src, dst, progress)
        if not run.ranks.writer:
            return {}, {}
        stored = run.model.stored_tensors(block, i, run.dtype)  # stored bytes, for exact unchanged tensors
        weights = {name: run.model.unit_weight(block, name) for name in names}
        diagnostics: dict[str, dict[str, float]] = {}
        fallback = self.pruner_for(i).prune(block, run.model.family.block_prefix(i), stats, run.nsamples,
                                            self.grads.read(i) if self.grads else None, stored, names, weights,
                                            diagnostics)
        if fallback:
            log.warning("block %d: no calibration token reached %d expert matrix(es) (%s%s); pruned by magnitude",
                        i, len(fallback), fallback[0], ", ..." if len(fallback) > 1 else "")
        prefix = run.model.family.block_prefix(i)
        report = {f"{prefix}{name}.weight": linear_report(stored[f"{prefix}{name}.weight"]) for name in names}
        for full, values in diagnostics.items():  # GBLM: gradient_share, flipped_vs_wanda
            report[full].update(values)
        for full in fallback:
            report[full]["fallback"] = "magnitude: no calibration token was routed to this expert"
        return stored, report


def _write_non_block_shard(run: Run, manifest: RunState) -> None:
    model = run.model
    key, file = "rest", shard_name(model.num_blocks, model.num_blocks + 1)
    if manifest.is_done(key):
        return
    names = model.non_block_names()
    sha = save_tensors_atomic(run.out / file, model.index.read(names))
    crash_point("manifest")
    manifest.mark_done(key, file, sha, {"names": sorted(names)})


def _finalize(run: Run, config: PruneConfig, manifest: RunState, linears: dict, extra: dict) -> dict:
    out, model = run.out, run.model
    weight_map, total_size = {}, 0
    for _key, entry in sorted(manifest.done.items()):
        if "names" not in entry:
            continue
        for name in entry["names"]:
            weight_map[name] = entry["file"]
        total_size += model.index.nbytes(entry["names"])
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    manifest.data["side_files"] = copy_side_files(model.root, out)  # --overwrite may remove these later
    zeros = sum(r["zeros"] for r in linears.values())
    numel = sum(prod(r["shape"]) for r in linears.values())
    report = {
        "method": str(config.method),
        "options": config.to_dict(),
        "pattern": str(config.parsed_pattern),
        "device": str(run.device),
        "compute_dtype": dtype_name(run.dtype),
        "calibration": {"windows": run.samples.shape, "sha256": run.calib_sha256}
        | ({"labels": run.samples.label_source} if run.samples.label_source else {}),
        "sparsity": {"overall": zeros / max(numel, 1), "zeros": zeros, "numel": numel, "per_linear": linears,
                     "per_block": _per_block(model, linears)},
        "phases": run.phase_dicts(),
        "versions": _versions(),
        **extra,
    }
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=1, sort_keys=True))
    crash_point("finalize")
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True))  # last: marks complete
    manifest.finish()
    return report


def _diagnostics(output_errors: list[dict | None], model) -> dict:
    """The report's per-block diagnostics: the relative output error of each pruned block on its calibration inputs
    (stream.compare), and where the per-linear GBLM numbers are (in sparsity.per_linear)."""
    return {
        "model": model.identity(),
        "output_error": [None if e is None else e["relative"] for e in output_errors],
        "output_error_sums": output_errors,
        "definitions": {
            "output_error": "per block: ||Y_pruned - Y_dense||_F / ||Y_dense||_F over all calibration windows, tokens "
                            "and features; Y_dense and Y_pruned are the dense and the pruned block's outputs on the "
                            "same inputs (the outputs of the already pruned earlier blocks); null: not recorded "
                            "(a block replayed from a run that did not record it)",
            "gradient_share": "GBLM, per linear (sparsity.per_linear): sum(alpha |W| G) / sum(|W| sqrt(scaler_row) + "
                              "alpha |W| G) over the linear's weights, in [0, 1]",
            "flipped_vs_wanda": "GBLM, per linear: |keep_gblm XOR keep_wanda| / numel, keep_wanda chosen from "
                                "|W| sqrt(scaler_row) with the same pattern and sparsity",
        },
    }


def _skipped(model, chosen: list[list[str]]) -> list[str]:
    """Every decoder linear left dense by --targets / --ignore, by its weight's full name."""
    return [f"{model.family.block_prefix(i)}{n}.weight" for i in range(model.num_blocks)
            for n in model.linear_shapes if n not in chosen[i]]


def _per_block(model, linears: dict) -> list[float]:
    """Each decoder block's measured sparsity over its linears (zeros / weights)."""
    out = []
    for i in range(model.num_blocks):
        prefix = model.family.block_prefix(i)
        rows = [r for name, r in linears.items() if name.startswith(prefix)]
        out.append(sum(r["zeros"] for r in rows) / max(sum(prod(r["shape"]) for r in rows), 1))
    return out


def _previous_run_files(out: Path, config: PruneConfig, model_dir: Path) -> list[str]:
    """``--overwrite``: the names in OUT_DIR that a previous lowmem-gblm run wrote (to delete), or a refusal.

    Refused (InputError, nothing deleted) when OUT_DIR holds the input model, the ``--gradients`` folder or
    the ``--calib-ids`` file, when it holds files no lowmem-gblm run wrote, or when it holds no run at all
    (an empty or missing folder is fine). A run's files are the ones its manifest lists, its index, report
    and calibration ids, and the side files it copies from the model folder (config, tokenizer, ...).
    Only reads: called before anything is written, and again under the lock just before deleting.
    """
    out_r = out.resolve()
    inputs = {"MODEL_DIR": str(model_dir), "--gradients": config.gradients, "--calib-ids": config.calib.ids_file}
    for flag, path in inputs.items():
        if path is not None and (Path(path).resolve() == out_r or out_r in Path(path).resolve().parents):
            raise InputError(f"--overwrite would delete {flag} {path}, which is inside OUT_DIR {out}; "
                             "choose another OUT_DIR (nothing was deleted)")
    if not out.is_dir():
        return []
    entries = {p.name for p in out.iterdir()} - {STATE_DIR}
    manifest = RunState.load(out, f"{STATE_DIR}/{MANIFEST_NAME}")
    if manifest is None:
        if entries:
            raise InputError(f"OUT_DIR {out} holds no lowmem-gblm run ({', '.join(sorted(entries)[:3])}...); "
                             "--overwrite only replaces a previous run's output: choose an empty folder "
                             "(nothing was deleted)")
        return []
    ours = {entry.get("file") for entry in manifest.done.values() if isinstance(entry, dict)}
    ours |= {INDEX_NAME, REPORT_NAME, CALIB_IDS_NAME, CALIB_PIXELS_NAME, *manifest.data.get("side_files", []),
             *side_files(model_dir), *_run_shard_names(manifest)}
    ours = {name for name in ours if isinstance(name, str) and name and Path(name).name == name}  # plain names only
    ours |= {name for name in entries if _stale_temp_of(name, ours)}  # a write the kill interrupted
    foreign = sorted(entries - ours)
    if foreign:
        raise InputError(f"OUT_DIR {out} holds files no lowmem-gblm run wrote ({', '.join(foreign[:3])}"
                         f"{'...' if len(foreign) > 3 else ''}); --overwrite leaves them alone: move them or "
                         "choose another OUT_DIR (nothing was deleted)")
    return sorted(entries & ours)


TOTAL_SHARDS = "total_shards"  # in the manifest: how many shards the run writes (their names are shard_name(k, n))


def _run_shard_names(manifest: RunState) -> set[str]:
    """Every shard name the run in ``manifest`` writes, listed or not: one written just before a kill, before its
    entry, or one a resume dropped from the manifest to redo is still the run's own file. Older manifests without
    the count: the totals their entries' names carry."""
    totals = {manifest.data.get(TOTAL_SHARDS)}
    totals |= {shard_total(str(entry.get("file"))) for entry in manifest.done.values()}
    return {shard_name(k, n) for n in totals if isinstance(n, int) and 0 < n < 100_000 for k in range(n)}


def _stale_temp_of(name: str, ours: set[str]) -> bool:
    """``name`` is the temporary file of an atomic write of one of ``ours`` (``.NAME.tmp-PID``) a kill left."""
    base, mark, pid = name.partition(TMP_MARK)
    return bool(mark) and pid.isdigit() and base.startswith(".") and base[1:] in ours


def _remove_previous_run(out: Path, config: PruneConfig, model_dir: Path) -> None:
    """Delete what ``_previous_run_files`` allows, and the state folder but its lock (we hold it)."""
    for name in _previous_run_files(out, config, model_dir):
        path = out / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    for sub in (out / STATE_DIR).iterdir():
        if sub.name != "lock":
            shutil.rmtree(sub) if sub.is_dir() and not sub.is_symlink() else sub.unlink()


def _cleanup_state(out: Path) -> None:
    shutil.rmtree(out / STATE_DIR / "store", ignore_errors=True)
    shutil.rmtree(out / STATE_DIR / OWN_GRADIENTS, ignore_errors=True)  # model-sized: keep with `gradients`


def _versions() -> dict:
    out = {}
    for pkg in ("lowmem-gblm", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out

