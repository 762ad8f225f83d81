"""The engine's plan check: prediction recorded next to the measured phases, refusal before heavy work
naming the knob, ``--offload auto`` choosing disk under a small RAM budget without changing the output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowmem_gblm.calib.data import save_ids
from lowmem_gblm.config import CalibConfig, PruneConfig
from lowmem_gblm.errors import InputError
from lowmem_gblm.memory.tracker import current_rss
from tests.tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
N, T = 256, 128  # boundaries of 32 MiB at d=256: well above RSS noise


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("wide")
    model = make_tiny_llama(root / "model", layers=2, hidden=256, heads=4, kv_heads=2, inter=512, vocab=320,
                            max_pos=T, shard_size="1MB", tokenizer=False)
    ids = root / "ids.safetensors"
    save_ids(ids, torch.randint(320, (N, T), generator=torch.Generator().manual_seed(0)))
    return model, ids


def _config(model: Path, ids: Path, out: Path, n: int = N, **kw) -> PruneConfig:
    calib = CalibConfig(nsamples=n, seqlen=T, ids_file=str(ids))
    return PruneConfig(model_dir=str(model), out_dir=str(out), calib=calib, device="cpu", progress=False, **kw)


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here: {exc}")


def test_probe_allocates_nothing_real(tmp_path):
    """The probe runs the block's steps on fake tensors: predicting a block whose fp32 weights alone are 4 GiB leaves
    this process's peak RSS where it was (deterministic, unlike a wall-clock bound)."""
    from lowmem_gblm.memory.probe import probe
    from lowmem_gblm.memory.shape import load_shape

    d = 8192
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "intermediate_size": 4 * d,
           "num_attention_heads": 64, "num_key_value_heads": 64, "num_hidden_layers": 1, "vocab_size": 320,
           "max_position_embeddings": T, "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = load_shape(tmp_path / "config.json")
    weights = (4 * d * d + 3 * d * 4 * d) * 4  # q, k, v, o and the three MLP linears, fp32: 4 GiB
    _reset_peak_rss()
    base = current_rss()
    pr = probe(shape, "gblm", T, torch.float32, N, None)
    grown = _peak_rss() - base
    assert pr.grad_step > weights and pr.prune_step > weights and pr.head_grad > 0  # it did account for the block
    assert grown < weights // 16, f"the probe's peak RSS grew by {grown / 2**20:.0f} MiB: something ran for real"


def test_report_has_predicted_next_to_measured(wide, tmp_path):
    from lowmem_gblm.engine import prune

    model, ids = wide
    few = tmp_path / "ids16.safetensors"  # GBLM's backward per window: keep it short
    save_ids(few, torch.randint(320, (16, T), generator=torch.Generator().manual_seed(1)))
    report = prune(_config(model, few, tmp_path / "out", n=16, method="gblm", offload="cpu"))
    predicted = report["predicted"]
    assert predicted["fits"] and predicted["settings"]["offload"] == "cpu" and report["offload"] == "cpu"
    measured = {p["phase"]: p["peak_rss_bytes"] for p in report["phases"]}
    assert [p["phase"] for p in predicted["phases"]] == ["gradient_sweep", "prune_sweep"] == sorted(measured)
    for p in predicted["phases"]:
        assert p["host_peak_bytes"] > 0 and measured[p["phase"]] > 0
    # the engine's baseline is this process: the prediction lands near the measurement (loose here: shared CI)
    sweep = next(p for p in predicted["phases"] if p["phase"] == "gradient_sweep")
    assert abs(sweep["host_peak_bytes"] / measured["gradient_sweep"] - 1) < 0.3


def test_tiny_budget_refuses_naming_offload_disk(wide, tmp_path):
    model, ids = wide
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "cli.main", "prune", str(model), str(out), "--method", "wanda",
                          "--calib-ids", str(ids), "--nsamples", str(N), "--seqlen", str(T), "--device", "cpu",
                          "--offload", "cpu", "--cpu-memory", "64MiB", "-q"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 2, res.stderr
    assert "--offload disk" in res.stderr and "--no-plan-check" in res.stderr
    assert not out.exists()  # refused before any heavy work (nothing written)


def test_no_plan_check_runs_anyway(wide, tmp_path, caplog):
    from lowmem_gblm.engine import prune

    model, ids = wide
    with pytest.raises(InputError, match="--offload disk"):
        prune(_config(model, ids, tmp_path / "a", offload="cpu", cpu_memory="64MiB"))
    report = prune(_config(model, ids, tmp_path / "b", offload="cpu", cpu_memory="64MiB", plan_check=False))
    assert not report["predicted"]["fits"] and report["offload"] == "cpu"


