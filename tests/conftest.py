import logging
from pathlib import Path

import pytest

from tests.tiny import make_tiny_llama, sample_text

logging.getLogger("lowmem_gblm").setLevel(logging.WARNING)


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
