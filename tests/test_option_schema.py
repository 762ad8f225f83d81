"""Each option is declared once (lowmem_gblm.options): the fingerprint, the method's options, the gradient folder's
identity, the plan settings and the command line are derived from the declarations. These tests pin what the
derivations must keep: a resumed run's identity (the fingerprints of every option varied, recorded before the
schema existed: runs started then still resume), and that every declared option reaches the places it says."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lowmem_gblm.config import CalibConfig, PruneConfig

GOLDEN = Path(__file__).parent / "golden" / "fingerprints.json"

# name -> (PruneConfig options, CalibConfig options): every option away from its default, alone or with what it needs
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "gblm": ({"method": "gblm"}, {}),
    "sparsegpt": ({"method": "sparsegpt"}, {}),
    "magnitude-matrix": ({"method": "magnitude", "magnitude_scope": "matrix"}, {}),
    "sparsity": ({"sparsity": 0.6}, {}),
    "nm": ({"pattern": "2:4"}, {}),
    "nm-no-sparsity": ({"pattern": "2:4", "sparsity": None}, {}),
    "obs": ({"update": "obs"}, {}),
    "lsq": ({"update": "lsq"}, {}),
    "lsq-nm": ({"update": "lsq", "pattern": "2:4"}, {}),
    "lsq-direct": ({"update": "lsq", "solver": "direct"}, {}),
    "lsq-iterative": ({"update": "lsq", "solver": "iterative", "solver_tol": 0.1, "solver_max_iter": 50}, {}),
    "lsq-ridge0": ({"update": "lsq", "ridge": 0.0}, {}),
    "lsq-ridge": ({"update": "lsq", "ridge": 0.5}, {}),
    "lsq-ridge-scaled": ({"update": "lsq", "ridge": 0.5, "ridge_scaling": "inputs-per-token"}, {}),
    "gradual": ({"method": "gblm", "update": "gradual", "gradual_steps": 8}, {}),
    "owl": ({"layer_sparsity": "owl", "owl_lambda": 0.1, "owl_m": 4.0}, {}),
    "targets": ({"targets": "mlp", "ignore": "down"}, {}),
    "alpha-gradients": ({"method": "gblm", "alpha": 10.0, "gradients": "g"}, {}),
    "sparsegpt-options": ({"method": "sparsegpt", "percdamp": 0.05, "blocksize": 64}, {}),
    "run-options": ({"device": "cpu", "dtype": "bfloat16", "grad_norm": "l2", "offload": "disk", "batch_size": 2,
                     "store_dtype": "int8", "grad_dtype": "bfloat16", "head_chunk": 16, "checkpoint_every": 2,
                     "chunk_windows": 4, "prefetch": False, "progress": False, "plan_check": False,
                     "cpu_memory": "1GiB", "gpu_memory": "1GiB", "disk_space": "1GiB", "overwrite": True}, {}),
    "calib": ({}, {"nsamples": 4, "seqlen": 64, "seed": 1, "ids_file": "ids.safetensors"}),
    "images": ({}, {"source": None, "images": "imgs", "labels_file": "l.csv", "renumber_labels": True}),
    "pixels": ({}, {"source": None, "pixels_file": "p.safetensors"}),
}


def _config(options: dict, calib: dict) -> PruneConfig:
    return PruneConfig(model_dir="/models/m", out_dir="o", calib=CalibConfig(**({"source": "x.txt"} | calib)), **options)


def _observed() -> dict:
    out = {}
    for name, (options, calib) in VARIANTS.items():
        config = _config(options, calib)
        out[name] = {"fingerprint": config.fingerprint_dict(),
                     "method_options": dataclasses.asdict(config.method_options())}
    return json.loads(json.dumps(out))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fingerprints_and_method_options_are_as_recorded(name):
    assert _observed()[name] == json.loads(GOLDEN.read_text())[name]


if __name__ == "__main__":  # record the goldens (only when a fingerprint is meant to change: old runs stop resuming)
    GOLDEN.write_text(json.dumps(_observed(), indent=1, sort_keys=True) + "\n")
