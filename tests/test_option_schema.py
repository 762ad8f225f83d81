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
    "gradual-coarse-tol": ({"update": "gradual", "gradual_coarse_tol": 0.2}, {}),
    "lsq-coarse-tol": ({"update": "lsq", "gradual_coarse_tol": 0.2}, {}),
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
    calib = CalibConfig(**({"source": "x.txt"} | calib))
    return PruneConfig(model_dir="/models/m", out_dir="o", calib=calib, **options)


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


# --- every declared option reaches the places its declaration names ------------------------------------------------

def test_every_config_field_is_declared():
    from lowmem_gblm.config import EvalConfig, GradientConfig
    from lowmem_gblm.options import specs

    for cls in (CalibConfig, PruneConfig, GradientConfig, EvalConfig):
        undeclared = [f.name for f in dataclasses.fields(cls) if f.name not in specs(cls)]
        assert not undeclared, f"{cls.__name__}: {undeclared} have no option(...) declaration"


def test_method_options_are_the_declared_ones_with_the_methods_defaults():
    from lowmem_gblm.methods import MethodOptions
    from lowmem_gblm.options import named, specs

    declared = set(named(PruneConfig, method=True))
    engine_filled = {"calib_tokens"}
    assert declared == {f.name for f in dataclasses.fields(MethodOptions)} - engine_filled
    defaults = MethodOptions()
    for name in declared:  # the option's default is the method's own (None: resolved from other options)
        field = specs(PruneConfig)[name][0]
        assert field.default is None or str(field.default) == str(getattr(defaults, name)), name


def test_plan_settings_are_fed_by_declared_options_or_resolved_by_the_engine():
    from lowmem_gblm.memory.plan import PlanSettings
    from lowmem_gblm.options import specs

    fed = {s.plan: name for name, (_, s) in specs(PruneConfig).items() if s.plan}
    settings = {f.name for f in dataclasses.fields(PlanSettings)}
    assert set(fed) <= settings, f"plan= names no PlanSettings field: {set(fed) - settings}"
    # what engine.run.open_run resolves itself (windows, device, dtypes, ranks, chunking, the method with its update)
    resolved = {"method", "nsamples", "seqlen", "device", "compute_dtype", "phases", "nproc", "rank", "chunk_windows",
                "sample_bytes"}
    assert settings - set(fed) == resolved, "a PlanSettings field nobody feeds (declare plan= on its option)"
    cfg = _config({"update": "lsq", "solver": "iterative", "offload": "disk", "head_chunk": 8}, {})
    got = cfg.plan_settings()
    assert (got["solver"], got["offload"], got["head_chunk"]) == ("iterative", "disk", 8)


def test_the_gradient_identity_is_the_declared_options():
    from lowmem_gblm.config import RunConfig
    from lowmem_gblm.engine.gradients import REUSE_KEYS
    from lowmem_gblm.options import named

    assert set(REUSE_KEYS) == {"format_version", "model", "calibration_sha256", *named(CalibConfig, gradients=True),
                               *named(RunConfig, gradients=True)}
    assert {"nsamples", "seqlen", "grad_norm", "head_chunk", "chunk_windows"} <= set(REUSE_KEYS)


def _cli_args(options: dict, calib: dict) -> list[str]:
    """The command line of a VARIANTS entry, from the declared flags."""
    from lowmem_gblm.options import flag, specs

    args = []
    for cls, values in ((PruneConfig, options), (CalibConfig, {"source": "x.txt"} | calib)):
        for name, value in values.items():
            if name == "progress":
                args += [] if value else ["--quiet"]
                continue
            decl = flag(name, specs(cls)[name][1])
            if value is None:
                continue
            if isinstance(value, bool):
                on, _, off = decl.partition("/")
                args.append(on if value else off or f"--no-{on[2:]}")
            else:
                args += [decl, str(value)]
    return args


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_command_line_builds_the_same_config(name, monkeypatch):
    """Every option's flag, typed value and default reach PruneConfig as the Python API's."""
    from typer.testing import CliRunner

    import cli.main as main

    seen = []
    monkeypatch.setattr(main, "run_prune", lambda config: seen.append(config) or {"sparsity": {"overall": 0.5},
                                                                                   "method": "x", "pattern": "y"})
    options, calib = VARIANTS[name]
    result = CliRunner().invoke(main.app, ["prune", "/models/m", "o", *_cli_args(options, calib)])
    assert result.exit_code == 0, result.output
    expected = _config(options, calib)
    assert seen[0].to_dict() | {"out_dir": "o"} == expected.to_dict()
    assert seen[0].fingerprint() == expected.fingerprint()
