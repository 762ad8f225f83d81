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
StoreDtype = Annotated[str, typer.Option(
    "--store-dtype", help="activation store: auto (= compute dtype, exact) | float32 | bfloat16 | float16 | "
    "int8 (bitsandbytes blockwise 8-bit, lossy, ~1 byte/value)")]
GradDtype = Annotated[str, typer.Option(
    "--grad-dtype", help="GBLM gradient files: float32 (exact) | bfloat16 (half the disk; accumulation stays fp32)")]
Prefetch = Annotated[bool, typer.Option(
    "--prefetch/--no-prefetch", help="read the next block on a background thread (same output)")]
Offload = Annotated[str, typer.Option(
    "--offload", help="activation store: auto (RAM when it fits with a margin, else disk) | cpu | disk")]
PlanCheck = Annotated[bool, typer.Option(
    "--plan-check/--no-plan-check", help="refuse before heavy work when the planner says the run cannot fit")]
CpuMemory = Annotated[str | None, typer.Option(
    "--cpu-memory", help="host RAM budget for the plan check, e.g. 32GiB (default: RSS + MemAvailable)")]
GpuMemory = Annotated[str | None, typer.Option(
    "--gpu-memory", help="device budget for the plan check (default: free CUDA memory)")]


@app.callback()
def root() -> None:
    """Memory-lean, block-streamed pruning of Hugging Face causal LMs."""
    from lowmem_gblm.memory.tracker import limit_heap_retention

    limit_heap_retention()  # before anything large is allocated


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
    offload: Offload = "auto",
    percdamp: Annotated[float, typer.Option("--percdamp", help="SparseGPT Hessian dampening")] = 0.01,
    blocksize: Annotated[int, typer.Option("--blocksize", help="SparseGPT column block")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="windows per block call (forward only)")] = 1,
    store_dtype: StoreDtype = "auto",
    grad_dtype: GradDtype = "float32",
    prefetch: Prefetch = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard a previous run in OUT_DIR")] = False,
    plan_check: PlanCheck = True,
    cpu_memory: CpuMemory = None,
    gpu_memory: GpuMemory = None,
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
            offload=offload, percdamp=percdamp, blocksize=blocksize, batch_size=batch_size,
            store_dtype=store_dtype, grad_dtype=grad_dtype, prefetch=prefetch, overwrite=overwrite, progress=not quiet,
            plan_check=plan_check, cpu_memory=cpu_memory, gpu_memory=gpu_memory,
        )
        report = run(config)
    except UsageError as exc:
        _fail(exc)
    s = report["sparsity"]
    typer.echo(f"pruned {model_dir} -> {out_dir}: method {report['method']}, pattern {report['pattern']}, "
               f"sparsity {s['overall']:.4f}")


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[str, typer.Argument(help="checkpoint folder (dense or pruned)")],
    data: Annotated[str, typer.Option("--data", help="text file, .jsonl, folder, wiki-offline:eval, wikitext2")],
    seqlen: SeqLen = 2048,
    max_windows: Annotated[int | None, typer.Option("--max-windows", help="evaluate only the first K windows")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="windows per block call")] = 1,
    device: Device = "auto",
    dtype: Dtype = "auto",
    prefetch: Prefetch = True,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Streamed perplexity (non-overlapping windows, last partial window dropped) and sparsity."""
    import json

    _setup_logging(quiet or as_json)
    from lowmem_gblm.evaluate.perplexity import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(model_dir, data, seqlen, max_windows, device, dtype, batch_size, prefetch)
    except UsageError as exc:
        _fail(exc)
    if as_json:
        keys = ("ppl", "nll", "tokens", "windows", "seqlen", "sparsity")
        typer.echo(json.dumps({k: result[k] for k in keys} | {"phases": result["phases"]}))
    else:
        typer.echo(f"{model_dir}: perplexity {result['ppl']:.4f} (nll {result['nll']:.5f}, {result['tokens']} tokens "
                   f"in {result['windows']} windows of {result['seqlen']}), sparsity {result['sparsity']:.4f}")


@app.command("import-gguf")
def import_gguf_cmd(
    gguf_file: Annotated[str, typer.Argument(help="a .gguf file (LLaMA family)")],
    out_dir: Annotated[str, typer.Argument(help="new Hugging Face checkpoint folder")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Dequantize a GGUF model into an ordinary sharded safetensors checkpoint with its tokenizer."""
    _setup_logging(quiet)
    from lowmem_gblm.io.gguf_import import import_gguf

    try:
        path = import_gguf(gguf_file, out_dir, dtype=dtype, overwrite=overwrite)
    except UsageError as exc:
        _fail(exc)
    typer.echo(f"imported {gguf_file} -> {path}")


