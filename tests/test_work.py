"""Counted work (memory.work): hand-computed goldens on a 1-block model, cross-checks against torch's own
FlopCounterMode on the engine's step functions, and the cached matmul-peak benchmark.

The tiny model: 1 block, hidden 64, 4 heads of 16 (2 KV heads), intermediate 128, vocab 320, untied, fp32.
Its linears [out, in]: q 64x64, k 32x64, v 32x64, o 64x64, gate 128x64, up 128x64, down 64x128, so
sum(out*in) = 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192 = 36864 and one token through the linears
costs 2 * 36864 = 73728 FLOPs. Windows: N = 2 of T = 16 tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lowmem_gblm.errors import UsageError
from lowmem_gblm.io.model import linear_names
from lowmem_gblm.mask import Pattern
from lowmem_gblm.memory import matmul_peak, work
from lowmem_gblm.memory.plan import PlanSettings
from lowmem_gblm.memory.shape import load_shape
from lowmem_gblm.methods import MethodOptions, get_method, update
from lowmem_gblm.methods.apply import BlockPruner, statistics_needed
from lowmem_gblm.methods.sparsegpt import sparsegpt_prune
from lowmem_gblm.stream import backward
from lowmem_gblm.stream.compare import OutputError
from lowmem_gblm.stream.context import BlockContext, run_block
from lowmem_gblm.stream.head import window_nll
from lowmem_gblm.stream.stats import STATISTICS, collect_inputs
from lowmem_gblm.stream.store import ActivationStore
from lowmem_gblm.stream.sweep import forward
from tests.tiny import make_tiny_llama

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"

N, T = 2, 16
CPU = torch.device("cpu")
LINEAR_TOKEN = 73728  # 2 * sum(out * in)
ATTN_WINDOW = 4 * 4 * 16 * T * T  # 2 products x 2 FLOPs x heads x head_dim x T^2 = 65536
HEAD_POS = 2 * 320 * 64  # 40960 per position


@pytest.fixture(scope="module")
def shape(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("work") / "m", layers=1, tokenizer=False)
    return load_shape(path)


def _settings(method: str, **kw) -> PlanSettings:
    return PlanSettings(method=method, nsamples=N, seqlen=T, **kw)


def _block(shape):
    torch.manual_seed(0)
    block = shape.family.cls("layer_class")(shape.config, layer_idx=0)  # real weights (default init)
    return block.requires_grad_(False).eval()


def _head(shape):
    torch.manual_seed(1)
    norm = shape.family.cls("norm_class")(shape.hidden, eps=1e-5).requires_grad_(False).eval()
    return norm, torch.randn(shape.vocab, shape.hidden) * 0.05


def _stores(shape):
    """(src, dst): N random calibration windows, and the next block's inputs."""
    src = ActivationStore("cpu").new((N, T, shape.hidden), torch.float32, exact=True)
    dst = ActivationStore("cpu").new((N, T, shape.hidden), torch.float32, exact=True)
    torch.manual_seed(2)
    for n in range(N):
        src.put(n, torch.randn(1, T, shape.hidden))
    return src, dst


