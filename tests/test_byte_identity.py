"""Output bytes are a contract: the same commands on the same tiny checkpoints give the same files.

``tests/golden/output_sha256.json`` holds the sha256 of every output file (shards, index, calibration
ids, gradient files) of the commands below, recorded with the code before the engine redesign
(commit c34fd1f). A change that moves code must leave every hash as it is; a change that means to
alter outputs says so and re-records them (``python -m tests.test_byte_identity --record``). Re-recorded
once since, adding a file and changing no hash: gradient folders' ``input_sq.safetensors`` (the dense
forward's input statistics that OWL reuses).

Not hashed: ``prune_report.json`` (timings, versions), ``.lowmem/manifest.json`` and ``gradients.json``
(the model fingerprint holds file times), copied side files (the fixture's own config and tokenizer).

The hashes hold for a thread count: SparseGPT's Cholesky and the matmuls add in another order on another
number of threads, so the runs pin torch to GOLDEN_THREADS (what they were recorded with) whatever the
runner chose (scripts/test.sh runs pytest workers at one thread each).

They also hold for a CPU's kernels: on a CPU where torch picks other kernels (AVX512 with bf16 instead of
the machine the hashes were recorded on) the gradient sweep's float32 sums come out in another order. Such a
machine's hashes, recorded with the *same* code as the primary ones, are kept beside them in
``output_sha256.variants.json`` with the machine they came from, only for the commands whose bytes differ
there (``python -m tests.test_byte_identity --add-variant``). A run must equal the primary set or one of its
commands' variants: code that changes a single output byte still matches none.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "output_sha256.json"
VARIANTS = GOLDEN.with_name("output_sha256.variants.json")  # name -> [{"machine": ..., "files": {file: sha256}}]
CALIB = ["--nsamples", "4", "--seqlen", "32", "--seed", "0", "--device", "cpu", "--quiet"]

# name -> (model fixture, command words after the model folder and the output folder)
PRUNE_RUNS = {
    "magnitude-unstructured": ("tiny_model", ["--method", "magnitude", "--sparsity", "0.5"]),
    "magnitude-2of4": ("tiny_model", ["--method", "magnitude", "--pattern", "2:4"]),
    "magnitude-matrix": ("tiny_model", ["--method", "magnitude", "--sparsity", "0.3", "--magnitude-scope", "matrix"]),
    "wanda-unstructured-cpu": ("tiny_model", ["--method", "wanda", "--sparsity", "0.5", "--offload", "cpu"]),
    "wanda-2of4-disk": ("tiny_model", ["--method", "wanda", "--pattern", "2:4", "--offload", "disk"]),
    "wanda-int8-store": ("tiny_model", ["--method", "wanda", "--sparsity", "0.5", "--store-dtype", "int8"]),
    "wanda-batch2-tied": ("tiny_tied", ["--method", "wanda", "--sparsity", "0.6", "--batch-size", "2"]),
    "sparsegpt-unstructured": ("tiny_model", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    "sparsegpt-2of4-disk": ("tiny_model", ["--method", "sparsegpt", "--pattern", "2:4", "--offload", "disk"]),
    "gblm-l1-cpu": ("tiny_model", ["--method", "gblm", "--sparsity", "0.5", "--offload", "cpu"]),
    "gblm-l2-2of4-disk": ("tiny_model", ["--method", "gblm", "--pattern", "2:4", "--grad-norm", "l2",
                                         "--offload", "disk"]),
    "gblm-l1-int8-bf16grads-tied": ("tiny_tied", ["--method", "gblm", "--sparsity", "0.5", "--store-dtype", "int8",
                                                  "--grad-dtype", "bfloat16", "--alpha", "10"]),
}
GRADIENT_RUNS = {
    "gradients-l1-cpu": ("tiny_model", ["--grad-norm", "l1", "--offload", "cpu"]),
    "gradients-l2-disk-bf16": ("tiny_model", ["--grad-norm", "l2", "--offload", "disk", "--grad-dtype", "bfloat16"]),
}
# a prune that reuses the l1 gradient folder above
REUSE_RUN = ("gblm-reuse-gradients", "tiny_model", ["--method", "gblm", "--sparsity", "0.5"])
GOLDEN_THREADS = 2  # torch intra-op threads the hashes were recorded with (this project's 2-core machine)


def _hash_outputs(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and (path.suffix == ".safetensors" or rel == "model.safetensors.index.json"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _invoke(args: list[str]) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{' '.join(args)}\n{result.output}\n{result.exception!r}"


def run_all(models: dict[str, Path], calib: Path, work: Path) -> dict[str, dict[str, str]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(GOLDEN_THREADS)
    try:
        return _run_all(models, calib, work)
    finally:
        torch.set_num_threads(threads)


def _run_all(models: dict[str, Path], calib: Path, work: Path) -> dict[str, dict[str, str]]:
    hashes = {}
    base = ["--calib", str(calib), *CALIB]
    for name, (model, words) in GRADIENT_RUNS.items():
        _invoke(["gradients", str(models[model]), str(work / name), *base, *words])
        hashes[name] = _hash_outputs(work / name)
    for name, (model, words) in PRUNE_RUNS.items():
        _invoke(["prune", str(models[model]), str(work / name), *base, *words])
        hashes[name] = _hash_outputs(work / name)
    name, model, words = REUSE_RUN
    _invoke(["prune", str(models[model]), str(work / name), *base, *words,
             "--gradients", str(work / "gradients-l1-cpu")])
    hashes[name] = _hash_outputs(work / name)
    return hashes


def test_outputs_are_byte_identical_to_the_recorded_ones(tiny_model, tiny_tied, calib_text, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    variants = _variants()
    assert set(variants) <= set(golden)
    got = run_all({"tiny_model": tiny_model, "tiny_tied": tiny_tied}, calib_text, tmp_path)
    assert set(got) == set(golden)
    for name in golden:
        recorded = [golden[name], *(v["files"] for v in variants.get(name, []))]
        assert got[name] in recorded, f"{name}: output bytes changed"
    # every run wrote something: a prune at least its shards and index, a gradient folder its block files
    assert all(len(files) >= 3 for files in got.values())


def _run_here() -> dict[str, dict[str, str]]:
    """Every command's hashes on this machine, on the fixtures' checkpoints built in a scratch folder."""
    import tempfile

    from tests.tiny import make_tiny_llama, sample_text

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"tiny_model": make_tiny_llama(tmp / "tiny" / "model"),
                  "tiny_tied": make_tiny_llama(tmp / "tied" / "model", tied=True, seed=1)}
        calib = tmp / "calib.txt"
        calib.write_text(sample_text(6000, seed=2))
        hashes = run_all(models, calib, tmp / "runs")
    return hashes


def _record() -> None:
    hashes = _run_here()
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"recorded {sum(map(len, hashes.values()))} file hashes of {len(hashes)} runs in {GOLDEN}")


def _variants() -> dict[str, list[dict]]:
    return json.loads(VARIANTS.read_text()) if VARIANTS.is_file() else {}


def machine() -> str:
    """The CPU the hashes came from: torch's kernel level, the model name and its bf16 / AMX flags."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extra = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{torch.backends.cpu.get_cpu_capability()}, {name}, {' '.join(extra) or 'no avx512'}"


def _add_variant() -> None:
    """Run the commands here; keep, for each command whose bytes match neither the primary set nor a variant,
    this machine's hashes as a variant. Only with the code that recorded the primary set (see the docstring)."""
    golden, variants = json.loads(GOLDEN.read_text()), _variants()
    hashes = _run_here()
    added = [name for name in golden
             if hashes[name] != golden[name] and hashes[name] not in [v["files"] for v in variants.get(name, [])]]
    for name in added:
        variants.setdefault(name, []).append({"machine": machine(), "files": hashes[name]})
    VARIANTS.write_text(json.dumps(variants, indent=1, sort_keys=True) + "\n")
    print(f"{len(added)} command(s) differ on this machine ({machine()}): {', '.join(added) or 'none'}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        _record()
    elif sys.argv[1:] == ["--add-variant"]:
        _add_variant()
    else:
        raise SystemExit("usage: python -m tests.test_byte_identity --record | --add-variant")


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
