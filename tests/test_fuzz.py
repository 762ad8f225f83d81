"""Fuzz: a few hundred deterministic mutations of a tiny checkpoint's index, safetensors headers and
config.json (and of a finished output, for ``verify``) thrown at ``prune``, ``eval``, ``plan`` and ``verify``.

Every run must
- exit 0 or 2, never 1 (an uncaught exception is a bug). ``verify`` may exit 1 only when it reports a
  failed check of the damaged output (its "FAILED:" line), not from an exception;
- exit 2 with an ``error:`` line on stderr;
- finish within CASE_TIMEOUT seconds (a hang fails the case instead of stalling CI);
- change no file outside OUT_DIR: the mutated model folder, the calibration file, the parent folder's
  listing and the session's own fixtures are hashed before and after;
- for ``prune``: leave no model.safetensors.index.json in OUT_DIR after a nonzero exit (and one after exit 0).
A few mutations carry an exact expected exit code: refused (2) when the checkpoint holds a block
config.json does not have (a ``model.layers.3.*`` tensor, num_hidden_layers below 3), accepted (0) for the
old rotary ``inv_freq`` buffers and for controls (the index / config.json rewritten with other whitespace).
``test_summary`` checks the fuzz is not vacuous (successes and refusals were both reached).

The mutations live in tests/fuzz.py; each case's id names its mutation, e.g.
``prune-header[layers.1.self_attn.q_proj.weight]:offsets->negative``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import os
import shutil
import signal
import stat
import threading
import traceback
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from tests import fuzz

CASE_TIMEOUT = 60  # seconds per CLI run; a healthy case takes well under 2 s
CASES = fuzz.cases()
OUTCOMES: dict[str, tuple[str, int]] = {}  # case id -> (command, exit code), for the campaign's summary
HASHED: list[int] = []  # files hashed per case (the no-change check must look at something)
TOTAL = sum(len(v) for v in CASES.values())


@pytest.fixture(autouse=True)
def _report_outcome(request):
    """Each case's (command, exit code, files hashed) goes into its report's user_properties: the summary
    (tests/conftest.py) adds them up where every report arrives, one process or the xdist controller."""
    before = set(OUTCOMES)
    yield
    for case_id in set(OUTCOMES) - before:
        request.node.user_properties.append(("fuzz_outcome", (case_id, *OUTCOMES[case_id], HASHED[-1], TOTAL)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is much faster (and immune to an oversubscribed CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Hang(BaseException):
    """Raised in the main thread by the per-case timer (BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def deadline(seconds: float):
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def ring(signum, frame):
        raise Hang(f"no exit within {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # backstop for a hang the signal cannot interrupt (inside C code): dump every stack and exit
    faulthandler.dump_traceback_later(seconds * 2, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()


def snapshot(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Relative path -> sha256 and mode of every file (folders and links listed too), ``skip`` names at the top
    level left out."""
    out: dict[str, str] = {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames + filenames:
            path = here / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link -> " + os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                out[rel + "/"] = f"dir {oct(st.st_mode)}"
            else:
                out[rel] = f"{oct(st.st_mode)} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return ([f"removed {k}" for k in sorted(set(before) - set(after))]
            + [f"created {k}" for k in sorted(set(after) - set(before))]
            + [f"changed {k}" for k in sorted(set(before) & set(after)) if before[k] != after[k]])


def _report(args, result, detail: str) -> str:
    lines = [f"args: {args}", f"mutation detail: {detail}", f"exit code: {result.exit_code}",
             f"stdout: {result.stdout[-2000:]}", f"stderr: {result.stderr[-2000:]}"]
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        lines.append("".join(traceback.format_exception(*result.exc_info)))
    return "\n".join(lines)


def _check(command: str, mutation: fuzz.Mutation, case_id: str, args: list[str], work: Path, out: Path | None,
           detail: str, watched: list[Path]) -> None:
    skip = frozenset({out.name}) if out is not None else frozenset()
    before = [snapshot(work, skip)] + [snapshot(p) for p in watched]
    HASHED.append(sum(len(s) for s in before))
    try:
        with deadline(CASE_TIMEOUT):
            result = CliRunner().invoke(app, args)
    except Hang as exc:
        OUTCOMES[case_id] = (command, -1)
        pytest.fail(f"{command} hung on {mutation.id}: {exc}\nargs: {args}\nmutation detail: {detail}")
    code = result.exit_code
    OUTCOMES[case_id] = (command, code)

    problems = []  # every broken rule of this case, reported together
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    if crashed:
        problems.append(f"uncaught {type(result.exception).__name__}: {result.exception}")
    elif command == "verify" and code == 1:
        if "FAILED:" not in result.stdout:
            problems.append("verify exit 1 without a FAILED line")
    elif code not in (0, 2):
        problems.append(f"exit {code} (only 0 or 2 are allowed)")
    if code == 2 and "error:" not in result.stderr:
        problems.append("exit 2 without an 'error:' line on stderr")
    after = [snapshot(work, skip)] + [snapshot(p) for p in watched]
    changed = [c for b, a in zip(before, after, strict=True) for c in changes(b, a)]
    if changed:
        problems.append(f"changed files outside OUT_DIR: {changed}")
    if command == "prune":
        index = out / fuzz.INDEX
        if code == 0 and not index.is_file():
            problems.append(f"exit 0 without writing {index}")
        if code != 0 and index.exists():
            problems.append(f"exit {code} but {index} was left behind")
    if mutation.expect is not None and command != "verify" and code != mutation.expect and not crashed:
        problems.append(f"exit {code}, this mutation must give exit {mutation.expect}")
    if problems:
        pytest.fail(f"{command} on {mutation.id}: " + "; ".join(problems) + "\n" + _report(args, result, detail),
                    pytrace=False)


def _params(command: str):
    return [pytest.param(m, method, id=m.id + (f"[{method}]" if method not in ("", "magnitude") else ""))
            for m, method in CASES[command]]


def _input_case(command, mutation, method, tiny_model, calib_text, tmp_path, request):
    work = tmp_path
    model = work / "model"
    shutil.copytree(tiny_model, model)
    calib = work / "calib.txt"
    shutil.copyfile(calib_text, calib)
    detail = mutation.apply(model)
    assert snapshot(model) != snapshot(tiny_model), f"fuzz bug: {mutation.id} changed nothing"
    out = work / "out" if command == "prune" else None
    if command == "prune":
        args = ["prune", str(model), str(out), "--method", method, "--calib", str(calib), "--nsamples", "4",
                "--seqlen", "16", "--device", "cpu", "-q"]
    elif command == "eval":
        args = ["eval", str(model), "--data", str(calib), "--seqlen", "16", "--max-windows", "2", "--device", "cpu",
                "-q"]
    else:
        args = ["plan", str(model), "--method", method, "--nsamples", "4", "--seqlen", "16"]
    case_id = f"{command}-{request.node.callspec.id}"
    _check(command, mutation, case_id, args, work, out, detail, [tiny_model, calib_text])


@pytest.mark.parametrize(("mutation", "method"), _params("prune"))
def test_prune(mutation, method, tiny_model, calib_text, tmp_path, request):
    _input_case("prune", mutation, method, tiny_model, calib_text, tmp_path, request)


@pytest.mark.parametrize(("mutation", "method"), _params("eval"))
def test_eval(mutation, method, tiny_model, calib_text, tmp_path, request):
    _input_case("eval", mutation, method, tiny_model, calib_text, tmp_path, request)


@pytest.mark.parametrize(("mutation", "method"), _params("plan"))
def test_plan(mutation, method, tiny_model, calib_text, tmp_path, request):
    _input_case("plan", mutation, method, tiny_model, calib_text, tmp_path, request)


@pytest.mark.parametrize(("mutation", "method"), _params("verify"))
def test_verify(mutation, method, pruned, tiny_model, tmp_path, request):
    """verify reads OUT_DIR only: a damaged copy of a finished run must not be changed by it either."""
    run = tmp_path / "run"
    shutil.copytree(pruned, run)
    detail = mutation.apply(run)
    assert snapshot(run) != snapshot(pruned), f"fuzz bug: {mutation.id} changed nothing"
    _check("verify", mutation, f"verify-{request.node.callspec.id}", ["verify", str(run)], tmp_path, None, detail,
           [pruned, tiny_model])


def test_summary_rejects_a_vacuous_campaign():
    """The campaign's summary (checked by tests/conftest.py once every case has run, on the xdist controller
    too) fails a campaign that never succeeds, never hashes anything, or is too small, and passes a good one."""
    good = {f"{cmd}-{i}": (cmd, code, 12) for i, (cmd, code) in
            enumerate([(c, k) for c in ("prune", "eval", "plan") for k in (0, 2)] + [("verify", 1), ("verify", 2)])}
    assert fuzz.summary_problems(good, len(good)) == ["8 fuzz cases, 250..500 expected"]
    assert fuzz.summary_problems(good, len(good) + 1) is None  # a -k selection: nothing to judge
    no_success = {k: (cmd, 2 if cmd == "prune" else code, n) for k, (cmd, code, n) in good.items()}
    assert any(p.startswith("prune: exit codes {2}") for p in fuzz.summary_problems(no_success, len(good)))
    blind = dict(good) | {"x": ("eval", 2, 3)}
    assert "the no-change check looked at almost nothing" in fuzz.summary_problems(blind, len(blind))