def _count(fn) -> dict[str, int]:
    """FLOPs FlopCounterMode sees in ``fn()``, by op name, with attention on SDPA's math backend (the CPU
    flash kernel has no formula in FlopCounterMode: it would count 0)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


# -------------------------------------------------------------------------------------- goldens


def test_matmul_flops_golden(shape):
    assert work.heads_and_dim(shape) == (4, 16)
    per = work.linear_flops(shape, T)
    assert per == {"self_attn.q_proj": 2 * 64 * 64 * T, "self_attn.k_proj": 2 * 32 * 64 * T,
                   "self_attn.v_proj": 2 * 32 * 64 * T, "self_attn.o_proj": 2 * 64 * 64 * T,
                   "mlp.gate_proj": 2 * 128 * 64 * T, "mlp.up_proj": 2 * 128 * 64 * T,
                   "mlp.down_proj": 2 * 64 * 128 * T}
    assert work.matmul_flops(shape, T) == {"linears": 1179648, "attention": 65536}
    assert work.matmul_flops(shape, T, windows=N) == {"linears": 2 * 1179648, "attention": 2 * 65536}
    assert work.head_flops(shape, 1) == HEAD_POS
    assert work.grad_head_positions(T, None) == T  # the whole window's logits (the last row is dropped)
    assert work.grad_head_positions(T, 4) == T - 1
    assert work.grad_head_positions(T, T - 1) == T


def test_lsq_iterative_terms_golden():
    # n = 64: potrf 89440, potri 176864 (as SparseGPT's); the probe: H (G z) for 4 columns z, 2 x 2 n^2 x 4
    assert work.lsq_factor_flops(64) == {"lsq_factor_cholesky": 89440, "lsq_factor_inverse": 176864,
                                         "lsq_inverse_check": 16 * 64 * 64}
    assert work.lsq_iterative_flops(32, 64, 3) == {"lsq_cg_products": 3 * 2 * 32 * 64 * 64}
    assert work.lsq_iterative_flops(1, 1) == {"lsq_cg_products": 2 * work.LSQ_ITERATIONS}
    assert work.gradual_flops(32, 64) == {"lsq_cg_products": work.GRADUAL_ITERATIONS * 2 * 32 * 64 * 64}
    with pytest.raises(UsageError, match="--solver"):
        work.phase_work(load_shape(BENCH / "llama-7b.json"), _settings("wanda+lsq", solver="cg"), "prune_sweep")


def test_sparsegpt_terms_golden():
    assert work.hessian_flops(64, 32) == 2 * 64 * 64 * 32
    # LAWN 41, n = 64: potrf = n(n+1)(2n+1)/6 = 64*65*129/6 = 89440; potri = (4n^3 + 3n^2 + 5n)/6 = 176864
    assert work.sparsegpt_flops(32, 64) == {"sparsegpt_cholesky": 2 * 89440, "sparsegpt_inverse": 176864,
                                            "sparsegpt_obs_update": 32 * 64 * 65}
    assert work.sparsegpt_flops(1, 1) == {"sparsegpt_cholesky": 2, "sparsegpt_inverse": 2, "sparsegpt_obs_update": 2}


def test_gradient_sweep_golden(shape):
    w = work.phase_work(shape, _settings("gblm"), "gradient_sweep")
    fwd = N * (LINEAR_TOKEN * T + ATTN_WINDOW)  # 2490368
    assert w.flops == {"forward": fwd, "head_forward": N * T * HEAD_POS, "head_backward": N * T * HEAD_POS,
                       "recompute": fwd, "backward_input": N * (LINEAR_TOKEN * T + 2 * ATTN_WINDOW),
                       "weight_gradients": N * LINEAR_TOKEN * T}
    assert w.total_flops == 12582912
    block = (36864 + 2 * 64) * 4  # linears + two RMSNorm weights, fp32
    boundary = N * T * 64 * 4
    assert w.bytes_read == {"checkpoint: blocks": 2 * block, "checkpoint: head": (320 * 64 + 64) * 4,
                            "checkpoint: embedding rows": min(320, N * T) * 64 * 4,
                            "store: boundaries": 3 * boundary, "store: incoming gradients": boundary}
    assert w.bytes_written == {"store: boundaries": 2 * boundary, "store: incoming gradients": 2 * boundary,
                               "gradient files": 36864 * 4}
    chunked = work.phase_work(shape, _settings("gblm", head_chunk=4), "gradient_sweep")
    assert chunked.flops["head_forward"] == chunked.flops["head_backward"] == N * (T - 1) * HEAD_POS
    half = work.phase_work(shape, _settings("gblm", grad_dtype="bfloat16"), "gradient_sweep")
    assert half.bytes_written["gradient files"] == 36864 * 2


def test_gradient_sweep_resume(tmp_path):
    shape = load_shape(make_tiny_llama(tmp_path / "m", layers=3, tokenizer=False))
    s = _settings("gblm")
    fresh = work.phase_work(shape, s, "gradient_sweep")
    block = sum(work.matmul_flops(shape, T, N).values())
    assert fresh.flops["forward"] == 3 * block and fresh.flops["recompute"] == 3 * block
    assert fresh.bytes_written["state: incoming gradient persisted"] == 2 * N * T * 64 * 4  # blocks 2, 1
    resumed = work.phase_work(shape, s, "gradient_sweep", done=1)  # block 2 done: forward 0..1, reverse 1..0
    assert resumed.flops["forward"] == block and resumed.flops["recompute"] == 2 * block
    assert "head_forward" not in resumed.flops
    assert resumed.bytes_read["state: incoming gradient loaded"] == N * T * 64 * 4
    assert work.phase_work(shape, s, "gradient_sweep", done=3).total_flops == 0
    with pytest.raises(ValueError):
        work.phase_work(shape, s, "gradient_sweep", done=4)


def test_gradient_sweep_checkpoint_every(tmp_path):
    """--checkpoint-every k: the forward keeps inputs 0, k, 2k, ... and L; each reverse segment c..e-1 first
    runs blocks c..e-2 again. L = 5, k = 2: kept 0, 2, 4, 5; segments (4,5), (2,4), (0,2): 2 recomputed."""
    shape = load_shape(make_tiny_llama(tmp_path / "m", layers=5, tokenizer=False))
    block = sum(work.matmul_flops(shape, T, N).values())
    one = work.phase_work(shape, _settings("gblm"), "gradient_sweep")
    assert "checkpoint_recompute" not in one.flops
    two = work.phase_work(shape, _settings("gblm", checkpoint_every=2), "gradient_sweep")
    assert two.flops["checkpoint_recompute"] == 2 * block
    assert two.total_flops == one.total_flops + 2 * block
    assert two.bytes_written["store: boundaries"] == one.bytes_written["store: boundaries"] + 2 * N * T * 64 * 4
    assert two.bytes_read["checkpoint: blocks"] == one.bytes_read["checkpoint: blocks"] + 2 * 36992 * 4
    # resumed with block 4 done: the forward runs blocks 0..2 and keeps inputs 0, 2 and 3 (the top one);
    # segments (3,4), (2,3), (0,2): 1 recomputed
    assert work.phase_work(shape, _settings("gblm", checkpoint_every=2), "gradient_sweep",
                           done=1).flops["checkpoint_recompute"] == block
    with pytest.raises(ValueError):
        work.phase_work(shape, _settings("gblm", checkpoint_every="auto"), "gradient_sweep")


def test_prune_sweep_golden(shape):
    fwd = N * (LINEAR_TOKEN * T + ATTN_WINDOW)
    gblm = work.phase_work(shape, _settings("gblm"), "prune_sweep")
    assert gblm.flops == {"forward_statistics": fwd, "forward": fwd}
    # the statistics forward writes the dense outputs, the pruned forward reads them back (output error)
    assert gblm.bytes_read == {"checkpoint: blocks": 36992 * 4, "checkpoint: embedding rows": N * T * 64 * 4,
                               "gradient files": 36864 * 4, "store: boundaries": 2 * N * T * 64 * 4,
                               "store: dense outputs": N * T * 64 * 4}
    assert gblm.bytes_written == {"store: boundaries": 2 * N * T * 64 * 4, "output shards": 36992 * 4,
                                  "store: dense outputs": N * T * 64 * 4}
    assert work.phase_work(shape, _settings("wanda"), "prune_sweep").flops == gblm.flops
    # magnitude needs no statistics: the pruned block's forward (it still makes the next inputs) and one dense
    # forward for the output error
    mag = work.phase_work(shape, _settings("magnitude"), "prune_sweep")
    assert mag.flops == {"forward": fwd, "forward_dense_output_error": fwd}
    assert mag.bytes_read["store: boundaries"] == N * T * 64 * 4
    sgpt = work.phase_work(shape, _settings("sparsegpt"), "prune_sweep")
    # 4 distinct inputs (q/k/v, o, gate/up, down) share one Hessian and one factorization each:
    # sum(in^2) = 3 * 64^2 + 128^2 = 28672; potrf(64) = 89440 (x3), potrf(128) = 128*129*257/6 = 707264;
    # potri(64) = 176864 (x3), potri(128) = (4*128^3 + 3*128^2 + 5*128)/6 = 1406400
    obs_update = (64 + 32 + 32 + 64 + 128 + 128) * 64 * 65 + 64 * 128 * 129
    assert sgpt.flops == {
        "forward_statistics": fwd, "forward": fwd,
        "hessian": 2 * 28672 * N * T,
        "sparsegpt_cholesky": 2 * (3 * 89440 + 707264),
        "sparsegpt_inverse": 3 * 176864 + 1406400,
        "sparsegpt_obs_update": obs_update,
    }
    # --update obs (methods.update.obs_update) shares SparseGPT's factor the same way: the same FLOPs
    obs = work.phase_work(shape, _settings("wanda+obs"), "prune_sweep")
    assert obs.flops == sgpt.flops
    # --update lsq, iterative: per input one fp32
    # Cholesky, its inverse and the inverse's probe (16 in^2); per linear LSQ_ITERATIONS = 8 products with G,
    # 2 out in^2 each: sum(out in^2) = 64*64^2 * 2 + 32*64^2 * 2 + 128*64^2 * 2 + 64*128^2 = 2883584
    lsq = {"forward_statistics": fwd, "forward": fwd, "hessian": 2 * 28672 * N * T,
           "lsq_factor_cholesky": 3 * 89440 + 707264, "lsq_factor_inverse": 3 * 176864 + 1406400,
           "lsq_inverse_check": 16 * 28672, "lsq_cg_products": 8 * 2 * 2883584}
    assert work.LSQ_ITERATIONS == 8
    assert work.phase_work(shape, _settings("wanda+lsq", solver="iterative"), "prune_sweep").flops == lsq
    assert work.phase_work(shape, _settings("gblm+lsq", solver="iterative"), "prune_sweep").flops == lsq
    # auto: the direct solve on the linears narrower than 128 inputs, the iterative one on down_proj (128 wide)
    auto = work.phase_work(shape, _settings("wanda+lsq"), "prune_sweep").flops
    narrow = 64 + 32 + 32 + 64 + 128 + 128  # the rows of the 64-wide linears (k = 32 kept per row)
    assert auto == {"forward_statistics": fwd, "forward": fwd, "hessian": 2 * 28672 * N * T,
                    "lsq_target": 2 * narrow * 64 * 64, "lsq_cholesky": narrow * (32 * 33 * 65 // 6),
                    "lsq_solve": narrow * 2 * 32 * 32, "lsq_factor_cholesky": 707264, "lsq_factor_inverse": 1406400,
                    "lsq_inverse_check": 16 * 128 * 128, "lsq_cg_products": 8 * 2 * 64 * 128 * 128}
    # --update gradual: the same factorization, GRADUAL_ITERATIONS products with G per linear over all its steps
    gradual = lsq | {"lsq_cg_products": work.GRADUAL_ITERATIONS * 2 * 2883584}
    assert work.phase_work(shape, _settings("gblm+gradual"), "prune_sweep").flops == gradual
    # the direct solver keeps its per-linear count (half the columns kept: k = in / 2)
    direct = work.phase_work(shape, _settings("wanda+lsq", solver="direct"), "prune_sweep")
    rows = 64 + 32 + 32 + 64 + 128 + 128  # the linears 64 wide (k = 32); down_proj: 64 rows 128 wide (k = 64)
    assert direct.flops == {"forward_statistics": fwd, "forward": fwd, "hessian": 2 * 28672 * N * T,
                            "lsq_target": 2 * 2883584,
                            "lsq_cholesky": rows * (32 * 33 * 65 // 6) + 64 * (64 * 65 * 129 // 6),
                            "lsq_solve": rows * 2 * 32 * 32 + 64 * 2 * 64 * 64}
    replayed = work.phase_work(shape, _settings("sparsegpt"), "prune_sweep", done=1)
    assert replayed.flops == {"forward": fwd}
    assert replayed.bytes_read["output shards: replayed blocks"] == 36992 * 4


def test_eval_golden(shape):
    w = work.phase_work(shape, _settings("magnitude"), "eval")
    assert w.flops == {"forward": N * (LINEAR_TOKEN * T + ATTN_WINDOW), "head_forward_fp32": N * (T - 1) * HEAD_POS}
    assert w == work.eval_work(shape, N, T, torch.float32)
    assert w.bytes_written == {"store: hidden states": 2 * N * T * 64 * 4}


def test_bad_arguments(shape):
    with pytest.raises(ValueError):
        work.phase_work(shape, _settings("gblm"), "prune")
    with pytest.raises(ValueError):
        work.phase_work(shape, _settings("gblm", head_chunk="auto"), "gradient_sweep")


def test_achieved():
    w = work.Work("prune_sweep", {"forward": 3 * 10**9}, {"x": 5}, {"y": 7})
    a = work.achieved(w, 2.0, 6e9)
    assert a["flops"] == 3 * 10**9 and a["bytes_read"] == 5 and a["bytes_written"] == 7
    assert a["achieved_flops_per_s"] == 1.5e9 and a["fraction_of_peak"] == 0.25 and a["seconds"] == 2.0
    assert a["fp32_flops"] == 0
    assert work.achieved(work.Work("eval", {"forward": 1, "head_forward_fp32": 2}), 1.0, 1.0)["fp32_flops"] == 2
    assert work.achieved(w, 0.0, 6e9)["fraction_of_peak"] is None
    assert work.achieved(w, 1.0, None)["fraction_of_peak"] is None
    json.dumps(a)


# ------------------------------------------------------- cross-checks against FlopCounterMode


def test_forward_matches_flop_counter(shape):
    block = _block(shape)
    ctx = BlockContext.build(shape, T, CPU, torch.float32)
    x = torch.randn(N, T, shape.hidden)
    expected = work.matmul_flops(shape, T, windows=N)
    with torch.no_grad():
        counted = _count(lambda: run_block(block, ctx, x))
    assert counted["aten.mm"] == expected["linears"]  # exactly, every linear
    assert counted["aten.bmm"] == expected["attention"]  # math SDPA: the full square, as counted
    with torch.no_grad(), FlopCounterMode(display=False) as fc:  # the engine's CPU kernel: not counted
        run_block(block, ctx, x)
    assert fc.get_total_flops() == expected["linears"]


def test_block_backward_matches_flop_counter(shape):
    """stream.backward.block_windows (N windows in one call): recompute + backward_input + weight_gradients
    (each window's own d_n^T x_n)."""
    block = _block(shape)
    ctx = BlockContext.build(shape, T, CPU, torch.float32)
    linears, accs = backward.grad_accumulators(block, linear_names(block), CPU)
    samples, incoming = torch.randn(N, T, shape.hidden), torch.randn(N, T, shape.hidden)
    counted = _count(lambda: backward.block_windows(block, ctx, linears, accs, samples, incoming, "l1", CPU,
                                                    torch.float32))
    w = work.phase_work(shape, _settings("gblm"), "gradient_sweep")
    assert sum(counted.values()) == w.flops["recompute"] + w.flops["backward_input"] + w.flops["weight_gradients"]
    assert counted["aten.bmm"] == 3 * work.attention_flops(shape, T, N)  # forward + 2x forward backward


@pytest.mark.parametrize("chunk", [None, 4])
def test_head_matches_flop_counter(shape, chunk):
    norm, head = _head(shape)
    samples = torch.randn(N, T, shape.hidden)
    labels = torch.randint(shape.vocab, (N, T - 1))
    counted = _count(lambda: backward.head_windows(norm, head, samples, labels, CPU, torch.float32, chunk))
    w = work.phase_work(shape, _settings("gblm", head_chunk=chunk), "gradient_sweep")
    assert sum(counted.values()) == w.flops["head_forward"] + w.flops["head_backward"]
    counted = _count(lambda: window_nll(norm, head, samples[0], labels[0], chunk))
    assert sum(counted.values()) == work.eval_work(shape, 1, T, torch.float32).flops["head_forward_fp32"]


def test_gradient_phase_matches_flop_counter(shape):
    """The whole gradient sweep of the 1-block model through the engine's step functions, counted."""
    block = _block(shape)
    norm, head = _head(shape)
    ctx = BlockContext.build(shape, T, CPU, torch.float32)
    store = ActivationStore("cpu")
    b0, b1 = (store.new((N, T, shape.hidden), torch.float32, exact=True) for _ in range(2))
    for n in range(N):
        b0.put(n, torch.randn(1, T, shape.hidden))
    ids = torch.randint(shape.vocab, (N, T))

    def sweep():  # one window per call, as --batch-size 1 runs it
        forward(block, ctx, b0, b1, CPU, torch.float32)
        grads = [backward.head_windows(norm, head, b1.get(n), ids[n:n + 1, 1:], CPU, torch.float32)[1]
                 for n in range(N)]
        linears, accs = backward.grad_accumulators(block, linear_names(block), CPU)
        for n in range(N):
            backward.block_windows(block, ctx, linears, accs, b0.get(n), grads[n], "l1", CPU, torch.float32)

    counted = _count(sweep)
    assert sum(counted.values()) == work.phase_work(shape, _settings("gblm"), "gradient_sweep").total_flops


def test_sparsegpt_prune_step_matches_flop_counter(shape):
    """The prune sweep's SparseGPT block step: statistics forward with the Hessian hooks, the OBS solve of
    every linear, the pruned forward. FlopCounterMode has no formula for cholesky / cholesky_inverse, so it
    sees everything but those two terms."""
    block = _block(shape)
    ctx = BlockContext.build(shape, T, CPU, torch.float32)
    src, dst = _stores(shape)

    def step():
        _prune_step(block, ctx, src, dst, "sparsegpt", MethodOptions(blocksize=16))

    counted = _count(step)
    w = work.phase_work(shape, _settings("sparsegpt"), "prune_sweep")
    # FlopCounterMode has no formula for linalg, nor for the in-place addmm_ of stream.stats.Hessian.add
    uncounted = w.flops["sparsegpt_cholesky"] + w.flops["sparsegpt_inverse"] + w.flops["hessian"]
    assert sum(counted.values()) == w.total_flops - uncounted
    # the Hessian through its out-of-place twin, on the same [N*T, in] rows of each distinct input
    with FlopCounterMode(display=False) as fc:
        for i in (64, 64, 64, 128):  # q/k/v, o, gate/up, down
            x = torch.randn(N * T, i)
            torch.addmm(torch.zeros(i, i), x.t(), x)
    assert fc.get_total_flops() == w.flops["hessian"]


def _prune_step(block, ctx, src, dst, method: str, options: MethodOptions) -> None:
    """engine.prune._PruneSweep.prune_block on one process: the statistics forward (shared sets), every linear
    pruned by methods.apply.BlockPruner, the pruned forward compared with the dense outputs (the output error)."""
    names = linear_names(block)
    meth = get_method(method)
    with collect_inputs(block, names, statistics_needed(meth, STATISTICS), share=True) as stats:
        forward(block, ctx, src, dst, CPU, torch.float32)  # the dense outputs, kept for the output error
    stored = {f"model.layers.0.{n}.weight": block.get_submodule(n).weight.detach().clone() for n in names}
    pruner = BlockPruner(meth, Pattern.parse("unstructured", 0.5), options, CPU, torch.float32)
    pruner.prune(block, "model.layers.0.", stats, N, None, stored, names)
    forward(block, ctx, src, dst, CPU, torch.float32, on_output=OutputError(dst, CPU))


def test_lsq_iterative_prune_step_matches_flop_counter(shape, monkeypatch):
    """The prune sweep's Wanda + lsq block step with the iterative solver held to exactly 3 iterations per row (a
    tolerance no row reaches): every product FlopCounterMode sees is counted, with LSQ_ITERATIONS = 3."""
    block = _block(shape)
    ctx = BlockContext.build(shape, T, CPU, torch.float32)
    src, dst = _stores(shape)
    options = MethodOptions(solver="iterative", solver_tol=1e-12, solver_max_iter=3)
    iterations = []
    real = update.solve_kept
    monkeypatch.setattr(update, "solve_kept", lambda *a: iterations.append(r := real(*a)) or r)
    counted = _count(lambda: _prune_step(block, ctx, src, dst, "wanda+lsq", options))
    assert [r.diagnostics["iterations_mean"] for r in iterations] == [3.0] * 7  # every row ran 3 iterations
    assert all(r.diagnostics["iterations"] == 3.0 for r in iterations)
    monkeypatch.setattr(work, "LSQ_ITERATIONS", 3)
    w = work.phase_work(shape, _settings("wanda+lsq", solver="iterative"), "prune_sweep")
    uncounted = w.flops["lsq_factor_cholesky"] + w.flops["lsq_factor_inverse"] + w.flops["hessian"]
    assert sum(counted.values()) == w.total_flops - uncounted
    assert w.flops["lsq_cg_products"] == 3 * 2 * sum(o * i * i for o, i in shape.linear_shapes.values())


@pytest.mark.parametrize("blocksize", [1, 7, 128])
def test_obs_update_independent_of_blocksize(blocksize):
    torch.manual_seed(0)
    x = torch.randn(200, 24)
    weight, hessian = torch.randn(10, 24), 2 * x.T @ x / 200
    with FlopCounterMode(display=False) as fc:  # cholesky / cholesky_inverse: no formula, not counted
        sparsegpt_prune(weight, hessian, Pattern.parse("unstructured", 0.5), blocksize=blocksize)
    assert fc.get_total_flops() == work.sparsegpt_flops(10, 24)["sparsegpt_obs_update"] == 10 * 24 * 25


# ------------------------------------------------------------------------------------- the peak


def test_measured_peak_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(matmul_peak, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(matmul_peak, "PEAK_BUDGET_S", 5.0)
    monkeypatch.setattr(matmul_peak, "PEAK_SIZES", {"cpu": (32, 64)})  # small: two sizes on a loaded machine too
    peak = matmul_peak.measured_peak(CPU, torch.float32)
    assert peak > 0 and math.isfinite(peak)
    data = json.loads((tmp_path / matmul_peak.PEAK_FILE).read_text())
    key = matmul_peak.peak_key(CPU, torch.float32)
    assert data[key]["flops_per_s"] == peak and "float32" in key and f"threads={torch.get_num_threads()}" in key

    def no_benchmark(*_a, **_k):
        raise AssertionError("the cached peak should have been used")

    monkeypatch.setattr(matmul_peak, "benchmark_matmul", no_benchmark)
    assert matmul_peak.measured_peak("cpu", torch.float32) == peak
    measured = {"flops_per_s": 123.0, "n": 8, "seconds": 0.0}
    monkeypatch.setattr(matmul_peak, "benchmark_matmul", lambda *_a, **_k: measured)
    assert matmul_peak.measured_peak(CPU, torch.float32, refresh=True) == 123.0
    assert matmul_peak.measured_peak(CPU, torch.float64) == 123.0  # another dtype: another key, measured
    data = json.loads((tmp_path / matmul_peak.PEAK_FILE).read_text())
    assert data[key]["flops_per_s"] == 123.0 and matmul_peak.peak_key(CPU, torch.float64) in data


def test_measured_peak_ignores_a_damaged_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(matmul_peak, "CACHE_DIR", tmp_path)
    (tmp_path / matmul_peak.PEAK_FILE).write_text("{not json")
    monkeypatch.setattr(matmul_peak, "benchmark_matmul", lambda *_a, **_k: {"flops_per_s": 7.0, "n": 8, "seconds": 0.0})
    assert matmul_peak.measured_peak(CPU, torch.float32) == 7.0
    key = matmul_peak.peak_key(CPU, torch.float32)
    (tmp_path / matmul_peak.PEAK_FILE).write_text(json.dumps({key: {"flops_per_s": -1}}))
    assert matmul_peak.measured_peak(CPU, torch.float32) == 7.0


def test_peak_key_names_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert matmul_peak.peak_key("cuda:0", torch.bfloat16).split("|")[1:3] == ["cuda:Some GPU", "bfloat16"]
    assert matmul_peak.peak_key(CPU, torch.float32).split("|")[1].startswith("cpu:")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_peak_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(matmul_peak, "CACHE_DIR", tmp_path)
    peak = matmul_peak.measured_peak(torch.device("cuda"), torch.bfloat16)
    assert peak > 0 and math.isfinite(peak)
    assert matmul_peak.measured_peak("cuda", torch.bfloat16) == peak


def test_a_peak_a_phase_beat_is_measured_again(monkeypatch, tmp_path):
    """A cached peak below the rate a phase just reached was measured on a loaded machine: measured again."""
    monkeypatch.setattr(matmul_peak, "CACHE_DIR", tmp_path)
    key = matmul_peak.peak_key(CPU, torch.float32)
    (tmp_path / matmul_peak.PEAK_FILE).write_text(json.dumps({key: {"flops_per_s": 20.0, "n": 256, "seconds": 1}}))
    monkeypatch.setattr(matmul_peak, "benchmark_matmul",
                        lambda *_a, **_k: {"flops_per_s": 200.0, "n": 512, "seconds": 0.5, "sizes": 2})
    assert matmul_peak.measured_peak(CPU, torch.float32, at_least=15.0) == 20.0  # not beaten: cached
    assert matmul_peak.measured_peak(CPU, torch.float32, at_least=150.0) == 200.0
    assert json.loads((tmp_path / matmul_peak.PEAK_FILE).read_text())[key]["flops_per_s"] == 200.0


def test_a_benchmark_stopped_at_its_first_size_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(matmul_peak, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(matmul_peak, "benchmark_matmul",
                        lambda *_a, **_k: {"flops_per_s": 20.0, "n": 256, "seconds": 1.2, "sizes": 1})
    assert matmul_peak.measured_peak(CPU, torch.float32) == 20.0
    assert not (tmp_path / matmul_peak.PEAK_FILE).exists()


def test_the_benchmark_counts_its_sizes(monkeypatch):
    monkeypatch.setattr(matmul_peak, "PEAK_SIZES", {"cpu": (32, 64)})
    result = matmul_peak.benchmark_matmul(CPU, torch.float32, budget_s=5.0)
    assert result["sizes"] == 2 and result["n"] in (32, 64)
