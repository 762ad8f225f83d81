"""Issue 32, cases 11-14 and the misleading messages: inputs that hung the tool or ended in a traceback now end
in one ``error:`` line and exit 2 (or succeed), within a deadline."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm.errors import UsageError, first_line
from lowmem_gblm.userregex import compile_user_regex
from tests.fuzz_inputs import TASK_CASES, write_task
from tests.test_fuzz import Hang, deadline

CATASTROPHIC = r"(([a-z_.0-9])+)+!"  # exponential backtracking in Python's re against any module name


def one_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1], result.stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1 and "Traceback" not in result.stderr, result.stderr


def run_cli(args: list[str], seconds: float = 60):
    try:
        with deadline(seconds):
            return CliRunner().invoke(app, args)
    except Hang as exc:
        pytest.fail(f"{args}: {exc}")


def prune_args(model, out, calib, *extra):
    return ["prune", str(model), str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "16", "--device",
            "cpu", "-q", *extra]


# -- case 11: a user regex cannot hang the tool -----------------------------------------------------------

def test_catastrophic_targets_regex_ends_at_once(tiny_model, calib_text, tmp_path):
    """With Python's re this ran for minutes inside C (the alarm of an in-process deadline is not even seen),
    so the CLI runs in a child process under a hard timeout."""
    cmd = [sys.executable, "-m", "lowmem_gblm", *prune_args(tiny_model, tmp_path / "out", calib_text,
                                                             "--targets", CATASTROPHIC)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("prune --targets with a backtracking regex hung")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --targets"), done.stderr
    assert "select no linear" in done.stderr


def test_linear_time_matching_keeps_re_search_semantics():
    name = "model.layers.12.self_attn.q_proj" * 4 + "."
    assert compile_user_regex("--ignore", CATASTROPHIC).search(name) is None
    assert compile_user_regex("--targets", r"layers\.1[0-9]\.(self_attn|mlp)\.(q|k)_proj").search(name)
    assert compile_user_regex("--targets", r"(?i)Q_PROJ").search(name)
    assert not compile_user_regex("--targets", r"^self_attn").search(name)  # search, anchored where asked


@pytest.mark.parametrize(("pattern", "needle"), [
    (r"(?<=q)_proj", "RE2"), (r"(q)_proj\1", "RE2"), (r"proj\Z", "RE2"), ("a{5000}", "RE2"),
    ("(", "not a regular expression"),
])
def test_regex_features_re2_lacks_are_one_error_line(pattern, needle, tiny_model, calib_text, tmp_path):
    with pytest.raises(UsageError, match=needle):
        compile_user_regex("--ignore", pattern)
    result = run_cli(prune_args(tiny_model, tmp_path / "out", calib_text, "--ignore", pattern))
    one_error(result, needle)
    assert not (tmp_path / "out").exists()


# -- case 12: a huge --batch-size is probed at the size the engine runs -------------------------------------

def test_huge_batch_size_on_few_windows_finishes(tiny_model, calib_text, tmp_path):
    result = run_cli(prune_args(tiny_model, tmp_path / "out", calib_text, "--nsamples", "6", "--batch-size",
                                "1000000", "--method", "wanda"), seconds=60)
    assert result.exit_code == 0, result.output
    result = run_cli(["plan", str(tiny_model), "--nsamples", "6", "--seqlen", "16", "--batch-size", "1000000"])
    assert result.exit_code == 0, result.output


# -- case 14: counts past any sane range, a cut GGUF ----------------------------------------------------------

@pytest.mark.parametrize("extra", [["--nsamples", str(10**30)], ["--batch-size", str(10**21)],
                                   ["--chunk-windows", str(2**63)]])
def test_plan_with_counts_past_int64_is_one_error_line(tiny_model, extra):
    one_error(run_cli(["plan", str(tiny_model), "--seqlen", "16", *extra]), extra[0])


def test_billions_of_one_window_chunks_are_refused_at_once(tiny_model):
    # each option alone is in range; together they asked the partition for 2**31 chunks (a list built for minutes)
    result = run_cli(["plan", str(tiny_model), "--seqlen", "16", "--nsamples", str(2**31 - 1), "--chunk-windows",
                      "1"], seconds=60)
    one_error(result, "--chunk-windows 1 cuts 2147483647 windows into 2147483647 chunks")


@pytest.mark.parametrize("extra", [["--nsamples", str(10**30)], ["--batch-size", str(10**21)],
                                   ["--blocksize", str(10**30), "--method", "sparsegpt"]])
def test_prune_with_counts_past_int64_is_one_error_line(extra, tiny_model, calib_text, tmp_path):
    one_error(run_cli(prune_args(tiny_model, tmp_path / "out", calib_text, *extra)), extra[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [8, 24, 500, 100_000])
def test_import_gguf_of_a_cut_file_is_one_error_line(keep, tmp_path):
    pytest.importorskip("gguf")
    from tests.tiny_eval import make_tiny_llama, write_tiny_gguf

    src = make_tiny_llama(tmp_path / "src", vocab=99, tokenizer=False)
    whole = write_tiny_gguf(src, tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])  # 8: the magic and version only; 500: inside the metadata; 100 kB: in the data
    one_error(run_cli(["import-gguf", str(cut), str(tmp_path / "out")]), "not a complete GGUF file")
    assert not (tmp_path / "out").exists()


def test_first_line_keeps_the_first_meaningful_line():
    exc = OSError("\n  Can't load tokenizer for 'x'.\n\nIf you were trying to load it from 'https://huggingface.co'...")
    assert first_line(exc) == "Can't load tokenizer for 'x'."
    assert first_line(ValueError("")) == "ValueError"
    assert len(first_line(ValueError("y" * 1000))) == 300


# -- case 13: broken lm-eval tasks ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task_model(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from tests.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("taskmodel") / "model")


def eval_task(model, folder, name="tiny_mc", *extra):
    return run_cli(["eval", str(model), "--tasks", name, "--include-path", str(folder), "--device", "cpu", "-q",
                    *extra], seconds=120)


@pytest.mark.parametrize("case", [c for c in TASK_CASES if not c.startswith("yaml-")])
def test_a_broken_task_is_one_error_line_naming_the_cause(case, task_model, tmp_path):
    write_kw, extra, needle = TASK_CASES[case]
    one_error(eval_task(task_model, write_task(tmp_path / "tasks", **write_kw), "tiny_mc", *extra), needle)


def test_an_unreadable_or_empty_yaml_is_named_when_its_task_is_unknown(task_model, tmp_path):
    folder = tmp_path / "tasks"
    for case, name in (("yaml-syntax-error", "syntax"), ("yaml-empty", "empty")):
        write_task(folder / name, name, **TASK_CASES[case][0])
    result = eval_task(task_model, folder, "syntax,empty")
    one_error(result, "unknown task(s) syntax, empty")
    assert "syntax.yaml (expected ',' or ']', but got ':', line 3)" in result.stderr
    assert "empty.yaml (empty)" in result.stderr


def test_the_working_task_still_runs(task_model, tmp_path):
    result = eval_task(task_model, write_task(tmp_path / "tasks"), "tiny_mc", "--json")
    assert result.exit_code == 0, result.output


# -- messages that sent the user the wrong way ---------------------------------------------------------------

def _without_tokenizer(tiny_model, folder):
    import shutil

    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    return folder


def test_a_model_without_tokenizer_is_named_so(tiny_model, calib_text, tmp_path):
    model = _without_tokenizer(tiny_model, tmp_path / "m")
    one_error(run_cli(prune_args(model, tmp_path / "out", calib_text)), "has no tokenizer")
    result = run_cli(["eval", str(model), "--data", str(calib_text), "--seqlen", "16", "--device", "cpu", "-q"])
    one_error(result, "has no tokenizer")
    assert "--calib-ids" not in result.stderr  # eval has no such option


def test_a_broken_tokenizer_is_one_line_not_transformers_paragraphs(tiny_model, calib_text, tmp_path):
    model = _without_tokenizer(tiny_model, tmp_path / "m")
    (model / "tokenizer.json").write_text("{ not json")
    result = run_cli(["eval", str(model), "--data", str(calib_text), "--seqlen", "16", "--device", "cpu", "-q"])
    one_error(result, "cannot load the tokenizer")
    assert result.stderr.split("error: ", 1)[1].strip().count("\n") == 0, result.stderr


def test_eval_bos_advice_names_no_calib_option():
    from lowmem_gblm.calib.data import window_bos

    class NoBos:
        bos_token_id = None

    with pytest.raises(UsageError) as got:
        window_bos(NoBos(), True, "--data x.txt")
    assert "--calib-ids" not in str(got.value) and "bos_token" in str(got.value)
    with pytest.raises(UsageError, match="--calib-ids"):
        window_bos(NoBos(), True, "--calib x.txt")


def test_an_overflow_names_the_compute_dtype_and_the_method_s_remedy():
    import torch

    from lowmem_gblm.mask import Pattern
    from lowmem_gblm.methods import LinearJob, MethodOptions
    from lowmem_gblm.methods.scored import overflow_fix

    def job(dtype, gradient=False):
        stats = {"scaler_row": torch.ones(4)} | ({"gradient": torch.ones(2, 4)} if gradient else {})
        return LinearJob("model.layers.0.mlp.up_proj.weight", torch.ones(2, 4, dtype=dtype), stats,
                         Pattern.parse("unstructured", 0.5), MethodOptions())

    wanda16 = overflow_fix(job(torch.float16))
    assert "float16" in wanda16 and "--dtype float32" in wanda16 and "--alpha" not in wanda16
    assert "--alpha" in overflow_fix(job(torch.float32, gradient=True))
    assert "--dtype" not in overflow_fix(job(torch.float32))


def test_plan_without_budgets_does_not_claim_it_fits(tiny_model):
    result = run_cli(["plan", str(tiny_model), "--seqlen", "16"])
    assert result.exit_code == 0, result.output
    assert "fits: not checked, no budget was given" in result.stdout and "fits: yes" not in result.stdout
    result = run_cli(["plan", str(tiny_model), "--seqlen", "16", "--cpu-memory", "64GiB"])
    assert "fits: yes (disk: no budget given, not checked)" in result.stdout
