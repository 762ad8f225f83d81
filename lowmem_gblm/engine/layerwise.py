"""Per-block sparsity for ``--layer-sparsity owl``: one forward sweep of the dense model first.

Every block's linears see the dense model's activations (block inputs from the dense blocks before it);
their Σx² (summed per chunk, folded on the writer like every statistic) and the dense weights give each
block's outlier ratio, and score.owl turns the ratios into per-block sparsities whose mean is the target.
The writer records them in the manifest, so a resumed run reuses them (a kill during this sweep redoes
the sweep: it writes nothing else). For GBLM the gradient sweep's own dense forward already saw every
dense block input: it records each linear's Σx² in the gradient folder (io.gradfiles, ``input_sq``), and
OWL then reads only the blocks' weights, with no forward of its own. The two give the same ratios bit for
bit (same windows, same fold order, same store); a gradient folder without the statistics (an older one)
falls back to the forward sweep.
"""

from __future__ import annotations

import logging

import torch

from lowmem_gblm.config import PruneConfig
from lowmem_gblm.engine.run import Run
from lowmem_gblm.engine.walk import BlockWalk, Step
from lowmem_gblm.io.runstate import STATE_DIR, RunState
from lowmem_gblm.score.owl import outlier_ratio, owl_sparsities
from lowmem_gblm.stream.reduce import ChunkFold
from lowmem_gblm.stream.stats import collect_inputs
from lowmem_gblm.stream.store import scratch
from lowmem_gblm.stream.sweep import embed_samples, forward

log = logging.getLogger(__name__)

OWL_KEY = "owl"  # in the manifest: {"lambda", "m", "outlier_ratio": [L], "sparsity": [L]}


def layer_sparsity(run: Run, config: PruneConfig, manifest: RunState | None,
                   norms: dict[str, torch.Tensor] | None = None) -> dict | None:
    """{"outlier_ratio", "sparsity" per block, ...} for OWL (computed once, kept in the manifest); None for uniform.
    Every rank calls it and gets the writer's result. ``norms`` (the writer's; the gradient folder's input
    statistics, GradientFolder.input_norms): the ratios come from them and the weights, without a forward."""
    if str(config.layer_sparsity) != "owl":
        return None
    ranks = run.ranks
    saved = ranks.broadcast_object(manifest.data.get(OWL_KEY) if manifest is not None else None,
                                   "OWL's per-block sparsity")
    if saved is not None:
        log.info("OWL: per-block sparsity from the manifest (%s)", _summary(saved))
        return saved
    if ranks.broadcast_object(norms is not None, "are the gradient sweep's input statistics there"):
        with run.phase("owl_weights"):
            ratios = _ratios_from_norms(run, config, norms) if ranks.writer else None
        source = "gradient_sweep"
    else:
        folder = run.store_folder(run.out / STATE_DIR / "owl_store")
        with run.phase("owl_sweep"), scratch(folder):
            ratios = _outlier_ratios(run, config)
        source = "forward_sweep"

    def record() -> dict:
        result = {"lambda": config.owl_lambda, "m": config.owl_m, "statistics": source, "outlier_ratio": ratios,
                  "sparsity": owl_sparsities(ratios, config.parsed_pattern.sparsity, config.owl_lambda)}
        manifest.data[OWL_KEY] = result
        manifest.save()
        return result

    result = ranks.broadcast_object(ranks.on_writer(record, "OWL's per-block sparsity"), "OWL's per-block sparsity")
    log.info("OWL: %s", _summary(result))
    return result


def _summary(owl: dict) -> str:
    s = owl["sparsity"]
    return f"sparsity {min(s):.4f}..{max(s):.4f} (mean {sum(s) / len(s):.4f}), lambda {owl['lambda']:g}, M {owl['m']:g}"


def _ratios_from_norms(run: Run, config: PruneConfig, norms: dict[str, torch.Tensor]) -> list[float]:
    """Each block's outlier ratio from recorded input statistics and the block's weights (read one block's units
    at a time, in the compute dtype, as the forward sweep holds them)."""
    model, ratios = run.model, []
    for i in range(model.num_blocks):
        prefix = model.family.block_prefix(i)
        names = model.block_linears(i, config.prunes)
        raw = model.read_tensors([f"{prefix}{n}.weight" for n in names])
        weights = [raw.pop(f"{prefix}{n}.weight").to(run.dtype) for n in names]
        ratios.append(outlier_ratio(weights, [norms[prefix + n] / run.nsamples for n in names], config.owl_m))
        del weights
    return ratios


def _outlier_ratios(run: Run, config: PruneConfig) -> list[float] | None:
    """The dense model's blocks in order: each block's outlier ratio (on the writer; None elsewhere)."""
    store = run.store(run.out / STATE_DIR / "owl_store")
    src, dst = store.new(run.boundary_shape, run.dtype, "o_a"), store.new(run.boundary_shape, run.dtype, "o_b")
    embed_samples(run.model, run.local_samples, src, run.dtype)

    def visit(step: Step) -> float | None:
        block, names = step.take(), run.model.block_linears(step.i, config.prunes)
        with collect_inputs(block, names, frozenset({"scaler_row"}), run.model.expert_units) as stats:
            fold = ChunkFold(run.ranks, run.part, f"OWL statistics of block {step.i}")
            forward(block, run.ctx, step.src, step.dst, run.device, run.dtype, run.part, run.batch_size,
                    step.bar.windows, lambda k: fold.step(k, {n: a["scaler_row"].total for n, a in stats.items()}))
        if not run.ranks.writer:
            return None
        return outlier_ratio([run.model.unit_weight(block, n) for n in names],
                             [fold.result(n) / run.nsamples for n in names], config.owl_m)

    ratios = BlockWalk(run.model, run.device, run.dtype, "owl", run.part.nlocal,
                       run.config.progress and run.ranks.writer, run.config.prefetch).run(visit, (src, dst),
                                                                                           release=True)
    return ratios if run.ranks.writer else None
