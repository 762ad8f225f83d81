"""lowmem-gblm command line: a thin typed shell that builds a config and calls the library."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from lowmem_gblm.errors import UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memory-lean, block-streamed pruning of Hugging Face causal LMs (GBLM, Wanda, SparseGPT).")
log = logging.getLogger("lowmem_gblm")

Calib = Annotated[str | None, typer.Option(
    "--calib", help="text/.jsonl file, folder of .txt, wiki-offline[:calib|:eval], c4, wikitext2")]
CalibIds = Annotated[str | None, typer.Option(
    "--calib-ids", help="safetensors with input_ids [N, T] to reuse exact windows")]
NSamples = Annotated[int, typer.Option("--nsamples", help="calibration windows")]
SeqLen = Annotated[int, typer.Option("--seqlen", help="tokens per window")]
Seed = Annotated[int, typer.Option("--seed", help="window sampling seed")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
Dtype = Annotated[str, typer.Option("--dtype", help="compute dtype: auto | float32 | bfloat16 | float16")]


@app.callback()
def root() -> None:
    """Memory-lean, block-streamed pruning of Hugging Face causal LMs."""


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


@app.command()
def prune(
    model_dir: Annotated[str, typer.Argument(help="local Hugging Face checkpoint folder (safetensors)")],
    out_dir: Annotated[str, typer.Argument(help="output folder (a new sharded checkpoint)")],
    method: Annotated[str, typer.Option("--method", help="magnitude | wanda | sparsegpt | gblm")] = "wanda",
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="fraction removed, in (0, 1)")] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="unstructured | N:M (N kept of every M)")] = "unstructured",
    magnitude_scope: Annotated[str, typer.Option("--magnitude-scope", help="row | matrix")] = "row",
    calib: Calib = None,
    calib_ids: CalibIds = None,
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    alpha: Annotated[float, typer.Option("--alpha", help="GBLM gradient-term weight")] = 100.0,
    grad_norm: Annotated[str, typer.Option("--grad-norm", help="GBLM: l1 | l2")] = "l1",
    gradients: Annotated[str | None, typer.Option("--gradients", help="GBLM: reuse a gradient folder")] = None,
    offload: Annotated[str, typer.Option("--offload", help="activation store: cpu | disk")] = "cpu",
    percdamp: Annotated[float, typer.Option("--percdamp", help="SparseGPT Hessian dampening")] = 0.01,
    blocksize: Annotated[int, typer.Option("--blocksize", help="SparseGPT column block")] = 128,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard a previous run in OUT_DIR")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Prune MODEL_DIR into OUT_DIR, one decoder block at a time; rerun the same command to resume."""
    _setup_logging(quiet)
    from lowmem_gblm.config import CalibConfig, PruneConfig
    from lowmem_gblm.pipeline import prune as run

    if sparsity is None and pattern.strip().lower() == "unstructured":
        sparsity = 0.5
    try:
        config = PruneConfig(
            model_dir=model_dir, out_dir=out_dir,
            calib=CalibConfig(source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, ids_file=calib_ids),
            method=method, sparsity=sparsity, pattern=pattern, magnitude_scope=magnitude_scope,
            device=device, dtype=dtype, alpha=alpha, grad_norm=grad_norm, gradients=gradients,
            offload=offload, percdamp=percdamp, blocksize=blocksize, overwrite=overwrite, progress=not quiet,
        )
        report = run(config)
    except UsageError as exc:
        _fail(exc)
    s = report["sparsity"]
    typer.echo(f"pruned {model_dir} -> {out_dir}: method {report['method']}, pattern {report['pattern']}, "
               f"sparsity {s['overall']:.4f}")


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="model folder or config.json (no weights needed)")],
    method: Annotated[str, typer.Option("--method", help="magnitude | wanda | sparsegpt | gblm")] = "gblm",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    gpu_memory: Annotated[str | None, typer.Option(
        "--gpu-memory", help="device budget, e.g. 24GiB (omit or 0: compute on the CPU)")] = None,
    cpu_memory: Annotated[str | None, typer.Option("--cpu-memory", help="host RAM budget, e.g. 32GiB")] = None,
    disk: Annotated[str | None, typer.Option("--disk", help="folder for the disk store (free space counts)")] = None,
    disk_space: Annotated[str | None, typer.Option("--disk-space", help="disk budget instead of --disk's free space")]
    = None,
    dtype: Dtype = "auto",
    store_dtype: Annotated[str | None, typer.Option("--store-dtype", help="boundary store dtype (default: compute)")]
    = None,
    offload: Annotated[str | None, typer.Option("--offload", help="cpu | disk (default: chosen)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Predict device / host / disk peaks per phase and choose settings that fit the budgets."""
    import json

    from lowmem_gblm.memory.planner import plan as make_plan

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        result = make_plan(model, method, nsamples, seqlen, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
                           disk_dir=disk, compute_dtype=dtype, store_dtype=store_dtype, offload=offload,
                           disk_space=disk_space)
    except UsageError as exc:
        _fail(exc)
    typer.echo(json.dumps(result.to_dict(), sort_keys=True) if as_json else result.table())


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
