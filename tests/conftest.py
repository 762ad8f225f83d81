import logging
from pathlib import Path

import pytest

from tests.tiny import make_tiny_llama, sample_text

logging.getLogger("lowmem_gblm").setLevel(logging.WARNING)

_FUZZ: dict[str, tuple[str, int, int]] = {}  # tests/test_fuzz.py's cases: id -> (command, exit code, files hashed)
_FUZZ_TOTAL: list[int] = []


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == "fuzz_outcome":
            case_id, command, code, hashed, total = value
            _FUZZ[case_id] = (command, code, hashed)
            _FUZZ_TOTAL[:] = [total]


def pytest_sessionfinish(session, exitstatus):
    """The fuzz campaign's summary, once every case has reported (here, not in a test: under pytest-xdist the
    cases run on several workers and only the controller sees them all)."""
    if hasattr(session.config, "workerinput") or not _FUZZ_TOTAL:
        return
    from tests.fuzz import summary_problems

    problems = summary_problems(_FUZZ, _FUZZ_TOTAL[0])
    if problems is not None:
        codes = sorted({(command, code) for command, code, _ in _FUZZ.values()})
        session.config.get_terminal_writer().line(f"fuzz campaign: {len(_FUZZ)} cases, (command, exit code) {codes}")
    if problems:
        session.config.get_terminal_writer().line("fuzz campaign summary FAILED: " + "; ".join(problems), red=True)
        session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """3 blocks, GQA (4 heads / 2 KV), untied head, several shards, fp32."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tied") / "model", tied=True, seed=1)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(sample_text(6000, seed=2))
    return path


@pytest.fixture(scope="session")
def pruned(tiny_model, calib_text, tmp_path_factory) -> Path:
    """A finished wanda 50% run of ``tiny_model`` (read-only for tests: copy it before damaging it)."""
    from tests.faults import run

    out = tmp_path_factory.mktemp("pruned") / "out"
    run(tiny_model, out, calib_text)
    return out
