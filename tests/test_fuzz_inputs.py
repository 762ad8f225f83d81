"""Fuzz, second campaign (issue 32): the inputs added since the first one: lm-eval task YAMLs, image folders and
label CSVs, user regexes, and every numeric option at its extremes (hypothesis draws option and value; the
examples are derandomized, so CI runs the same cases every time). Inputs come from tests/fuzz_inputs.py.

The rule is the first campaign's (tests/test_fuzz.py): exit 0 or 2, never 1 or an uncaught exception; exit 2 with
an ``error:`` line on stderr; each case under a deadline (a hang fails the case instead of stalling CI).
"""

from __future__ import annotations

import shutil
import tempfile
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm.errors import UsageError
from lowmem_gblm.userregex import compile_user_regex
from tests.fuzz_inputs import (
    LABEL_ROWS,
    NASTY_REGEXES,
    NUMERIC_OPTIONS,
    TASK_CASES,
    extremes,
    image_cases,
    task_fuzz_cases,
    write_flat,
    write_task,
)
from tests.test_fuzz import Hang, deadline

CASE_TIMEOUT = 60
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=40,
                suppress_health_check=list(HealthCheck))


def check(args: list[str], needle: str | None = None) -> int:
    """Run the CLI under the deadline and hold it to the rule; the exit code."""
    try:
        with deadline(CASE_TIMEOUT):
            result = CliRunner().invoke(app, args)
    except Hang as exc:
        pytest.fail(f"hung: {exc}\nargs: {args}")
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    detail = f"args: {args}\nexit {result.exit_code}\nstderr: {result.stderr[-2000:]}"
    if crashed:
        detail += "\n" + "".join(traceback.format_exception(*result.exc_info))
    assert not crashed and result.exit_code in (0, 2), detail
    if result.exit_code == 2:
        assert "error:" in result.stderr, detail
        if needle is not None:
            assert needle in result.stderr, detail
    return result.exit_code


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network in tests: a task whose dataset is not a local file must fail at once, not wait for the hub's
    timeouts (a user's machine downloads it; that is lm-eval's and datasets' business)."""
    for module in ("datasets.config", "huggingface_hub.constants"):
        mod = pytest.importorskip(module)
        monkeypatch.setattr(mod, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    from tests.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("fuzzlm") / "model")


# -- numeric options at their extremes ----------------------------------------------------------------------

def _value(kind: str):
    drawn = {"int": st.integers(min_value=-(2**70), max_value=2**70).map(str),
             "float": st.floats(allow_nan=True, allow_infinity=True).map(repr),
             "size": st.text(alphabet="0123456789.eEkKmMgGiBT-", max_size=12)}[kind]
    return st.one_of(st.sampled_from(extremes(kind)), drawn)


@FUZZ
@given(data=st.data())
def test_numeric_options_at_their_extremes(data, tokenizer_model, calib_text):
    command = data.draw(st.sampled_from(sorted(NUMERIC_OPTIONS)), label="command")
    option = data.draw(st.sampled_from(sorted(NUMERIC_OPTIONS[command])), label="option")
    kind, needs = NUMERIC_OPTIONS[command][option]
    value = data.draw(_value(kind), label="value")
    with tempfile.TemporaryDirectory() as tmp:
        base = {"prune": ["prune", str(tokenizer_model), f"{tmp}/out", "--calib", str(calib_text), "--nsamples",
                          "4", "--seqlen", "16", "--device", "cpu", "-q"],
                "eval": ["eval", str(tokenizer_model), "--data", str(calib_text), "--seqlen", "16", "--max-windows",
                         "2", "--device", "cpu", "-q"],
                "plan": ["plan", str(tokenizer_model), "--nsamples", "4", "--seqlen", "16"]}[command]
        check([*base, *needs, option, value])


# -- regexes ---------------------------------------------------------------------------------------------------

NAMES = [f"model.layers.{i}.{m}" for i in (0, 1, 11) for m in ("self_attn.q_proj", "mlp.down_proj")]


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(pattern=st.one_of(st.sampled_from(NASTY_REGEXES),
                         st.text(alphabet="()[]{}+*?|.^$\\!<=:,aq_proj019dws", max_size=24)))
def test_any_regex_compiles_or_is_refused_and_matches_in_linear_time(pattern):
    with deadline(10):
        try:
            rx = compile_user_regex("--targets", pattern)
        except UsageError as exc:
            assert str(exc).startswith("--targets ")
            return
        for name in NAMES:
            rx.search(name * 8)


@pytest.mark.parametrize("pattern", [r"(([a-z_.0-9])+)+!", r"(?<=q)_proj", "(", r"mlp\.down_proj"])
@pytest.mark.parametrize("flag", ["--targets", "--ignore"])
def test_regex_options_through_the_cli(flag, pattern, tokenizer_model, calib_text, tmp_path):
    check(["prune", str(tokenizer_model), str(tmp_path / "out"), "--calib", str(calib_text), "--nsamples", "2",
           "--seqlen", "16", "--method", "magnitude", "--device", "cpu", "-q", flag, pattern])


# -- lm-eval task YAMLs ------------------------------------------------------------------------------------------

# the YAML syntax error and the empty YAML index all of lm-eval's tasks (5 s each): tests/test_hostile_inputs.py
TASKS = ({f"known-{k}": v for k, v in TASK_CASES.items() if not k.startswith("yaml-")}
         | {f"random-{k}": v for k, v in task_fuzz_cases().items()})


@pytest.mark.parametrize("case", list(TASKS))
def test_task_yamls(case, tokenizer_model, tmp_path):
    pytest.importorskip("lm_eval")
    write_kw, extra, needle = TASKS[case]
    folder = write_task(tmp_path / "tasks", **write_kw)
    check(["eval", str(tokenizer_model), "--tasks", "tiny_mc", "--include-path", str(folder), "--limit", "3",
           "--device", "cpu", "-q", *extra], needle)


# -- image folders and label CSVs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    pytest.importorskip("PIL")
    from transformers import ViTImageProcessor

    from tests.tiny import make_tiny_vision

    model = make_tiny_vision(tmp_path_factory.mktemp("fuzzvit") / "model", "vit", layers=2, seed=4)
    ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(model)  # tests.tiny.VISION_SIZE
    return model


@pytest.mark.parametrize("case", list(image_cases()))
def test_image_folders(case, vit, tmp_path):
    image_cases()[case](tmp_path / "imgs")
    check(["eval", str(vit), "--images", str(tmp_path / "imgs"), "--device", "cpu", "-q"])


@pytest.mark.parametrize("case", list(LABEL_ROWS) + ["not-utf8"])
def test_label_csvs(case, vit, tmp_path):
    rows = LABEL_ROWS.get(case, "a.png,LABEL_0\nb.png,\xff\n".encode("latin-1"))
    csv = write_flat(tmp_path / "flat", rows)
    code = check(["prune", str(vit), str(tmp_path / "out"), "--calib-images", str(tmp_path / "flat"),
                  "--calib-labels", str(csv), "--nsamples", "2", "--method", "wanda", "--device", "cpu", "-q"])
    if case == "good":
        assert code == 0
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_inputs_are_deterministic(tmp_path):
    assert list(task_fuzz_cases()) == list(task_fuzz_cases())
    a, b = write_flat(tmp_path / "a", LABEL_ROWS["good"]), write_flat(tmp_path / "b", LABEL_ROWS["good"])
    assert Path(a).read_bytes() == Path(b).read_bytes()
