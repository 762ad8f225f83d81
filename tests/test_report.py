"""prune_report.json's diagnostics and ``lowmem-gblm report``: the per-block output error against plain torch, GBLM's
gradient share and flips against Wanda (alpha = 0 gives none), the summary and figures, --compare's refusal, the
numbers of replayed blocks after a resume, and 1 vs 2 processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm.config import CalibConfig, PruneConfig
from lowmem_gblm.engine import prune
from lowmem_gblm.mask import Pattern, flip_fraction, select_keep
from lowmem_gblm.report.summary import keep_grid, linear_kind, load_run, per_block_rows, per_kind
from lowmem_gblm.score import gblm_score, gradient_term, term_share, wanda_score
from tests.reference import full_model
from tests.tiny import VISION_CLASSES, VISION_SIZE, make_tiny_llama, make_tiny_vision

N, T = 4, 16
REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _prune(model: Path, out: Path, ids: Path, **kw) -> dict:
    options = {"method": "gblm", "sparsity": 0.5, "device": "cpu", "progress": False, **kw}
    return prune(PruneConfig(model_dir=str(model), out_dir=str(out),
                             calib=CalibConfig(ids_file=str(ids), nsamples=N, seqlen=T), **options))


@pytest.fixture(scope="module")
def ids(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ids") / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 320, (N, T), generator=torch.Generator().manual_seed(5))}, str(path))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model, ids, tmp_path_factory) -> dict[str, Path]:
    """Finished runs of ``tiny_model`` on the same windows (read-only)."""
    root = tmp_path_factory.mktemp("runs")
    _prune(tiny_model, root / "gblm", ids)
    _prune(tiny_model, root / "gblm0", ids, alpha=0.0)
    _prune(tiny_model, root / "wanda", ids, method="wanda")
    return {name: root / name for name in ("gblm", "gblm0", "wanda")}


def _report(out: Path) -> dict:
    return json.loads((out / "prune_report.json").read_text())


# ---------------------------------------------------------------------------------------------
# the numbers in prune_report.json


def test_report_has_the_diagnostics_with_sane_values(runs):
    report = _report(runs["gblm"])
    diag = report["diagnostics"]
    assert len(diag["output_error"]) == 3 == len(report["sparsity"]["per_block"])
    for e, sums in zip(diag["output_error"], diag["output_error_sums"], strict=True):
        assert 0 <= e < math.inf and e > 0  # pruned half the weights: the output moved, and stays finite
        assert e == pytest.approx(math.sqrt(sums["sq_error"] / sums["sq_dense"]), rel=1e-12)
    rows = report["sparsity"]["per_linear"]
    assert len(rows) == 21
    for name, row in rows.items():
        assert 0 <= row["gradient_share"] <= 1, name
        assert 0 <= row["flipped_vs_wanda"] <= 1, name
    assert any(row["gradient_share"] > 0.01 for row in rows.values())  # alpha = 100: the term matters
    assert any(row["flipped_vs_wanda"] > 0 for row in rows.values())  # and changes some decisions
    assert set(diag["definitions"]) == {"output_error", "gradient_share", "flipped_vs_wanda"}
    assert diag["model"]["architecture"] and diag["model"]["config_sha256"] and diag["model"]["layout_sha256"]
    # Wanda's rows have no GBLM numbers, but the output error
    wanda = _report(runs["wanda"])
    assert not any("gradient_share" in r for r in wanda["sparsity"]["per_linear"].values())
    assert all(0 < e < math.inf for e in wanda["diagnostics"]["output_error"])


def test_output_error_equals_plain_torch_on_the_same_block_inputs(tiny_model, runs):
    """Golden: per block, ||Y_pruned - Y_dense|| / ||Y_dense|| from transformers' own layers. The block inputs are
    what the pruned model's earlier layers give (as in the prune sweep); the dense layer runs on exactly those."""
    out = runs["gblm"]
    recorded = _report(out)["diagnostics"]["output_error"]
    windows = load_file(str(out / "calibration_ids.safetensors"))["input_ids"]
    dense, pruned = full_model(tiny_model), full_model(out)
    for i, (layer, dense_layer) in enumerate(zip(pruned.model.layers, dense.model.layers, strict=True)):
        calls = []

        def keep_call(_module, args, kwargs, output, _calls=calls):
            _calls.append((args, kwargs, output[0] if isinstance(output, tuple) else output))

        handle = layer.register_forward_hook(keep_call, with_kwargs=True)
        sq_error = sq_dense = 0.0
        with torch.no_grad():
            for n in range(windows.shape[0]):
                pruned(windows[n:n + 1], use_cache=False)  # no cache: the dense layer must not extend it
            for args, kwargs, y_pruned in calls:
                y_dense = dense_layer(*args, **kwargs)
                y_dense = y_dense[0] if isinstance(y_dense, tuple) else y_dense
                sq_error += float(((y_pruned.double() - y_dense.double()) ** 2).sum())
                sq_dense += float((y_dense.double() ** 2).sum())
        handle.remove()
        assert len(calls) == N
        assert abs(recorded[i] - math.sqrt(sq_error / sq_dense)) <= 1e-5, (i, recorded[i])


