"""GBLM: the streamed gradient sweep against full-model autograd, masks against an in-memory
reference, alpha=0 == Wanda, gradient-folder reuse, kill-and-resume, and mismatch refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm import testing_hooks
from lowmem_gblm.config import CalibConfig, GradientConfig, PruneConfig
from lowmem_gblm.engine import prune
from lowmem_gblm.engine.gradients import INCOMING_NAME, compute_gradients
from lowmem_gblm.errors import OutOfSpace
from lowmem_gblm.io.gradfiles import block_file
from lowmem_gblm.io.runstate import GRADIENTS_JSON, STATE_DIR
from lowmem_gblm.memory.plan import Budgets, PlanSettings, plan
from lowmem_gblm.memory.shape import load_shape
from lowmem_gblm.stream.segments import boundaries_held, kept_boundaries, recomputed_blocks, segments
from tests.reference import full_model as _full_model
from tests.reference import reference_gradients
from tests.tiny import make_tiny_llama

N, T = 4, 16  # calibration windows x tokens
VOCAB = 320  # tests.tiny default
REPO = Path(__file__).resolve().parents[1]
GRAD_TOL = 1e-5  # max |G_streamed - G_ref| / max |G_ref|, per tensor


# ---------------------------------------------------------------------------------------------
# fixtures and references


def _random_ids(folder: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    path = folder / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, VOCAB, (N, T), generator=g)}, str(path))
    return path


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> Path:
    return _random_ids(tmp_path_factory.mktemp("ids"), 7)


@pytest.fixture(scope="module")
def other_ids_file(tmp_path_factory) -> Path:
    return _random_ids(tmp_path_factory.mktemp("ids2"), 8)


def _ids(path: Path) -> torch.Tensor:
    return load_file(str(path))["input_ids"].long()


def _calib(ids_file: Path) -> CalibConfig:
    return CalibConfig(ids_file=str(ids_file), nsamples=N, seqlen=T)


def reference_gblm_masks(model_dir: Path, ids: torch.Tensor, grads: dict, alpha: float, sparsity: float) -> dict:
    """In-memory GBLM: whole model, block by block with earlier blocks already pruned; keep masks."""
    model = _full_model(model_dir)
    masks = {}
    for i, layer in enumerate(model.model.layers):
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        sums = {name: torch.zeros(m.in_features) for name, m in linears.items()}
        handles = []
        for name, m in linears.items():
            def hook(_mod, args, _name=name, _sums=sums):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                _sums[_name] += (x * x).sum(dim=0)

            handles.append(m.register_forward_pre_hook(hook))
        with torch.no_grad():
            for n in range(ids.shape[0]):
                model(ids[n:n + 1])
        for h in handles:
            h.remove()
        for name, m in linears.items():
            full = f"model.layers.{i}.{name}.weight"
            w = m.weight.data
            scaler = sums[name] / ids.shape[0]
            score = w.abs() * torch.sqrt(scaler).reshape(1, -1) + alpha * (w.abs() * grads[full])
            k = int(w.shape[1] * sparsity)
            drop = torch.sort(score, dim=1, stable=True).indices[:, :k]
            keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
            w.masked_fill_(~keep, 0)
            masks[full] = keep
    return masks


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for p in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(str(p)))
    return tensors


def _grad_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("block_*.safetensors"))}


def _prune(model_dir: Path, out: Path, ids_file: Path, **kw) -> dict:
    options = {"method": "gblm", "sparsity": 0.5, "device": "cpu", "progress": False, **kw}
    return prune(PruneConfig(model_dir=str(model_dir), out_dir=str(out), calib=_calib(ids_file), **options))


def _gradients(model_dir: Path, folder: Path, ids_file: Path, **kw) -> dict:
    options = {"device": "cpu", "progress": False, **kw}
    return compute_gradients(GradientConfig(model_dir=str(model_dir), out_dir=str(folder), calib=_calib(ids_file),
                                            **options))


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize(("which", "norm", "offload"), [
    ("tiny_model", "l1", "cpu"), ("tiny_model", "l2", "cpu"),
    ("tiny_tied", "l1", "cpu"), ("tiny_tied", "l2", "disk"),
])
def test_streamed_gradients_match_full_model_autograd(request, tmp_path, ids_file, which, norm, offload):
    model_dir = request.getfixturevalue(which)
    folder = tmp_path / "grads"
    report = _gradients(model_dir, folder, ids_file, grad_norm=norm, offload=offload)
    l1, l2, mean_loss = reference_gradients(model_dir, _ids(ids_file))
    ref = l1 if norm == "l1" else l2
    meta = json.loads((folder / GRADIENTS_JSON).read_text())
    assert meta["complete"] and meta["identity"]["grad_norm"] == norm
    assert sorted(meta["done"]) == ["0", "1", "2"]
    got = {}
    for i in range(3):
        got.update(load_file(str(folder / block_file(i))))
    assert sorted(got) == sorted(ref)  # every decoder linear, keyed by its checkpoint name
    for name, g in got.items():
        assert g.dtype == torch.float32 and g.shape == ref[name].shape
        err = float((g - ref[name]).abs().max() / ref[name].abs().max())
        assert err <= GRAD_TOL, (name, err)
    assert abs(report["mean_loss"] - mean_loss) <= 1e-5 * abs(mean_loss)
    # state is gone, the windows are saved for reuse
    assert not (folder / STATE_DIR / "store").exists()
    assert not (folder / STATE_DIR / INCOMING_NAME).exists()
    assert torch.equal(_ids(folder / "calibration_ids.safetensors"), _ids(ids_file))


@pytest.mark.parametrize("which", ["tiny_model", "tiny_tied"])
def test_gblm_masks_equal_in_memory_reference(request, tmp_path, ids_file, which):
    model_dir = request.getfixturevalue(which)
    _prune(model_dir, tmp_path / "out", ids_file)
    l1, _, _ = reference_gradients(model_dir, _ids(ids_file))
    masks = reference_gblm_masks(model_dir, _ids(ids_file), l1, alpha=100.0, sparsity=0.5)
    weights = _weights(tmp_path / "out")
    assert len(masks) == 21
    for name, keep in masks.items():
        assert torch.equal(weights[name] != 0, keep), name
    # the gradients computed inside prune are removed with the rest of the state
    assert not (tmp_path / "out" / STATE_DIR / "gradients").exists()


def test_alpha_zero_gives_wanda_bytes(tmp_path, tiny_model, ids_file):
    _prune(tiny_model, tmp_path / "gblm", ids_file, alpha=0.0)
    _prune(tiny_model, tmp_path / "wanda", ids_file, method="wanda")
    a, b = _shards(tmp_path / "gblm"), _shards(tmp_path / "wanda")
    assert len(a) == 4 and a == b


def test_reused_gradient_folder_gives_identical_shards(tmp_path, tiny_model, ids_file):
    _gradients(tiny_model, tmp_path / "grads", ids_file)
    _prune(tiny_model, tmp_path / "reused", ids_file, gradients=str(tmp_path / "grads"))
    _prune(tiny_model, tmp_path / "inside", ids_file)
    a, b = _shards(tmp_path / "reused"), _shards(tmp_path / "inside")
    assert len(a) == 4 and a == b
    report = json.loads((tmp_path / "reused" / "prune_report.json").read_text())
    assert "gradient_sweep" not in [p["phase"] for p in report["phases"]]
    report = json.loads((tmp_path / "inside" / "prune_report.json").read_text())
    assert "gradient_sweep" in [p["phase"] for p in report["phases"]]


def test_kill_and_resume_gives_identical_gradient_files(tmp_path, tiny_model, ids_file):
    _gradients(tiny_model, tmp_path / "clean", ids_file)
    folder = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "cli.main", "gradients", str(tiny_model), str(folder), "--calib-ids", str(ids_file),
           "--nsamples", str(N), "--seqlen", str(T), "--device", "cpu", "--offload", "disk", "--quiet"]
    env = {**os.environ, "LOWMEM_TEST_CRASH_AT": "gradient_block:2"}  # blocks 2 and 1 durable, then SIGKILL
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    meta = json.loads((folder / GRADIENTS_JSON).read_text())
    assert not meta["complete"] and sorted(meta["done"]) == ["1", "2"]
    assert (folder / STATE_DIR / INCOMING_NAME).is_file()
    assert not (folder / block_file(0)).exists()
    _gradients(tiny_model, folder, ids_file)  # resume (RAM store this time: the store kind is not identity)
    assert _grad_files(folder) == _grad_files(tmp_path / "clean")
    meta = json.loads((folder / GRADIENTS_JSON).read_text())
    assert meta["complete"] and not (folder / STATE_DIR / INCOMING_NAME).exists()
    assert not (folder / STATE_DIR / "store").exists()


def _cli(*args: str):
    return CliRunner().invoke(app, [*args, "--quiet"])


def test_mismatched_gradient_folder_is_refused(tmp_path, tiny_model, ids_file, other_ids_file):
    grads = tmp_path / "grads"
    _gradients(tiny_model, grads, ids_file)
    base = ["prune", str(tiny_model), "--method", "gblm", "--device", "cpu", "--nsamples", str(N),
            "--seqlen", str(T), "--gradients", str(grads)]
    res = _cli(*base[:2], str(tmp_path / "o1"), *base[2:], "--calib-ids", str(ids_file), "--grad-norm", "l2")
    assert res.exit_code == 2 and "grad_norm: 'l1' -> 'l2'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = _cli(*base[:2], str(tmp_path / "o2"), *base[2:], "--calib-ids", str(other_ids_file))
    assert res.exit_code == 2 and "calibration_sha256" in res.stderr
    res = _cli(*base[:2], str(tmp_path / "o3"), "--method", "gblm", "--device", "cpu", "--nsamples", str(N),
               "--seqlen", str(T), "--calib-ids", str(ids_file), "--gradients", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "no such folder" in res.stderr
    # the matching folder is accepted through the CLI too
    res = _cli(*base[:2], str(tmp_path / "o4"), *base[2:], "--calib-ids", str(ids_file))
    assert res.exit_code == 0, res.stderr
    # the gradients command itself refuses a folder made with other settings
    res = _cli("gradients", str(tiny_model), str(grads), "--calib-ids", str(ids_file), "--nsamples", str(N),
               "--seqlen", str(T), "--device", "cpu", "--grad-norm", "l2")
    assert res.exit_code == 2 and "grad_norm" in res.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_incoming_gradient_round_trip(tmp_path, dtype, kind):
    from lowmem_gblm.stream.store import ActivationStore, save_windows, saved_windows

    store = ActivationStore(kind, tmp_path / "store")
    src, dst = store.new((3, 5, 8), dtype, "a"), store.new((3, 5, 8), dtype, "b")
    data = torch.randn(3, 5, 8).to(dtype)
    for n in range(3):
        src.put(n, data[n:n + 1])
    path = tmp_path / "incoming.safetensors"
    save_windows(path, src.shape, src.dtype, "4", src.get)
    assert torch.equal(load_file(str(path))["grad"], data)  # a plain safetensors file
    with saved_windows(path, "3", dst.shape) as windows:
        assert windows is None  # persisted for another block: not used
    with saved_windows(path, "4", dst.shape) as windows:
        for k in range(len(dst)):
            dst.put(k, windows[k:k + 1])
    assert torch.equal(dst.get(0, 3), data)


def test_bfloat16_gradient_files_are_the_rounded_fp32_norms(tmp_path, tiny_model, ids_file):
    _gradients(tiny_model, tmp_path / "f32", ids_file, grad_norm="l2")
    _gradients(tiny_model, tmp_path / "bf16", ids_file, grad_norm="l2", grad_dtype="bfloat16")
    exact, half = {}, {}
    for i in range(3):
        exact.update(load_file(str(tmp_path / "f32" / block_file(i))))
        half.update(load_file(str(tmp_path / "bf16" / block_file(i))))
    assert sorted(half) == sorted(exact) and len(half) == 21
    for name, g in half.items():
        assert g.dtype == torch.bfloat16 and torch.equal(g, exact[name].to(torch.bfloat16)), name
    assert sum(p.stat().st_size for p in (tmp_path / "bf16").glob("block_*")) < \
        0.51 * sum(p.stat().st_size for p in (tmp_path / "f32").glob("block_*"))
    # the masks are GBLM's on the rounded norms (widened back to fp32 for scoring)
    _prune(tiny_model, tmp_path / "out", ids_file, grad_norm="l2", grad_dtype="bfloat16",
           gradients=str(tmp_path / "bf16"))
    rounded = {k: v.float() for k, v in half.items()}
    masks = reference_gblm_masks(tiny_model, _ids(ids_file), rounded, alpha=100.0, sparsity=0.5)
    weights = _weights(tmp_path / "out")
    for name, keep in masks.items():
        assert torch.equal(weights[name] != 0, keep), name
    # a bf16 folder is not silently taken for an fp32 run
    res = _cli("prune", str(tiny_model), str(tmp_path / "o2"), "--method", "gblm", "--device", "cpu",
               "--nsamples", str(N), "--seqlen", str(T), "--calib-ids", str(ids_file), "--grad-norm", "l2",
               "--gradients", str(tmp_path / "bf16"))
    assert res.exit_code == 2 and "grad_dtype" in res.stderr, res.stderr
    res = _cli("prune", str(tiny_model), str(tmp_path / "o3"), "--calib-ids", str(ids_file), "--grad-dtype", "fp8")
    assert res.exit_code == 2 and "--grad-dtype" in res.stderr


def test_prune_drops_its_own_gradient_files_as_it_goes_and_resumes(tmp_path, tiny_model, ids_file):
    _prune(tiny_model, tmp_path / "clean", ids_file)
    out = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "cli.main", "prune", str(tiny_model), str(out), "--method", "gblm",
           "--calib-ids", str(ids_file), "--nsamples", str(N), "--seqlen", str(T), "--device", "cpu", "--quiet"]
    env = {**os.environ, "LOWMEM_TEST_CRASH_AT": "block_done:2"}  # blocks 0 and 1 pruned, then SIGKILL
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    grads = out / STATE_DIR / "gradients"
    meta = json.loads((grads / GRADIENTS_JSON).read_text())
    assert meta["complete"] and sorted(meta["done"]) == ["0", "1", "2"]  # entries (and hashes) stay
    assert [p.name for p in sorted(grads.glob("block_*"))] == [block_file(2)]  # files of pruned blocks are gone
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "prune_report.json").read_text())
    sweep = next(p for p in report["phases"] if p["phase"] == "gradient_sweep")
    assert sweep["bytes_written"] < 4096  # found complete, not recomputed (one block file is ~100 KB)
    a, b = _shards(out), _shards(tmp_path / "clean")
    assert len(a) == 4 and a == b


def test_reused_gradient_folder_is_left_whole(tmp_path, tiny_model, ids_file):
    _gradients(tiny_model, tmp_path / "grads", ids_file)
    before = _grad_files(tmp_path / "grads")
    _prune(tiny_model, tmp_path / "out", ids_file, gradients=str(tmp_path / "grads"))
    assert len(before) == 3 and _grad_files(tmp_path / "grads") == before


@pytest.mark.parametrize("change", ["value", "truncate"])
def test_a_gradient_file_changed_after_the_sweep_is_refused(tmp_path, tiny_model, ids_file, change):
    _gradients(tiny_model, tmp_path / "grads", ids_file)
    meta = json.loads((tmp_path / "grads" / GRADIENTS_JSON).read_text())
    assert len(meta["done"]["1"]["tensors"]) == 7  # each tensor's sha256, checked as it is read
    path = tmp_path / "grads" / block_file(1)
    if change == "value":  # same size, one value changed: only a hash notices
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        size = path.stat().st_size
        tensors = load_file(str(path))
        name = sorted(tensors)[3]
        tensors[name][0, 0] += 1.0
        save_file(tensors, str(path), metadata=metadata)
        assert path.stat().st_size == size
    else:
        path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(Exception, match="changed since it was written"):
        _prune(tiny_model, tmp_path / "out", ids_file, gradients=str(tmp_path / "grads"))


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_batched_gradient_sweep_is_exact_per_window(tmp_path, tiny_model, ids_file, norm):
    """--batch-size windows per call in the gradient sweep: each window's own gradient is folded (the batch's
    summed gradient would be wrong for l1 and l2); the files equal the one-window-per-call ones to 1e-6, here
    bit for bit, and the masks are the same."""
    n = _ids(ids_file).shape[0]
    files = {}
    for batch in (1, 3, n):  # 3 does not divide the windows: a short last call; one chunk, so calls of n windows
        folder = tmp_path / f"b{batch}"
        _gradients(tiny_model, folder, ids_file, grad_norm=norm, batch_size=batch, chunk_windows=n)
        files[batch] = {name: t for i in range(3) for name, t in load_file(str(folder / block_file(i))).items()}
    for batch in (3, n):
        for name, g in files[batch].items():
            ref = files[1][name]
            assert float((g - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), (batch, name)
            assert torch.equal(g, ref), (batch, name)  # bit for bit on this machine
    _prune(tiny_model, tmp_path / "one", ids_file, grad_norm=norm, chunk_windows=n)
    _prune(tiny_model, tmp_path / "batched", ids_file, grad_norm=norm, batch_size=n, chunk_windows=n)
    one, batched = _weights(tmp_path / "one"), _weights(tmp_path / "batched")
    assert all(torch.equal(one[k] != 0, batched[k] != 0) for k in one)


@pytest.fixture(scope="module")
def five_blocks(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("five") / "model", layers=5, seed=3, tokenizer=False)


def test_segment_checkpoints_give_the_same_gradient_files(tmp_path, five_blocks, ids_file, monkeypatch):
    """--checkpoint-every K keeps one block input in K and recomputes the rest in the reverse walk: the files are
    the same bytes for every K, with either store, and a sweep stopped half-way resumes with another K."""
    _gradients(five_blocks, tmp_path / "k1", ids_file, checkpoint_every=1)
    ref = _grad_files(tmp_path / "k1")
    assert len(ref) == 5
    for k, offload in ((2, "cpu"), (3, "disk"), (5, "cpu")):
        _gradients(five_blocks, tmp_path / f"k{k}", ids_file, checkpoint_every=k, offload=offload, batch_size=3)
        assert _grad_files(tmp_path / f"k{k}") == ref, k
    folder = tmp_path / "stopped"
    testing_hooks.reset()
    # input_sq first (the forward's statistics), then blocks 4, 3, 2 written; block 1 fails
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, "shard_write:5")
    with pytest.raises(OutOfSpace):
        _gradients(five_blocks, folder, ids_file, checkpoint_every=2)
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    assert sorted(json.loads((folder / GRADIENTS_JSON).read_text())["done"]) == ["2", "3", "4"]
    _gradients(five_blocks, folder, ids_file, checkpoint_every=3)  # not part of the folder's identity
    assert _grad_files(folder) == ref
    assert not (folder / STATE_DIR / "store").exists()


def test_planner_picks_segment_checkpoints_when_the_boundaries_do_not_fit(five_blocks):
    assert kept_boundaries(40, 6) == [0, 6, 12, 18, 24, 30, 36, 40]
    assert segments(40, kept_boundaries(40, 6))[:2] == [(36, 40), (30, 36)]
    assert boundaries_held(40, 1) == (41, 40) and boundaries_held(40, 6) == (8, 11)
    assert recomputed_blocks(40, 1) == 0 and recomputed_blocks(40, 6) == 33
    shape = load_shape(five_blocks)
    settings = PlanSettings(method="gblm", nsamples=64, seqlen=128, offload="disk", checkpoint_every="auto")
    boundary = 64 * 128 * 64 * 4
    roomy = plan(shape, settings, Budgets(disk_free=1 << 40, disk_dir=Path("/tmp")), baseline=1)
    assert roomy.settings.checkpoint_every == 1
    # 5 blocks: K = 2 keeps 4 inputs but passes the others through 2 scratch boundaries (no saving); K = 3 saves one
    tight = plan(shape, settings, Budgets(disk_free=roomy.disk_bytes - boundary, disk_dir=Path("/tmp")), baseline=1)
    assert tight.fits and tight.settings.checkpoint_every == 3
    assert roomy.disk_bytes - tight.disk_bytes == boundary
    assert any("recomputes" in note for note in tight.notes)
