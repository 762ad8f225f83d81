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