def test_auto_picks_disk_under_a_small_ram_budget_same_bytes(wide, tmp_path):
    from lowmem_gblm.engine import prune
    from lowmem_gblm.memory.budget import RAM_MARGIN
    from lowmem_gblm.memory.plan import Budgets, PlanSettings, plan
    from lowmem_gblm.memory.shape import load_shape

    model, ids = wide
    ram_cpu = prune(_config(model, ids, tmp_path / "cpu", offload="cpu"))
    base = current_rss()
    peaks = {off: plan(load_shape(model), PlanSettings("wanda", N, T, offload=off, head_chunk=None,
                                                       phases=("prune_sweep",)), Budgets(), baseline=base
                       ).host_peak_bytes for off in ("cpu", "disk")}
    assert peaks["cpu"] - peaks["disk"] >= 2 * N * T * 256 * 4 * 0.99  # the two boundaries
    budget = int((peaks["cpu"] + peaks["disk"]) / 2 / RAM_MARGIN)
    auto = prune(_config(model, ids, tmp_path / "auto", offload="auto", cpu_memory=str(budget)))
    assert auto["offload"] == "disk" and auto["predicted"]["settings"]["offload"] == "disk"
    assert ram_cpu["offload"] == "cpu"
    names = sorted(p.name for p in (tmp_path / "cpu").iterdir() if p.name.endswith((".safetensors", ".json"))
                   and p.name != "prune_report.json")
    assert any(n.startswith("model-") for n in names)
    for name in names:
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes(), name
    # roomy budget: auto keeps the store in RAM
    roomy = prune(_config(model, ids, tmp_path / "roomy", offload="auto", cpu_memory="64GiB"))
    assert roomy["offload"] == "cpu"
    assert json.loads((tmp_path / "roomy" / "prune_report.json").read_text())["predicted"]["fits"]


def test_disk_too_small_for_fp32_gradient_files_names_grad_dtype(wide, tmp_path):
    from lowmem_gblm.memory.budget import plan_run
    from lowmem_gblm.memory.plan import Budgets, PlanSettings, plan
    from lowmem_gblm.memory.shape import load_shape

    model, _ = wide
    shape = load_shape(model)
    need = {gd: plan(shape, PlanSettings("gblm", N, T, offload="cpu", grad_dtype=gd), Budgets(), baseline=1).disk_bytes
            for gd in ("float32", "bfloat16")}
    assert need["bfloat16"] < need["float32"]
    free = (need["float32"] + need["bfloat16"]) // 2
    budgets = Budgets(gpu_memory=None, cpu_memory=None, disk_free=free, disk_dir=tmp_path)
    settings = PlanSettings("gblm", N, T, device="cpu", compute_dtype=torch.float32, offload="cpu",
                            phases=("gradient_sweep", "prune_sweep"))
    with pytest.raises(InputError, match="--grad-dtype bfloat16"):
        plan_run(shape, settings, budgets, check=True)
    chosen = plan_run(shape, replace(settings, grad_dtype="bfloat16"), budgets, check=True)
    offload = chosen.settings.offload
    assert chosen.fits and offload == "cpu"


def test_a_head_that_overflows_the_budget_suggests_head_chunk():
    """A large vocabulary's whole-window logits dominate: the refusal names --head-chunk first."""
    from lowmem_gblm.memory.plan import advice

    class _Phase:
        name, device_peak_bytes, host_peak_bytes, disk_bytes, terms = "gradient_sweep", 0, 7 << 30, 0, {}

        def dominant(self, _kind):
            return "compute: head step (norm + lm_head + 1-window fp32 loss/grad)", 6 << 30

    class _Plan:
        nsamples, seqlen, phases = 4, 2048, [_Phase()]
        shortfalls, budgets = {"cpu_memory": 4 << 30}, {"cpu_memory": 3 << 30}
        settings = SimpleNamespace(offload="disk", head_chunk=None, nproc=None, forward_microbatch=1)
        host_peak_bytes = 7 << 30

    (line,) = advice(_Plan(), run=True)
    assert "try --head-chunk 512" in line
    _Plan.settings = SimpleNamespace(offload="disk", head_chunk=512, nproc=None, forward_microbatch=1)
    assert "--head-chunk" not in advice(_Plan(), run=True)[0]
