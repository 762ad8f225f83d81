"""Helpers for the fault tests: tiny runs, damaged copies of a checkpoint, output comparison."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SKIP = {"prune_report.json", ".lowmem/lock"}  # the report holds timings; the lock holds a pid


def config(model: Path, out: Path, calib: Path, **kw):
    from lowmem_gblm.config import CalibConfig, PruneConfig

    calib_cfg = CalibConfig(source=str(calib), nsamples=4, seqlen=32)
    opts = dict(method="wanda", sparsity=0.5, device="cpu", progress=False)
    opts.update(kw)
    return PruneConfig(model_dir=str(model), out_dir=str(out), calib=calib_cfg, **opts)


def run(model: Path, out: Path, calib: Path, **kw) -> dict:
    from lowmem_gblm.engine import prune

    return prune(config(model, out, calib, **kw))


def cli_args(model: Path, out: Path, calib: Path, method: str = "wanda", offload: str = "cpu") -> list[str]:
    return ["prune", str(model), str(out), "--method", method, "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--offload", offload, "--quiet"]


def spawn(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    """``lowmem-gblm ARGS`` in a fresh interpreter (the console script is cli.main:main)."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tree(out: Path) -> dict[str, bytes]:
    """Every file under OUT_DIR (relative path -> bytes) except the report and the lock."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and rel not in SKIP:
            files[rel] = path.read_bytes()
    return files


def diff_trees(a: Path, b: Path) -> list[str]:
    ta, tb = tree(a), tree(b)
    return sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(model: Path, name: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][name]


def edit_tensor(model: Path, name: str, fn) -> Path:
    """Rewrite the shard holding ``name`` with ``fn(tensor)`` in its place; returns the shard path."""
    path = shard_of(model, name)
    tensors = load_file(str(path))
    tensors[name] = fn(tensors[name].clone())
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def with_value(value: float):
    def fn(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[3] = value
        return t
    return fn
