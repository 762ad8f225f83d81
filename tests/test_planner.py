"""The planner: sizes, schema, knobs, and its host-peak prediction against a measured prune run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.planner_conformance import CI_CASES, KNOWN, MATRIX, conform, make_model, problems
from lowmem_gblm.errors import UsageError
from lowmem_gblm.memory.plan import Budgets, PlanSettings
from lowmem_gblm.memory.plan import plan as make_plan
from lowmem_gblm.memory.shape import load_shape
from lowmem_gblm.units import fmt_size, parse_size

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "configs"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def plan(model, method: str, nsamples: int, seqlen: int, *, gpu_memory=None, cpu_memory=None, disk_dir=None,
         disk_space=None, baseline=None, head_chunk="auto", device=None, **settings):
    """As the ``plan`` command: budgets as typed, compute on CUDA when a GPU budget is given, the head chunk
    chosen."""
    budgets = Budgets.from_options(gpu_memory, cpu_memory, disk_dir, disk_space)
    chosen = PlanSettings(method, nsamples, seqlen, device=device or ("cuda" if budgets.gpu_memory else "cpu"),
                          head_chunk=head_chunk, **settings)
    return make_plan(load_shape(model), chosen, budgets, baseline=baseline)


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("6GB") == 6 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234 and parse_size(None) is None
    with pytest.raises(Exception, match="24GiB"):
        parse_size("lots")


def test_head_chunks_and_batches_are_exact():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lowmem_gblm.stream.backward import head_windows
    from lowmem_gblm.stream.head import window_nll

    torch.manual_seed(0)
    norm = LlamaRMSNorm(16)
    w = torch.randn(40, 16, dtype=torch.float64)
    norm = norm.double()
    h = torch.randn(3, 11, 16, dtype=torch.float64)
    ids = torch.randint(40, (3, 11))
    cpu = torch.device("cpu")
    loss, grad = head_windows(norm, w, h[:1], ids[:1, 1:], cpu, torch.float64, chunk=None)
    ref_h = h[:1].clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(norm(ref_h), w)[0, :-1].float(), ids[0, 1:])
    (ref_g,) = torch.autograd.grad(ref, ref_h)
    assert loss.shape == (1,) and torch.allclose(loss[0], ref.detach(), atol=1e-6)
    assert torch.allclose(grad, ref_g, atol=1e-6)
    norm32 = LlamaRMSNorm(16)
    nll = window_nll(norm32, w.float(), h[0], ids[0, 1:], None)
    for chunk in (1, 3, 10):
        loss_c, grad_c = head_windows(norm, w, h[:1], ids[:1, 1:], cpu, torch.float64, chunk=chunk)
        assert torch.allclose(loss_c, loss, atol=1e-6) and torch.allclose(grad_c, grad, atol=1e-9)
        assert abs(window_nll(norm32, w.float(), h[0], ids[0, 1:], chunk) - nll) <= 1e-4 * abs(nll)
    # three windows in one call: each window's loss and gradient are its own (the losses are not mixed)
    for chunk in (None, 4):
        batched_loss, batched_grad = head_windows(norm, w, h, ids[:, 1:], cpu, torch.float64, chunk=chunk)
        for n in range(3):
            alone_loss, alone_grad = head_windows(norm, w, h[n:n + 1], ids[n:n + 1, 1:], cpu, torch.float64, chunk)
            assert torch.allclose(batched_loss[n], alone_loss[0], atol=1e-12)
            assert torch.allclose(batched_grad[n], alone_grad[0], atol=1e-12)


def test_knobs_and_advice(tmp_path):
    cfg = BENCH / "llama-7b.json"
    roomy = plan(cfg, "wanda", 2, 512, gpu_memory="24GiB", cpu_memory="64GiB", baseline=1)
    assert roomy.fits and roomy.settings.offload == "cpu" and roomy.settings.head_chunk is None
    assert [p.name for p in roomy.phases] == ["prune_sweep", "eval"]  # no gradient sweep for Wanda
    # host too small for the boundaries in RAM, no disk given: says which knob fixes it
    tight = plan(cfg, "wanda", 512, 512, gpu_memory="24GiB", cpu_memory="4GiB", baseline=1)
    assert not tight.fits
    assert any("--disk" in a for a in tight.advice)
    with_disk = plan(cfg, "wanda", 512, 512, gpu_memory="24GiB", cpu_memory="4GiB", disk_space="1TB", baseline=1)
    assert with_disk.fits and with_disk.settings.offload == "disk"
    # with a large vocabulary (LLaMA-3-1B-like shape) the whole-window head (fp32 logits, log-softmax) is the
    # largest device step; a budget under it and over every block step makes the planner chunk the head
    big_vocab = json.loads(cfg.read_text()) | {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                                                "num_attention_heads": 32, "num_key_value_heads": 8}
    cfg2 = tmp_path / "config.json"
    cfg2.write_text(json.dumps(big_vocab))
    long = plan(cfg2, "wanda", 2, 2048, gpu_memory="24GiB", cpu_memory="64GiB", baseline=1)
    steps = long.phase("eval").terms["device_steps"]
    floor = max(steps["block"], long.phase("prune_sweep").device_peak_bytes)
    assert steps["head"] > floor
    squeezed = plan(cfg2, "wanda", 2, 2048, gpu_memory=(steps["head"] + floor) // 2, cpu_memory="64GiB", baseline=1)
    assert squeezed.fits and squeezed.settings.head_chunk is not None
    assert squeezed.device_peak_bytes < steps["head"]


def test_plan_json_schema(tmp_path):
    res = _cli("plan", str(BENCH / "llama-13b.json"), "--method", "wanda", "--nsamples", "4", "--seqlen", "256",
               "--gpu-memory", "6GiB", "--cpu-memory", "32GiB", "--disk", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    data = json.loads(lines[0])
    for key in ("device_peak_bytes", "host_peak_bytes", "disk_bytes"):
        assert isinstance(data[key], int) and data[key] > 0
    assert isinstance(data["fits"], bool)
    assert {p["name"] for p in data["phases"]} == {"prune_sweep", "eval"}
    for p in data["phases"]:
        assert {"name", "device_peak_bytes", "host_peak_bytes", "disk_bytes"} <= set(p)
    assert data["device_peak_bytes"] == max(p["device_peak_bytes"] for p in data["phases"])
    assert {"device", "offload", "compute_dtype", "store_dtype", "head_chunk"} <= set(data["settings"])
    human = _cli("plan", str(BENCH / "llama-13b.json"), "--method", "wanda", "--nsamples", "4", "--seqlen", "256")
    assert human.returncode == 0 and "prune_sweep" in human.stdout and "fits" in human.stdout
    bad = _cli("plan", str(BENCH / "llama-13b.json"), "--gpu-memory", "lots")
    assert bad.returncode == 2 and "lots" in bad.stderr


@pytest.fixture(scope="module")
def conformance_dir(tmp_path_factory) -> Path:
    """The conformance models (one per family kind) and ids, built once for the module's cases."""
    return tmp_path_factory.mktemp("conformance")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=(
    [] if c in CI_CASES else [pytest.mark.matrix]) + ([pytest.mark.xfail(reason=KNOWN[c.id])] if c.id in KNOWN else []))
    for c in MATRIX])