def test_alpha_zero_has_no_gradient_share_and_flips_nothing(runs):
    gblm0, wanda = _report(runs["gblm0"]), _report(runs["wanda"])
    rows = gblm0["sparsity"]["per_linear"]
    assert rows and all(r["gradient_share"] == 0.0 and r["flipped_vs_wanda"] == 0.0 for r in rows.values())
    # the same bytes as Wanda's (a test of test_gblm), so the same output errors
    assert gblm0["diagnostics"]["output_error"] == wanda["diagnostics"]["output_error"]


def test_score_terms_and_flips_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    scaler = torch.tensor([4.0, 1.0, 1.0, 0.25])  # sqrt: 2, 1, 1, 0.5 -> wanda 2, 2, 3, 2
    g = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    grad = gradient_term(w, g, 0.5)  # alpha |W| G: 2, 0, 0, 0
    assert grad.tolist() == [[2.0, 0.0, 0.0, 0.0]]
    assert torch.equal(wanda_score(w, scaler) + grad, gblm_score(w, scaler, g, 0.5))  # same bits
    assert float(term_share(grad, wanda_score(w, scaler))) == pytest.approx(2 / 11)
    assert float(term_share(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0
    pattern = Pattern.parse("unstructured", 0.5)
    keep_wanda = select_keep(wanda_score(w, scaler), pattern)  # 2, 2, 3, 2: ties break by column, drop 0 and 1
    keep_gblm = select_keep(gblm_score(w, scaler, g, 0.5), pattern)  # 4, 2, 3, 2: drop 1 and 3
    assert keep_wanda.tolist() == [[False, False, True, True]]
    assert keep_gblm.tolist() == [[True, False, True, False]]
    assert float(flip_fraction(keep_gblm, keep_wanda)) == 0.5


def test_keep_grid_block_averages_and_linear_kinds():
    keep = torch.zeros(4, 6, dtype=torch.bool)
    keep[:2, :3] = True
    keep[2:, 3:] = torch.tensor([[True, False, False], [False, False, False]])
    assert keep_grid(keep, cells=2).tolist() == [[1.0, 0.0], [0.0, pytest.approx(1 / 6)]]
    assert keep_grid(keep).shape == (4, 6)  # small enough: one cell per weight
    assert linear_kind("model.layers.3.mlp.down_proj.weight") == "mlp.down_proj"
    assert linear_kind("model.layers.12.block_sparse_moe.experts.5.w2.weight") == "block_sparse_moe.experts.*.w2"


def test_summary_numbers(runs):
    run = load_run(runs["gblm"])
    rows = per_block_rows(run)
    assert [r["block"] for r in rows] == [0, 1, 2]
    assert all(0 <= r["gradient_share"] <= 1 and 0 <= r["flipped_vs_wanda"] <= 1 for r in rows)
    kinds = per_kind(run, "gradient_share")
    assert sorted(kinds) == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    assert all(k["min"] <= k["mean"] <= k["max"] and len(k["values"]) == 3 for k in kinds.values())
    assert per_kind(load_run(runs["wanda"]), "gradient_share") == {}


# ---------------------------------------------------------------------------------------------
# the command


def test_report_prints_and_writes_figures(runs, tmp_path):
    result = CliRunner().invoke(app, ["report", str(runs["gblm"]), "--png", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    assert "out_err" in result.output and "grad_shr" in result.output and "mlp.down_proj" in result.output
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert written == ["gradient_share.png", "masks.png", "output_error.png"]
    for name in written:
        data = (tmp_path / "png" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_vision_runs_report_their_figures(kind, tmp_path):
    """Issue 37 case 1: the report names linears as transformers 5's modules do (``vit.layers.1.attention.k_proj``),
    the output's index as the checkpoint stores them (``vit.encoder.layer.1.attention.attention.key``): the mask
    figure maps one to the other, as verify does."""
    from lowmem_gblm.calib.images import save_pixels

    model = make_tiny_vision(tmp_path / "model", kind, layers=2, seed=4)
    g = torch.Generator().manual_seed(2)
    pixels = tmp_path / "pixels.safetensors"
    save_pixels(pixels, torch.randn(4, 3, VISION_SIZE, VISION_SIZE, generator=g),
                torch.randint(0, VISION_CLASSES, (4,), generator=g))
    prune(PruneConfig(model_dir=str(model), out_dir=str(tmp_path / "out"), method="gblm", sparsity=0.5,
                      device="cpu", progress=False, calib=CalibConfig(pixels_file=str(pixels), nsamples=4)))
    result = CliRunner().invoke(app, ["report", str(tmp_path / "out"), "--png", str(tmp_path / "png"),
                                      "--block", "1"])
    assert result.exit_code == 0, result.output
    assert "attention.k_proj" in result.output or "mlp" in result.output
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert written == ["gradient_share.png", "masks.png", "output_error.png"]
    assert all((tmp_path / "png" / n).read_bytes().startswith(PNG_MAGIC) for n in written)


def test_compare_two_runs_of_one_model(runs, tmp_path):
    result = CliRunner().invoke(app, ["report", str(runs["gblm"]), "--compare", str(runs["wanda"]),
                                      "--png", str(tmp_path / "png"), "--linears", r"layers\.1\.mlp"])
    assert result.exit_code == 0, result.output
    assert "B/A err" in result.output
    gblm, wanda = (_report(runs[k])["diagnostics"]["output_error"] for k in ("gblm", "wanda"))
    assert f"{gblm[0]:.4f}" in result.output and f"{wanda[0]:.4f}" in result.output
    assert (tmp_path / "png" / "masks.png").stat().st_size > 10_000


def test_compare_refuses_runs_of_different_models(runs, tiny_tied, ids, tmp_path):
    _prune(tiny_tied, tmp_path / "tied", ids, method="magnitude")
    result = CliRunner().invoke(app, ["report", str(runs["gblm"]), "--compare", str(tmp_path / "tied")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "different models" in result.output
    other = make_tiny_llama(tmp_path / "wider", inter=192, tokenizer=False)  # same family, other shapes
    _prune(other, tmp_path / "wider-run", ids, method="magnitude")
    result = CliRunner().invoke(app, ["report", str(runs["gblm"]), "--compare", str(tmp_path / "wider-run")])
    assert result.exit_code == 2 and "different models" in result.output


def test_png_without_matplotlib_names_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = CliRunner().invoke(app, ["report", str(runs["wanda"]), "--png", str(tmp_path / "png")])
    assert result.exit_code == 2
    assert "error:" in result.output and "pip install 'lowmem-gblm[report]'" in result.output
    assert not (tmp_path / "png").exists()
    result = CliRunner().invoke(app, ["report", str(runs["wanda"])])  # the text needs no matplotlib
    assert result.exit_code == 0 and "out_err" in result.output


def test_png_path_that_is_a_file_is_one_error_line(runs, tmp_path):
    """Issue 32 case 14: ``--png FILE`` (or a folder under a file) was a FileExistsError traceback."""
    (tmp_path / "taken").write_text("not a folder")
    for png in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        result = CliRunner().invoke(app, ["report", str(runs["wanda"]), "--png", str(png)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: --png") and "a file, not a folder" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_report_refuses_a_folder_without_a_finished_run(tmp_path, runs):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "error:" in result.output and "prune_report.json" in result.output
    result = CliRunner().invoke(app, ["report", str(runs["gblm"]), "--png", str(tmp_path / "p"), "--block", "7"])
    assert result.exit_code == 2 and "--block 7" in result.output


# ---------------------------------------------------------------------------------------------
# resume and ranks


def _cli_prune(model: Path, out: Path, ids: Path, nproc: int = 1):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOWMEM_TEST_", "RANK", "WORLD_SIZE"))}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["-m", "lowmem_gblm", "prune", str(model), str(out), "--method", "wanda", "--sparsity", "0.5",
            "--calib-ids", str(ids), "--nsamples", str(N), "--seqlen", str(T), "--device", "cpu",
            "--chunk-windows", "1", "--quiet"]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.run([sys.executable, *launcher, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_replayed_blocks_report_what_the_first_run_recorded(tiny_model, ids, runs, tmp_path):
    """A resume replays finished blocks from their shards (no dense weights left to compare with): their numbers
    come from the manifest. Here block 2 is undone (as a kill before its shard would leave it) and block 0's
    recorded error is changed, so a recomputation would show."""
    out = tmp_path / "out"
    shutil.copytree(runs["wanda"], out)
    manifest_path = out / ".lowmem" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["complete"] = False
    (out / manifest["done"].pop("block.2")["file"]).unlink()
    manifest["done"]["block.0"]["output_error"]["relative"] = 0.125
    manifest_path.write_text(json.dumps(manifest))
    (out / "model.safetensors.index.json").unlink()
    (out / "prune_report.json").unlink()
    _prune(tiny_model, out, ids, method="wanda")
    got, ref = _report(out)["diagnostics"], _report(runs["wanda"])["diagnostics"]
    assert got["output_error"] == [0.125, *ref["output_error"][1:]]  # block 2 recomputed: the same number
    assert got["output_error_sums"][1:] == ref["output_error_sums"][1:]
    # a manifest from before the diagnostics (no output_error entry): reported as not recorded
    manifest = json.loads(manifest_path.read_text())
    manifest["complete"] = False
    del manifest["done"]["block.1"]["output_error"]
    manifest_path.write_text(json.dumps(manifest))
    (out / "model.safetensors.index.json").unlink()
    _prune(tiny_model, out, ids, method="wanda")
    assert _report(out)["diagnostics"]["output_error"][1] is None
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0 and "1 block(s) not recorded" in result.output


def test_two_processes_report_the_same_output_errors(tiny_model, ids, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _cli_prune(tiny_model, one, ids).returncode == 0
    launched = _cli_prune(tiny_model, two, ids, nproc=2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert _report(two)["ranks"]["world_size"] == 2
    # chunk sums folded in chunk order: the same float64 sums, whatever the number of processes
    assert _report(two)["diagnostics"]["output_error_sums"] == _report(one)["diagnostics"]["output_error_sums"]
