"""Helpers for the fault tests: tiny runs, damaged copies of a checkpoint, output comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks._common import REPO, cli_args, diff_trees, spawn  # noqa: F401 (re-exported)


def config(model: Path, out: Path, calib: Path, **kw):
    from lowmem_gblm.config import CalibConfig, PruneConfig

    calib_cfg = CalibConfig(source=str(calib), nsamples=4, seqlen=32)
    opts = dict(method="wanda", sparsity=0.5, device="cpu", progress=False)
    opts.update(kw)
    return PruneConfig(model_dir=str(model), out_dir=str(out), calib=calib_cfg, **opts)


def run(model: Path, out: Path, calib: Path, **kw) -> dict:
    from lowmem_gblm.engine import prune

    return prune(config(model, out, calib, **kw))


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