def test_host_peak_prediction_conforms(conformance_dir, case):
    """The plan's promise, HOST_PEAK_BOUND of the peak RSS each phase measured, for method x update x store x family
    kind (benchmarks/planner_conformance.py): a fresh CPU prune process per case; the engine's own prediction and a
    re-plan from the report's settings, which must choose the engine's settings.
    Only SparseGPT's and OBS's data-dependent steps may be counted analytically. CI runs CI_CASES; ``-m matrix``
    the rest."""
    model, ids = make_model(case.kind, conformance_dir)
    row = conform(case, model, ids, conformance_dir / f"out-{case.id}")
    assert sorted(p["phase"] for p in row["phases"]) == (
        ["gradient_sweep", "prune_sweep"] if case.method == "gblm" else ["prune_sweep"])
    assert not problems(row), problems(row)
    if case.method != "sparsegpt" and case.update != "obs":
        assert row["analytic"] == 0, row  # the probe ran the engine's own steps on fake tensors


def test_gblm_disk_peaks_follow_the_gradient_file_dtype():
    """LLaMA-13B shapes by hand: 40 blocks; per block 4*5120^2 attention + 3*5120*13824 MLP linear weights and
    two 5120 norms; embedding + head 2*32000*5120 and the final norm; bf16 checkpoint."""
    lin = 4 * 5120 * 5120 + 3 * 5120 * 13824
    blk = 2 * (lin + 2 * 5120)  # one block shard, bf16
    rest = 2 * (2 * 32000 * 5120 + 5120)
    model = rest + 40 * blk
    f32 = plan(BENCH / "llama-13b.json", "gblm", 8, 128, offload="cpu", baseline=1)
    bf16 = plan(BENCH / "llama-13b.json", "gblm", 8, 128, offload="cpu", baseline=1, grad_dtype="bfloat16")
    incoming = 2 * 8 * 128 * 5120 * 4  # the incoming gradient persisted for resume: old + new copy (fp32 on CPU)
    assert f32.phase("gradient_sweep").disk_bytes == 40 * lin * 4 + incoming
    assert bf16.phase("gradient_sweep").disk_bytes == 40 * lin * 2 + incoming
    # prune sweep: each block's gradient file goes once its shard is written, so the peak is at an end:
    # fp32 files outweigh a bf16 shard -> at the first block; bf16 files are a little smaller -> at the last
    assert f32.phase("prune_sweep").disk_bytes == rest + 40 * lin * 4 + blk
    assert bf16.phase("prune_sweep").disk_bytes == rest + 2 * lin + 40 * blk == model + 2 * lin
    assert bf16.settings.grad_dtype == "bfloat16"
    # a disk too small for fp32 files names the knob
    tight = plan(BENCH / "llama-13b.json", "gblm", 8, 128, offload="cpu", baseline=1, disk_space="40GB")
    assert not tight.fits and any("--grad-dtype bfloat16" in a for a in tight.advice), tight.advice
    assert plan(BENCH / "llama-13b.json", "gblm", 8, 128, offload="cpu", baseline=1, disk_space="40GB",
                grad_dtype="bfloat16").fits
    with pytest.raises(UsageError, match="grad-dtype"):
        plan(BENCH / "llama-13b.json", "gblm", 8, 128, grad_dtype="int4")


