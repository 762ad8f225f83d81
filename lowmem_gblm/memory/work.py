"""The work of each phase, counted: FLOPs of its matrix products and factorizations, bytes it reads and
writes; with the machine's measured matmul peak (``memory.matmul_peak``) a report says what fraction of it a
phase got.

What is counted, and why so:

* **FLOPs** are those of matrix products (``2 * m * n * k`` for ``[m, k] @ [k, n]``, the convention of
  ``torch.utils.flop_counter``; a rank-1 or GEMM *update* ``A -= X @ Y`` is the product alone, as BLAS
  ``ger`` / ``gemm`` count it) and of the SparseGPT factorizations. Elementwise work (norms, activations,
  RoPE, softmax, the x^2 statistics, scores, the |g| folds) is left out: it is O(1/T) or O(1/d) of the
  products and does not run at matmul speed, so leaving it out keeps "fraction of matmul peak" honest.
  ``tests/test_work.py`` checks every product term against ``FlopCounterMode`` on the engine's own
  functions.
* **Attention** is counted as the **full T x T square**: per window and block, scores ``Q K^T`` and the
  weighted sum ``P V`` are ``2 * 2 * T^2 * heads * head_dim`` (query heads: GQA shares K/V, not the
  work). That is FlopCounterMode's SDPA formula ("we aren't accounting for causal attention") and the
  PaLM MFU convention. The kernels do less: torch's CPU flash kernel
  (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``: ``num_keys = is_causal ? min(m + qBlockSize,
  kvSize) : kvSize``) and the CUDA flash / memory-efficient kernels skip key blocks above the diagonal, so
  they execute about half of this (T^2/2 plus the diagonal blocks). Note also that FlopCounterMode counts
  **nothing** for CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu`` has no formula in torch
  2.13); under ``sdpa_kernel(SDPBackend.MATH)`` it counts exactly the full square.
* **Backward** = 2 x forward: every linear's input gradient (``2*out*in`` per token) plus its weight
  gradient (same; the per-window weight gradient GBLM folds into its accumulators, counted as
  ``weight_gradients``), and attention's four products (dV, dP, dQ, dK). Flash backward kernels also
  recompute ``Q K^T`` (FlopCounterMode's flash-backward formula counts 5 products, not 4); not counted.
  The head's weight is frozen: its backward is the input gradient only.
* **Bytes** are the phase's traffic by source: checkpoint tensors read in their storage dtype, the
  activation store (boundaries, incoming gradients; RAM copies or file I/O by ``--offload``), the
  gradient files, and the shards written. Headers and the embedding reader's chunking are left out.

Phases as the engine runs them (``engine/gradients.py``, ``engine/prune.py``, ``engine/evaluate.py``):

* ``gradient_sweep``: embed; every block forward (boundaries stored, every k-th with
  ``--checkpoint-every k``); the head per window (final norm + lm_head + cross-entropy, forward and input
  gradient); per block in reverse: the recomputed forward and the backward (``--batch-size`` windows per
  call), each window's weight gradient ``d_n^T x_n`` folded into fp32 accumulators; with k > 1 each
  segment's inputs are first recomputed (``checkpoint_recompute``).
* ``prune_sweep``: per block: a forward for statistics when the method needs any
  (``methods.apply.statistics_needed``: magnitude needs none, so it has no statistics forward), the Hessian and
  the weight solve (SparseGPT, ``--update obs|lsq``), then the pruned block's forward (always: it makes the next
  block's inputs). The linears that read the same input (q/k/v, gate/up; ``memory.probe.input_groups``) share one
  Hessian and, where the solve shares it, one factorization: those terms count once per distinct input. The
  statistics forward writes the dense outputs to the next inputs' buffer and the pruned forward reads them
  back before replacing them (the report's output error, stream.compare); magnitude has a dense forward for it.
* ``eval``: every block forward, then the fp32 head per window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowmem_gblm.memory.plan import PlanSettings
from lowmem_gblm.memory.probe import input_groups
from lowmem_gblm.memory.shape import ModelShape
from lowmem_gblm.methods import Method
from lowmem_gblm.methods.apply import statistics_needed
from lowmem_gblm.methods.solve import INVERSE_PROBES
from lowmem_gblm.methods.update import resolve_solver
from lowmem_gblm.runtime import dtype_bytes
from lowmem_gblm.stream.segments import kept_boundaries, segments
from lowmem_gblm.stream.stats import STATISTICS
from lowmem_gblm.stream.store import store_nbytes

PHASES = ("gradient_sweep", "prune_sweep", "eval", "owl_sweep", "owl_weights")
# terms computed in fp32 whatever the compute dtype (their speed is the fp32 peak's, not the run dtype's):
# eval's logits (stream.head.HEAD_DTYPE), the Hessian (stream.stats.ACC_DTYPE) and SparseGPT's solve
FP32_TERMS = frozenset({"head_forward_fp32", "hessian", "sparsegpt_cholesky", "sparsegpt_inverse",
                        "sparsegpt_obs_update", "lsq_target", "lsq_cholesky", "lsq_solve", "lsq_factor_cholesky",
                        "lsq_factor_inverse", "lsq_inverse_check", "lsq_cg_products"})



# ---------------------------------------------------------------------------------------------------
# the analytic counts: small pure functions of the shape


def heads_and_dim(shape: ModelShape) -> tuple[int, int]:
    """(query heads, head_dim) as the decoder layer builds them (head_dim defaults to hidden / heads)."""
    heads = int(shape.config.num_attention_heads)
    head_dim = getattr(shape.config, "head_dim", None) or shape.hidden // heads
    return heads, int(head_dim)


def linear_flops(shape: ModelShape, tokens: int) -> dict[str, int]:
    """Forward FLOPs of each linear of one block over ``tokens`` tokens: 2 * out * in * tokens."""
    return {name: 2 * o * i * tokens for name, (o, i) in shape.linear_shapes.items()}


def attention_flops(shape: ModelShape, seqlen: int, windows: int = 1) -> int:
    """Forward FLOPs of one block's attention products over ``windows`` windows of ``seqlen`` tokens:
    Q K^T and P V, each 2 * T^2 * head_dim per query head, the full square (see the module docstring)."""
    heads, head_dim = heads_and_dim(shape)
    return windows * 2 * 2 * seqlen * seqlen * heads * head_dim


def matmul_flops(shape: ModelShape, seqlen: int, windows: int = 1) -> dict[str, int]:
    """One block's forward over ``windows`` windows of ``seqlen`` tokens: {"linears", "attention"}.

    The micro-batch size does not matter: linears are per token, attention per window."""
    return {"linears": sum(linear_flops(shape, windows * seqlen).values()),
            "attention": attention_flops(shape, seqlen, windows)}


def head_flops(shape: ModelShape, positions: int) -> int:
    """The lm_head product over ``positions`` positions: 2 * vocab * hidden each (its backward, the input
    gradient, is as much again; the head weight gets no gradient)."""
    return 2 * shape.vocab * shape.hidden * positions


def grad_head_positions(seqlen: int, head_chunk: int | None) -> int:
    """Positions the gradient sweep's head multiplies per window (``stream.backward.head_windows``): the
    whole window, T (its last row's logits are computed and dropped), unless chunked, then the T-1
    predicted ones. (Eval's ``window_nll`` always multiplies T-1.)"""
    return seqlen if head_chunk is None or head_chunk >= seqlen - 1 else seqlen - 1


def lsq_flops(out_features: int, in_features: int) -> dict[str, int]:
    """``methods.update.lsq_update`` (``--solver direct``) on one [out, in] linear, counted with half the columns kept
    per row (50%; the planner does not know the pattern): the target W H (2 out in^2), per row a Cholesky of its
    k x k system (k^3/3) and the two triangular solves (2 k^2)."""
    k = max(1, in_features // 2)
    return {"lsq_target": 2 * out_features * in_features * in_features,
            "lsq_cholesky": out_features * (k * (k + 1) * (2 * k + 1) // 6),
            "lsq_solve": out_features * 2 * k * k}


# --solver iterative: conjugate-gradient iterations per row (each one [rows, in] x [in, in] product) at the default
# --solver-tol 3e-2, averaged over the rows (rows stop on their own, so the products cost the mean). Measured on
# SmolLM2-135M pruned with GBLM + lsq at 50% (32 x 512 calibration): 7.8 per row on average over its 210 linears
# (the slowest row of a linear: 10 on average, 18 at most). The planner's estimate, rounded up: a smaller
# --solver-tol needs more.
LSQ_ITERATIONS = 8


def lsq_factor_flops(in_features: int) -> dict[str, int]:
    """``methods.solve.factor_hessian`` on one [in, in] Hessian, once per distinct input (the linears reading it share
    the factor): an fp32 Cholesky (n(n+1)(2n+1)/6, LAWN 41 as ``sparsegpt_flops``), ``cholesky_inverse``
    ((4n^3 + 3n^2 + 5n)/6) and the inverse's accuracy probe ``H (G z)`` on INVERSE_PROBES columns (2 x 2 n^2 each).
    When the probe finds fp32 not accurate enough the factor is formed again in float64: not counted (it depends on
    the data)."""
    n = in_features
    return {"lsq_factor_cholesky": n * (n + 1) * (2 * n + 1) // 6,
            "lsq_factor_inverse": (4 * n**3 + 3 * n**2 + 5 * n) // 6,
            "lsq_inverse_check": 2 * 2 * n * n * INVERSE_PROBES}


def lsq_iterative_flops(out_features: int, in_features: int, iterations: int | None = None) -> dict[str, int]:
    """``methods.solve.solve_kept`` on one [out, in] linear: ``iterations`` (None: LSQ_ITERATIONS) CG steps per row,
    each one product of the row with G, 2 in^2 (``multipliers_cg`` starts from lambda = 0 without one; the reported
    reconstruction error comes from the multipliers, without a product)."""
    iterations = LSQ_ITERATIONS if iterations is None else iterations
    return {"lsq_cg_products": iterations * 2 * out_features * in_features * in_features}


# --update gradual (methods.update.gradual): the default --gradual-steps 4 (2:4 takes 2, 4:8 takes 4) refits, each
# warm-started from the previous one, the intermediate ones to a 1e-1 tolerance. Its CG products per row over all
# steps, measured as ``iterations_mean_all_steps`` on SmolLM2-135M (GBLM, 50%, the default tolerances, 32 x 512
# calibration): 14.5 on average over the 210 linears. The planner's estimate, rounded up.
GRADUAL_ITERATIONS = 15


def gradual_flops(out_features: int, in_features: int) -> dict[str, int]:
    """``methods.update.gradual`` on one [out, in] linear: GRADUAL_ITERATIONS CG products of every row with G over all
    its steps (the scores and the masks are elementwise)."""
    return {"lsq_cg_products": GRADUAL_ITERATIONS * 2 * out_features * in_features * in_features}


def solve_flops(method: Method, solver: str, shape: ModelShape,
                groups: tuple[tuple[str, ...], ...]) -> dict[str, int]:
    """One block's weight solves (``method.solve``): per linear, and its factorizations once per distinct input
    (``groups``: the linears that read the same input, ``memory.probe.input_groups``) where the linears share them:
    SparseGPT and ``--update obs`` (SparseGPT's factor, ``job.factors``), the iterative lsq solver and ``--update
    gradual``. The direct lsq solver has no shared factor. ``solver``: --solver, resolved per linear width."""
    out: dict[str, int] = {}

    def add(terms: dict[str, int]) -> None:
        for term, value in terms.items():
            out[term] = out.get(term, 0) + value

    for group in groups:
        n = shape.linear_shapes[group[0]][1]
        if method.solve == "obs":
            for k, name in enumerate(group):
                terms = sparsegpt_flops(shape.linear_shapes[name][0], n)
                add(terms if k == 0 else {"sparsegpt_obs_update": terms["sparsegpt_obs_update"]})
        elif method.solve == "gradual":
            add(lsq_factor_flops(n))
            for name in group:
                add(gradual_flops(shape.linear_shapes[name][0], n))
        elif method.solve == "lsq" and resolve_solver(solver, n) == "direct":
            for name in group:
                add(lsq_flops(shape.linear_shapes[name][0], n))
        elif method.solve == "lsq":
            add(lsq_factor_flops(n))
            for name in group:
                add(lsq_iterative_flops(shape.linear_shapes[name][0], n))
    return out


def hessian_flops(in_features: int, tokens: int) -> int:
    """H += X^T X over ``tokens`` rows (``stream.stats.Hessian.add``: an addmm, the full square)."""
    return 2 * in_features * in_features * tokens


def sparsegpt_flops(out_features: int, in_features: int) -> dict[str, int]:
    """SparseGPT's solve of one [out, in] linear, as ``methods.sparsegpt.sparsegpt_prune`` runs it.

    * ``sparsegpt_cholesky``: two Cholesky factorizations, of H and of H^-1 (``cholesky_ex`` twice), each
      LAPACK potrf's n^3/3 + n^2/2 + n/6 = n(n+1)(2n+1)/6 FLOPs (LAPACK Working Note 41's counts, as
      LAPACK++ / MAGMA ``fmuls_potrf + fadds_potrf``);
    * ``sparsegpt_inverse``: H^-1 from its factor (``cholesky_inverse``: LAPACK potri = trtri + lauum),
      2n^3/3 + n^2/2 + 5n/6 FLOPs (LAWN 41);
    * ``sparsegpt_obs_update``: every pruned column's error spread over the columns at and after it, as
      the rank-1 updates inside a column block plus the lazy GEMM update of the later blocks. Per row
      that is 2 * sum_j (in - j) = in * (in + 1) FLOPs whatever ``--blocksize``, so out * in * (in + 1)
      in all: the paper's O(d_row * d_col^2) term (Frantar & Alistarh 2023, Sec. 3, whose O(d_col^3)
      term is the two lines above). It is not 2 * out * in^2: each column updates only the columns after
      it (a triangle), not all of them.
    """
    n = in_features
    return {"sparsegpt_cholesky": 2 * (n * (n + 1) * (2 * n + 1) // 6),
            "sparsegpt_inverse": (4 * n**3 + 3 * n**2 + 5 * n) // 6,  # exact: always a multiple of 6
            "sparsegpt_obs_update": out_features * n * (n + 1)}


def block_bytes(shape: ModelShape) -> int:
    """One block's tensors in the checkpoint's storage dtype (what a block read or a shard write moves)."""
    return shape.block_numel * dtype_bytes(shape.storage_dtype)


def head_bytes(shape: ModelShape) -> int:
    """The final norm and the head matrix (the embedding when tied) in the storage dtype."""
    return (shape.vocab * shape.hidden + shape.hidden) * dtype_bytes(shape.storage_dtype)


def embedding_rows_bytes(shape: ModelShape, tokens: int) -> int:
    """The embedding rows the windows use: at most min(vocab, tokens) distinct rows (an upper bound: the
    ids are not known here; ``stream.sweep.embed`` reads only the distinct ones)."""
    return min(shape.vocab, tokens) * shape.hidden * dtype_bytes(shape.storage_dtype)


# ---------------------------------------------------------------------------------------------------
# a phase's work


@dataclass(frozen=True)
class Work:
    """One phase's counted work. flops: term -> FLOPs; bytes_read / bytes_written: term -> bytes."""

    phase: str
    flops: dict[str, int] = field(default_factory=dict)
    bytes_read: dict[str, int] = field(default_factory=dict)
    bytes_written: dict[str, int] = field(default_factory=dict)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def total_bytes_read(self) -> int:
        return sum(self.bytes_read.values())

    @property
    def total_bytes_written(self) -> int:
        return sum(self.bytes_written.values())

    def to_dict(self) -> dict:
        return {"phase": self.phase, "flops": self.total_flops, "flops_by_term": dict(self.flops),
                "bytes_read": self.total_bytes_read, "bytes_written": self.total_bytes_written,
                "bytes_read_by_term": dict(self.bytes_read), "bytes_written_by_term": dict(self.bytes_written)}


def _nonzero(terms: dict[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in terms.items() if v}


def phase_work(shape: ModelShape, settings: PlanSettings, phase: str, *, done: int = 0) -> Work:
    """The work of ``phase`` ("gradient_sweep", "prune_sweep" or "eval") of a run with ``settings``.

    ``settings`` as the engine builds them in ``engine.run.open_run`` (method, nsamples, seqlen, compute
    and store dtypes, head_chunk, grad_dtype, checkpoint_every); "auto" dtypes are
    resolved as the planner does. A head_chunk or checkpoint_every of "auto" is refused: pass what the run
    uses (the plan's choice). batch_size and offload change no count (linears are per token, attention per
    window; the store's bytes are the same in RAM or in files). For "eval", nsamples is the number of
    evaluation windows and the method does not matter.

    ``done``: blocks an earlier, interrupted run already finished, so this run did less. prune_sweep:
    blocks replayed from their shards (forward only, read from the shard). gradient_sweep: the top
    ``done`` blocks' files exist (the sweep then recomputes the boundaries below them, skips the head
    and walks back from block L-done-1); ``done`` = num_blocks (a complete folder) is no work at all.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
    if settings.head_chunk == "auto":
        raise ValueError("head_chunk 'auto': pass the chunk the run uses (the plan's settings.head_chunk)")
    if not 0 <= done <= shape.num_blocks:
        raise ValueError(f"done must be between 0 and {shape.num_blocks}, got {done}")
    s = settings.resolved(shape.storage_dtype)
    chunk = None if s.head_chunk in (None, 0) else int(s.head_chunk)
    if phase == "eval":
        return eval_work(shape, s.nsamples, s.seqlen, s.compute_dtype)
    if phase == "owl_sweep":
        return owl_work(shape, s)
    if phase == "owl_weights":  # OWL from the gradient sweep's input statistics: the linears' weights, read once
        return Work(phase, {}, {"checkpoint: linear weights": shape.num_blocks * shape.linear_numel
                                * dtype_bytes(shape.storage_dtype)}, {})
    if phase == "gradient_sweep":
        if not s.spec.needs_gradients:
            return Work(phase)
        return _gradient_work(shape, s, chunk, done)
    return _prune_work(shape, s, done)


def _gradient_work(shape: ModelShape, s: PlanSettings, chunk: int | None, done: int) -> Work:
    """engine.gradients._Sweep: forward blocks 0..last-1, the head (fresh runs), then per segment its
    recomputed inputs and its reverse walk (every block's recomputed forward and backward, B windows per
    call; each window's weight gradient d_n^T x_n formed on its own by stream.backward.window_grad)."""
    L, n, t, d = shape.num_blocks, s.nsamples, s.seqlen, shape.hidden
    if done == L:
        return Work("gradient_sweep")
    k = s.checkpoint_every
    if k in (None, "auto"):
        raise ValueError("checkpoint_every 'auto': pass the k the run uses (the plan's settings.checkpoint_every)")
    start = L - done  # blocks start..L-1 are done
    fwd = L if done == 0 else start - 1  # blocks run forward: boundaries 0..fwd ("last" in the engine)
    head = 1 if done == 0 else 0
    rev = start  # blocks walked in reverse
    # --checkpoint-every k: each reverse segment c..e-1 first runs blocks c..e-2 again from block c's kept input
    again = sum(e - c - 1 for c, e in segments(start, kept_boundaries(fwd, max(int(k), 1))))
    block = matmul_flops(shape, t, n)
    positions = grad_head_positions(t, chunk) * n
    flops = {
        "forward": fwd * sum(block.values()),
        "head_forward": head * head_flops(shape, positions),
        "head_backward": head * head_flops(shape, positions),  # input gradient only
        "checkpoint_recompute": again * sum(block.values()),  # segment inputs not kept by the forward
        "recompute": rev * sum(block.values()),
        "backward_input": rev * (block["linears"] + 2 * block["attention"]),  # linears' dX + attention's 4
        "weight_gradients": rev * block["linears"],  # per window, folded into the fp32 accumulators
    }
    boundary = store_nbytes((n, t, d), s.store_dtype)  # stored inputs (int8 ok)
    grads = n * t * d * dtype_bytes(s.compute_dtype)  # incoming-gradient buffers: always exact
    read = {
        "checkpoint: blocks": (fwd + again + rev) * block_bytes(shape),
        "checkpoint: head": head * head_bytes(shape),
        "checkpoint: embedding rows": embedding_rows_bytes(shape, n * t),
        "store: boundaries": (fwd + head + again + rev) * boundary,
        "store: incoming gradients": rev * grads,
        "state: incoming gradient loaded": grads if done else 0,  # a resume starts from the persisted one
    }
    written = {
        "store: boundaries": (fwd + 1 + again) * boundary,  # embed, every forward output (kept or scratch)
        "store: incoming gradients": (head + rev) * grads,
        "state: incoming gradient persisted": max(rev - 1, 0) * grads,  # after every block but block 0
        "gradient files": rev * shape.linear_numel * dtype_bytes(s.grad_dtype),
    }
    return Work("gradient_sweep", _nonzero(flops), _nonzero(read), _nonzero(written))


def _prune_work(shape: ModelShape, s: PlanSettings, done: int) -> Work:
    """engine.prune._PruneSweep: per block statistics forward (if any), the method, the pruned forward.

    The shard of the non-block tensors (embedding, final norm, head) is copied by engine.prune before the
    ``prune_sweep`` phase opens, so it is not this phase's work (model_bytes() - L * block_bytes() each way).
    """
    L, n, t, d = shape.num_blocks, s.nsamples, s.seqlen, shape.hidden
    meth = s.spec
    wanted = statistics_needed(meth, STATISTICS)
    todo = L - done  # blocks pruned here; the others are replayed (forward only)
    block = sum(matmul_flops(shape, t, n).values())
    flops = {"forward_statistics": todo * block if wanted else 0,
             "forward_dense_output_error": 0 if wanted else todo * block}  # magnitude: a dense forward for it
    groups = input_groups(shape)  # the linears reading the same input share their statistics and factorizations
    if "hessian" in wanted:  # one Hessian per distinct input (stream.stats.collect_inputs, share=True)
        flops["hessian"] = todo * sum(hessian_flops(shape.linear_shapes[g[0]][1], n * t) for g in groups)
    for term, value in solve_flops(meth, s.solver, shape, groups).items():
        flops[term] = todo * value
    flops["forward"] = L * block  # every block, pruned or replayed, makes the next block's inputs
    boundary = store_nbytes((n, t, d), s.store_dtype)
    # io.model.StreamedModel.stored_tensors reads a block again when the compute dtype cannot hold its stored values
    exact = s.compute_dtype == shape.storage_dtype or (
        s.compute_dtype == torch.float32 and shape.storage_dtype in (torch.bfloat16, torch.float16))
    read = {
        "checkpoint: blocks": todo * block_bytes(shape),
        "checkpoint: blocks again for their stored bytes": 0 if exact else todo * block_bytes(shape),
        "output shards: replayed blocks": done * block_bytes(shape),
        "checkpoint: embedding rows": embedding_rows_bytes(shape, n * t),
        "gradient files": todo * shape.linear_numel * dtype_bytes(s.grad_dtype) if meth.needs_gradients else 0,
        "store: boundaries": (L + (todo if wanted else 0)) * boundary,
        "store: dense outputs": todo * boundary,  # read back by the pruned forward (output error)
    }
    written = {
        "store: boundaries": (L + 1) * boundary,
        "store: dense outputs": todo * boundary,
        "output shards": todo * block_bytes(shape),  # the non-block shard is written before the phase
    }
    return Work("prune_sweep", _nonzero(flops), _nonzero(read), _nonzero(written))


def owl_work(shape: ModelShape, s: PlanSettings) -> Work:
    """engine.layerwise: the dense model's forward over every block with Σx² hooks (--layer-sparsity owl)."""
    L, n, t, d = shape.num_blocks, s.nsamples, s.seqlen, shape.hidden
    boundary = store_nbytes((n, t, d), s.store_dtype)
    flops = {"forward": L * sum(matmul_flops(shape, t, n).values())}
    read = {"checkpoint: blocks": L * block_bytes(shape),
            "checkpoint: embedding rows": embedding_rows_bytes(shape, n * t), "store: boundaries": L * boundary}
    written = {"store: boundaries": (L + 1) * boundary}
    return Work("owl_sweep", _nonzero(flops), _nonzero(read), _nonzero(written))


def eval_work(shape: ModelShape, windows: int, seqlen: int, compute_dtype: torch.dtype) -> Work:
    """engine.evaluate.streamed_perplexity: every block over all windows (in place in one RAM buffer of the
    compute dtype), then the fp32 head over each window's T-1 predicted positions."""
    L, t, d = shape.num_blocks, seqlen, shape.hidden
    hidden = windows * t * d * dtype_bytes(compute_dtype)
    flops = {"forward": L * sum(matmul_flops(shape, t, windows).values()),
             "head_forward_fp32": head_flops(shape, windows * (t - 1))}
    read = {"checkpoint: blocks": L * block_bytes(shape), "checkpoint: head": head_bytes(shape),
            "checkpoint: embedding rows": embedding_rows_bytes(shape, windows * t),
            "store: hidden states": (L + 1) * hidden}
    written = {"store: hidden states": (L + 1) * hidden}
    return Work("eval", _nonzero(flops), _nonzero(read), _nonzero(written))


def achieved(work: Work, seconds: float, peak: float | None) -> dict:
    """What a phase reached: its counted work, its seconds, FLOP/s and their fraction of ``peak``
    (None where seconds or peak are not positive). JSON-ready, for prune_report.json's phase entries."""
    rate = work.total_flops / seconds if seconds and seconds > 0 else None
    fraction = rate / peak if rate is not None and peak and peak > 0 else None
    fp32 = sum(v for k, v in work.flops.items() if k in FP32_TERMS)  # runs at the fp32 peak, not the run dtype's
    return {**work.to_dict(), "fp32_flops": fp32, "seconds": seconds, "achieved_flops_per_s": rate,
            "peak_flops_per_s": peak, "fraction_of_peak": fraction}
