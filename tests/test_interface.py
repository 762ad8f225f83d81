"""The interface a user meets: CLI options and help, --version, python -m, progress, head chunking,
jsonl calibration through datasets, the error rule (exit 2 for expected failures, 1 and 'bug' else)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
import typer
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from typer.testing import CliRunner

from cli import main as cli_main
from cli.main import app
from lowmem_gblm import __version__
from lowmem_gblm.calib.data import load_documents
from lowmem_gblm.convert import gguf_import
from lowmem_gblm.engine import progress as progress_mod
from lowmem_gblm.engine.progress import PhaseProgress
from lowmem_gblm.errors import InputError, UsageError
from lowmem_gblm.stream.head import window_nll
from tests.faults import REPO

COMMANDS = ("prune", "gradients", "eval", "plan", "verify", "import-gguf", "wiki-task", "report")


def _command(name: str):
    return typer.main.get_command(app).commands[name]


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lowmem-gblm {__version__}"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "lowmem_gblm", "--version"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"lowmem-gblm {__version__}", out.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name):
    command = _command(name)
    assert command.help
    for param in command.params:
        assert getattr(param, "help", None), f"{name} {param.param_type_name} {param.name}: no help"


def test_choices_are_typed_and_listed():
    text = CliRunner().invoke(app, ["prune", "--help"], env={"COLUMNS": "250"}).stdout
    for choices in ("auto|float32|bfloat16|float16", "auto|cpu|disk", "auto|float32|bfloat16|float16|int8",
                    "float32|bfloat16", "l1|l2", "row|matrix"):
        assert f"<{choices}>" in text, choices
    # the method is the registry's: its help names every registered method
    opts = {p.name: p for p in _command("prune").params}
    assert all(m in opts["method"].help for m in ("magnitude", "wanda", "sparsegpt", "gblm"))
    result = CliRunner().invoke(app, ["prune", "--store-dtype", "int4", "m", "o"])
    assert result.exit_code == 2 and "int4" in result.stderr


def test_plan_and_prune_share_their_flags():
    prune = {p.name: p for p in _command("prune").params}
    plan = {p.name: p for p in _command("plan").params}
    shared = {"method", "nsamples", "seqlen", "dtype", "offload", "store_dtype", "grad_dtype", "batch_size",
              "prefetch", "cpu_memory", "gpu_memory", "disk_space", "head_chunk"}
    assert shared <= set(prune) and shared <= set(plan)
    for name in shared - {"method", "gpu_memory"}:  # plan's default method is gblm; no GPU budget there means CPU
        assert prune[name].opts == plan[name].opts and prune[name].default == plan[name].default, name
    assert {"offload", "disk_space", "head_chunk"} <= {p.name for p in _command("gradients").params}


# ---------------------------------------------------------------------------------------------
# head chunking: exact up to float summation order


def _head(seed: int = 0):
    torch.manual_seed(seed)
    norm = LlamaRMSNorm(16).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm, torch.randn(40, 16, dtype=torch.float64), torch.randn(1, 11, 16, dtype=torch.float64), \
        torch.randint(40, (11,))


def test_eval_head_chunks_equal_the_whole_window():
    norm, w, h, ids = _head(1)
    norm, w = norm.float(), w.float()
    whole = window_nll(norm, w, h[0], ids[1:])
    with torch.no_grad():
        ref = float(torch.nn.functional.cross_entropy(norm(h[0].float())[:-1] @ w.T, ids[1:], reduction="sum"))
    assert whole == pytest.approx(ref, rel=1e-6)
    for chunk in (1, 4, 10):
        assert window_nll(norm, w, h[0], ids[1:], chunk) == pytest.approx(whole, rel=1e-5)


def test_head_chunk_end_to_end(tiny_model, calib_text, tmp_path):
    """--head-chunk: gradients within float noise of the whole-window head, recorded in the folder's
    identity (a folder made without it is not reused with it); eval perplexity the same."""
    base = ["--calib", str(calib_text), "--nsamples", "3", "--seqlen", "16", "--device", "cpu", "-q"]
    runner = CliRunner()
    for name, extra in (("whole", []), ("chunked", ["--head-chunk", "4"])):
        res = runner.invoke(app, ["gradients", str(tiny_model), str(tmp_path / name), *base, *extra])
        assert res.exit_code == 0, res.output
    whole, chunked = (json.loads((tmp_path / n / "gradients.json").read_text()) for n in ("whole", "chunked"))
    assert "head_chunk" not in whole["identity"] and chunked["identity"]["head_chunk"] == 4
    for entry in whole["done"].values():
        a, b = load_file(str(tmp_path / "whole" / entry["file"])), load_file(str(tmp_path / "chunked" / entry["file"]))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    res = runner.invoke(app, ["prune", str(tiny_model), str(tmp_path / "p"), "--method", "gblm", *base,
                              "--gradients", str(tmp_path / "whole"), "--head-chunk", "4"])
    assert res.exit_code == 2 and "head_chunk" in res.stderr
    ppl = {}
    for extra in ([], ["--head-chunk", "5"]):
        res = runner.invoke(app, ["eval", str(tiny_model), "--data", str(calib_text), "--seqlen", "16",
                                  "--max-windows", "3", "--device", "cpu", "--json", *extra])
        assert res.exit_code == 0, res.output
        ppl[bool(extra)] = json.loads(res.stdout)["ppl"]
    assert ppl[True] == pytest.approx(ppl[False], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# progress


def test_eta_ignores_replayed_blocks(monkeypatch):
    clock = iter([0.0, 0.5, 1.0, 11.0, 21.0])  # start, 2 replayed blocks (0.5 s each), 2 computed (10 s each)
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    p = PhaseProgress("prune", 6, 4, enabled=False)
    assert p.eta() is None
    p.block("replayed", replayed=True)
    p.block("replayed", replayed=True)
    assert p.eta() is None  # nothing computed yet: no rate to go by
    p.block("pruned")
    p.block("pruned")
    assert p.eta() == pytest.approx(20.0)  # 2 blocks left at 10 s each, not at the 5.25 s mean


def test_progress_outside_a_terminal_is_one_log_line_per_block(caplog):
    assert not progress_mod.live_terminal()  # pytest captures stderr
    with caplog.at_level(logging.INFO, logger="lowmem_gblm"), PhaseProgress("eval", 3, 2) as p:
        for i in range(3):
            p.windows(1)
            p.windows(2)
            p.block(f"block {i}")
    lines = [r.getMessage() for r in caplog.records if r.name == "lowmem_gblm.engine"]
    assert len(lines) == 3 and lines[-1].startswith("eval 3/3 block 2")


# ---------------------------------------------------------------------------------------------
# inputs and errors


def test_jsonl_calibration_through_datasets(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first document"}\n\n{"text": "second one", "id": 2}\n')
    assert load_documents(str(good)) == ["first document", "second one"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InputError, match="not a JSON-lines file"):
        load_documents(str(bad))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(InputError, match="string 'text' field"):
        load_documents(str(numbers))
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match="string 'text' field"):
        load_documents(str(other))


def test_gguf_import_names_the_transformers_it_needs(monkeypatch, tmp_path):
    import types

    import transformers

    old = types.ModuleType("transformers")  # a transformers from before GgufConfig
    old.__version__, old.AutoModelForCausalLM, old.AutoTokenizer = "5.16.0", object, object
    monkeypatch.setitem(sys.modules, "transformers", old)
    assert transformers is not old
    with pytest.raises(UsageError, match=r"transformers >= 5\.17"):
        gguf_import.import_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_unexpected_errors_are_reported_as_bugs(monkeypatch, tiny_model, calib_text, tmp_path, capsys):
    def broken(config):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_main, "run_prune", broken)
    monkeypatch.setattr(sys, "argv", ["lowmem-gblm", "prune", str(tiny_model), str(tmp_path / "o"), "--calib",
                                      str(calib_text), "--nsamples", "2", "--seqlen", "8", "-q"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "RuntimeError: boom" in err and "this is a bug" in err