def test_host_advice_names_the_lean_knobs_with_what_they_save():
    """Short of host RAM on the CPU, the advice quotes --no-prefetch and --chunk-windows N with the bytes of the
    terms they remove; re-planned with them the host peak drops by exactly those bytes."""
    cfg, gib = BENCH / "llama-13b.json", 2**30
    kw = dict(offload="disk", disk_space="1TB", baseline=1, grad_dtype="bfloat16", compute_dtype="bfloat16")
    full = plan(cfg, "gblm", 16, 2048, **kw)
    host = full.phase("gradient_sweep").terms["host"]
    ahead = host["next block prefetched"]
    totals = host["compute: accumulators' chunk-sum totals (writer)"]
    assert ahead > 0 and totals > 0
    tight = plan(cfg, "gblm", 16, 2048, cpu_memory=full.host_peak_bytes - gib, **kw)
    assert not tight.fits
    (line,) = [a for a in tight.advice if a.startswith("host RAM short")]
    assert f"--no-prefetch (-{fmt_size(ahead)}" in line
    assert f"--chunk-windows 16 (one reduction chunk: -{fmt_size(totals)}" in line
    lean = plan(cfg, "gblm", 16, 2048, cpu_memory=full.host_peak_bytes - gib, prefetch=False, chunk_windows=16, **kw)
    assert lean.fits and not any("--no-prefetch" in a or "--chunk-windows" in a for a in lean.advice)
    assert lean.phase("gradient_sweep").host_peak_bytes == full.phase("gradient_sweep").host_peak_bytes - ahead - totals
    # a setting already lean is not advised again
    again = plan(cfg, "gblm", 16, 2048, cpu_memory=lean.host_peak_bytes - gib, prefetch=False, chunk_windows=16, **kw)
    assert not again.fits and not any("--no-prefetch" in a or "--chunk-windows" in a for a in again.advice)