@app.command()
def verify(
    out_dir: Annotated[str, typer.Argument(help="a finished lowmem-gblm output folder")],
    as_json: Annotated[bool, typer.Option("--json", help="also print the checks as one JSON line")] = False,
) -> None:
    """Check OUT_DIR: index vs shards, sha256 vs manifest, sparsity / N:M vs report, keys from_pretrained needs.

    Exit 0 when every check passes, 1 when one fails, 2 when OUT_DIR is not a finished run.
    """
    import json

    from lowmem_gblm.verify import verify as run

    try:
        checks = run(out_dir)
    except UsageError as exc:
        _fail(exc)
    for check in checks:
        typer.echo(check.line())
    ok = all(c.ok for c in checks)
    typer.echo(f"{'OK' if ok else 'FAILED'}: {sum(c.ok for c in checks)}/{len(checks)} checks passed for {out_dir}")
    if as_json:
        typer.echo(json.dumps({"ok": ok, "checks": {c.name: c.ok for c in checks}}))
    raise typer.Exit(code=0 if ok else 1)


@app.command()
def gradients(
    model_dir: Annotated[str, typer.Argument(help="local Hugging Face checkpoint folder (safetensors)")],
    grad_dir: Annotated[str, typer.Argument(help="gradient folder to write (reuse with prune --gradients)")],
    grad_norm: Annotated[str, typer.Option("--grad-norm", help="l1 | l2 across samples")] = "l1",
    calib: Calib = None,
    calib_ids: CalibIds = None,
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "auto",
    store_dtype: StoreDtype = "auto",
    grad_dtype: GradDtype = "float32",
    prefetch: Prefetch = True,
    plan_check: PlanCheck = True,
    cpu_memory: CpuMemory = None,
    gpu_memory: GpuMemory = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """GBLM gradient sweep alone: per-sample gradient norms of every decoder linear; rerun to resume."""
    _setup_logging(quiet)
    from lowmem_gblm.config import CalibConfig, GradientConfig
    from lowmem_gblm.stream.gradients import compute_gradients

    try:
        config = GradientConfig(
            model_dir=model_dir, out_dir=grad_dir,
            calib=CalibConfig(source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, ids_file=calib_ids),
            grad_norm=grad_norm, device=device, dtype=dtype, offload=offload, store_dtype=store_dtype,
            grad_dtype=grad_dtype, prefetch=prefetch, progress=not quiet, plan_check=plan_check, cpu_memory=cpu_memory,
            gpu_memory=gpu_memory,
        )
        report = compute_gradients(config)
    except UsageError as exc:
        _fail(exc)
    typer.echo(f"gradients of {model_dir} -> {grad_dir}: {report['blocks']} blocks, {config.grad_norm} norm, "
               f"{report['phase']['seconds']:.1f} s")


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
    store_dtype: Annotated[str | None, typer.Option(
        "--store-dtype", help="boundary store: float32 | bfloat16 | float16 | int8 (default: compute dtype)")]
    = None,
    offload: Annotated[str | None, typer.Option("--offload", help="cpu | disk (default: chosen)")] = None,
    grad_dtype: GradDtype = "float32",
    prefetch: Prefetch = True,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Predict device / host / disk peaks per phase and choose settings that fit the budgets."""
    import json

    from lowmem_gblm.memory.planner import plan as make_plan

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        result = make_plan(model, method, nsamples, seqlen, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
                           disk_dir=disk, compute_dtype=dtype, store_dtype=store_dtype, offload=offload,
                           disk_space=disk_space, grad_dtype=grad_dtype, prefetch=prefetch)
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
