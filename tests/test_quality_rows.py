"""benchmarks/quality.py's rows file: rows survive a crash and are reused only under the same setting; the grid
table puts each cell where it belongs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, pattern, seed, ppl):
    return {"method": method, "pattern": pattern, "seed": seed, "ppl": ppl}


def test_rows_are_reused_only_under_their_setting(quality, tmp_path):
    path = tmp_path / "rows.jsonl"
    one = {"nsamples": 32, "threads": 2}
    other = {"nsamples": 32, "threads": 1}
    quality.append_row(path, _row("wanda", "50%", 0, 41.7), one)
    quality.append_row(path, _row("wanda", "50%", 0, 40.0), other)
    quality.append_row(path, _row("sparsegpt", "2:4", 0, 63.2), one)
    quality.append_row(path, _row("wanda", "50%", 0, 41.8), one)  # measured again: the last one counts
    done = quality.load_rows(path, one)
    assert set(done) == {("wanda", "50%", 0), ("sparsegpt", "2:4", 0)}
    assert done["wanda", "50%", 0]["ppl"] == 41.8 and "setting" not in done["wanda", "50%", 0]
    assert quality.load_rows(path, other)["wanda", "50%", 0]["ppl"] == 40.0
    assert quality.load_rows(path, {"nsamples": 64, "threads": 2}) == {}
    assert quality.load_rows(tmp_path / "absent.jsonl", one) == {}


def test_a_line_cut_by_a_crash_is_skipped_and_the_next_row_stands_alone(quality, tmp_path):
    path = tmp_path / "rows.jsonl"
    setting = {"nsamples": 8}
    quality.append_row(path, _row("magnitude", "60%", 0, 1970.6), setting)
    with path.open("a") as f:  # a crash in the middle of a write
        f.write(json.dumps(_row("wanda", "60%", 0, 80.0) | {"setting": setting})[:25])
    quality.append_row(path, _row("gblm-l1", "70%", 0, 300.5), setting)
    done = quality.load_rows(path, setting)
    assert set(done) == {("magnitude", "60%", 0), ("gblm-l1", "70%", 0)}
    assert done["gblm-l1", "70%", 0]["ppl"] == 300.5


def test_grid_table_cells_and_best(quality):
    rows = [_row("dense", "-", None, 17.5), _row("magnitude", "60%", 0, 1970.59), _row("sparsegpt", "60%", 0, 60.1),
            _row("sparsegpt", "4:8", 0, 90.25), _row("gblm-l1+lsq", "60%", 0, 55.0), _row("gblm-l1+lsq", "60%", 1, 1.0)]
    table = quality.grid_table(rows, 0).splitlines()
    assert table[0] == "| method | 60% | 4:8 |"  # patterns in the benchmark's order, only those run
    assert table[2] == "| magnitude | 1970.59 | – |"
    assert table[3] == "| sparsegpt | 60.10 | **90.25** |"
    assert table[4] == "| gblm-l1+lsq | **55.00** | – |"  # seed 1's row is not seed 0's cell
    assert len(table) == 5


def test_report_only_tables_the_measured_rows_and_runs_nothing(quality, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setenv("LOWMEM_WIKI_JSON", str(tmp_path / "unused.json"))
    rows_file, out = tmp_path / "rows.jsonl", tmp_path / "grid.json"
    argv = ["quality.py", "--model", str(tmp_path / "no-model-here"), "--work", str(tmp_path / "work"),
            "--nsamples", "4", "--seqlen", "16", "--seeds", "0", "--eval-windows", "2", "--device", "cpu",
            "--methods", "wanda", "gblm-l1", "--patterns", "50%", "2:4", "--updates", "none", "lsq",
            "--skip-fetch", "--rows-file", str(rows_file), "--out", str(out), "--report-only"]
    monkeypatch.setattr("sys.argv", argv)
    setting = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32)", "nsamples": 4, "seqlen": 16,
               "eval_windows": 2, "device": "cpu", "threads": torch.get_num_threads(), "owl_lambda": 0.08,
               "owl_m": 5.0, "zeroshot_limit": 0}
    with pytest.raises(SystemExit, match="no dense row"):
        quality.main()
    dense = {"method": "dense", "pattern": "-", "seed": None, "ppl": 17.5, "sparsity": 0.0, "windows": 2,
             "tokens": 30}
    quality.append_row(rows_file, dense, setting)
    for method, pattern, ppl in (("wanda", "50%", 41.7), ("gblm-l1+lsq", "2:4", 57.6), ("wanda", "2:4", 150.0)):
        quality.append_row(rows_file, _row(method, pattern, 0, ppl) | {"sparsity": 0.5}, setting)
    quality.append_row(rows_file, _row("gblm-l1", "50%", 0, 1.0) | {"sparsity": 0.5}, setting | {"threads": 99})
    quality.main()  # would fail loading the absent model if it tried to run a missing cell
    printed = capsys.readouterr().out
    assert "| wanda | **41.70** | 150.00 |" in printed
    assert "| gblm-l1+lsq | – | **57.60** |" in printed
    assert "gblm-l1 |" not in printed  # measured under another setting only
    result = json.loads(out.read_text())
    assert [(r["method"], r["pattern"]) for r in result["rows"]] == [
        ("dense", "-"), ("wanda", "50%"), ("wanda", "2:4"), ("gblm-l1+lsq", "2:4")]
    assert not (tmp_path / "work" / "calib-ids-4x16-s0.safetensors").exists()
