"""Every option of a run as one frozen dataclass, validated in one place, with typed choices (Enums),
plain-JSON export and a stable fingerprint of the options that decide the output bytes.

``RunConfig`` holds what the two sweeps share (model, output, calibration, device, stores, budgets);
``PruneConfig`` adds the method and its options (handed to the method as ``MethodOptions``),
``GradientConfig`` is the gradient sweep alone, ``EvalConfig`` the streamed perplexity.

Each option is declared once, as a field built with ``options.option``: its default, help, flag, check, and what it
decides (fingerprint, method options, plan settings, gradient identity). Everything else is derived from that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import MISSING, dataclass
from enum import Enum
from pathlib import Path

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern
from lowmem_gblm.methods import Method, MethodOptions, get_method, registered
from lowmem_gblm.options import (
    HOW,
    PATH,
    Choice,
    choices,
    count,
    fingerprinted,
    named,
    option,
    plain,
    specs,
    validate,
    within,
)
from lowmem_gblm.runtime import COMPUTE_DTYPES, GRAD_FILE_DTYPES
from lowmem_gblm.stream.store import STORE_DTYPES
from lowmem_gblm.units import check_count, parse_size
from lowmem_gblm.userregex import compile_user_regex

Dtype = choices("Dtype", ("auto", *COMPUTE_DTYPES))  # compute dtype
StoreDtype = choices("StoreDtype", STORE_DTYPES)  # activation store: auto (= compute, exact), a float, int8 (lossy)
GradDtype = choices("GradDtype", GRAD_FILE_DTYPES)  # GBLM gradient files (accumulation is fp32 either way)


class Offload(Choice):
    """Where the calibration boundaries live; auto: the plan check chooses (never changes output bytes)."""

    AUTO = "auto"
    CPU = "cpu"
    DISK = "disk"


class GradNorm(Choice):
    L1 = "l1"
    L2 = "l2"


class MagnitudeScope(Choice):
    ROW = "row"
    MATRIX = "matrix"


class LayerSparsity(Choice):
    """How the target sparsity is spread over the decoder blocks."""

    UNIFORM = "uniform"
    OWL = "owl"


class Update(Choice):
    """How the kept weights change after a score method chose the mask (methods.update)."""

    NONE = "none"
    OBS = "obs"
    LSQ = "lsq"
    GRADUAL = "gradual"


class Solver(Choice):
    """How --update lsq solves for the kept weights (methods.update): auto, direct (float64 per row), iterative."""

    AUTO = "auto"
    DIRECT = "direct"
    ITERATIVE = "iterative"


class RidgeScaling(Choice):
    """How --ridge scales per linear (methods.update.update_damping)."""

    NONE = "none"
    INPUTS_PER_TOKEN = "inputs-per-token"


SOLVED_UPDATES = frozenset({"lsq", "gradual"})  # the updates that run a solver (--solver applies to them)
# --ridge / --ridge-scaling when --ridge is not given, for the solved updates (0 for the others), by mask kind. The
# exact refit fits the calibration text: on 32 windows of Wikipedia it gave up to 13.5% of perplexity to SparseGPT
# on other text (Python code, SmolLM2, 50%). A ridge toward the dense weights that grows with d / N (a linear's
# inputs per calibration token: the refit's unknowns per row over its equations) wins it back on every measured
# domain for SmolLM2 and Gemma-3 (README "Out of domain", issue 38). Unstructured masks, chosen jointly with the
# refit among all of a row's weights, overfit more and take the stronger ridge; N:M refits lose more in domain to
# a ridge and take the weaker one.
DEFAULT_RIDGE = {"unstructured": (3.0, "inputs-per-token"), "nm": (1.0, "inputs-per-token")}


def default_ridge(update, kind: str) -> tuple[float, str]:
    """(--ridge, --ridge-scaling) when --ridge is not given: DEFAULT_RIDGE's for the mask kind ("unstructured" or
    "nm") with a solved update, (0, none) otherwise."""
    return DEFAULT_RIDGE[kind] if str(update) in SOLVED_UPDATES else (0.0, "none")  # a Choice prints as its value


def _ridge_default_text() -> str:
    """DEFAULT_RIDGE in words for --ridge's help."""
    kinds = {"unstructured": "unstructured", "nm": "N:M"}
    return ", ".join(f"{r:g}{' x inputs-per-token' if scaling != 'none' else ''} ({kinds[k]})"
                     for k, (r, scaling) in DEFAULT_RIDGE.items())


def _solves(config) -> bool:
    """The solver options decide bytes only with a solved update and the iterative solver (runs before --solver
    fingerprinted none of them, and --solver direct reads neither tolerance nor iteration count)."""
    return str(config.update) in SOLVED_UPDATES and str(config.solver) != "direct"


MethodName = choices("MethodName", sorted(registered()))
_METHODS = "; ".join(f"{m.name}: {m.summary}" for m in sorted(registered().values(), key=lambda m: m.name))

ALPHA_MAX = 3.4028234663852886e38  # float32's largest value: --alpha multiplies float32 scores, beyond it is inf
_M = MethodOptions()  # a method option's default is the method's own


def _device(flag: str, device: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    index = device.removeprefix("cuda:")
    if index == device or not index.isdigit():
        raise UsageError(f"{flag} must be auto, cpu, cuda or cuda:N (N >= 0), got {device!r}")


def _head_chunk(flag: str, chunk: int | None) -> None:
    if chunk is not None and chunk < 1:
        raise UsageError(f"{flag} must be >= 1 token (or omitted: the whole window), got {chunk}")
    check_count(flag, chunk)


def _size(flag: str, size: str | None) -> None:
    parse_size(size)  # raises UsageError naming the bad size


def _regex(flag: str, regex: str | None) -> None:
    if regex is not None:
        compile_user_regex(flag, regex)


# the options every command that reads a model shares (help that differs per command is given there)
_DEVICE = {"help": "auto | cpu | cuda | cuda:N", "check": _device}
_DTYPE = {"help": "compute dtype (auto: fp32 on CPU, the checkpoint's on CUDA)"}
_PREFETCH = {"help": "read the next block on a background thread (same output)", "identity": HOW,
             "flag": "--prefetch/--no-prefetch", "plan": "prefetch"}
_CHUNK_WINDOWS = {"check": count()}
_FILE = {"identity": PATH, "cli_type": Path | None}


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration windows come from. ``source`` is a path or a hub name (c4, wikitext2)."""

    source: str | None = option(
        None, "calibration text: a .txt/.jsonl file, a folder of .txt, wiki-offline(:calib|:eval), c4, wikitext2, the "
        "out-of-domain python-stdlib / debian-docs / moby-dick(:calib|:eval) (scripts/fetch_ood.sh), or a mix A+B (an "
        "equal share of the windows from each)", flag="--calib", identity=PATH)
    nsamples: int = option(128, "calibration windows (or images)", check=count(), gradients=True)
    seqlen: int = option(2048, "tokens per window", check=count(2), gradients=True)  # one predicted token
    seed: int = option(0, "window sampling seed")
    ids_file: str | None = option(  # reuse exact windows: safetensors with int tensor input_ids [N, T]
        None, "safetensors file with input_ids [N, T]: reuse exact windows (e.g. a run's own)", flag="--calib-ids",
        **_FILE)
    # vision transformers: an image folder (ImageFolder layout, or flat with ``labels_file``), or exact inputs
    # (safetensors pixel_values [N, 3, H, W] and optional labels [N]); see calib.images
    images: str | None = option(
        None, "vision transformers: an image folder (FOLDER/<class>/<image>, or flat with --calib-labels), "
        "preprocessed by the model's preprocessor_config.json or the documented default", flag="--calib-images",
        **_FILE)
    labels_file: str | None = option(None, "--calib-images of a flat folder: a CSV of file,label lines",
                                     flag="--calib-labels", **_FILE)
    pixels_file: str | None = option(
        None, "vision transformers: safetensors with pixel_values [N, 3, H, W] and optional labels [N] (exact inputs, "
        "e.g. a run's own calibration_pixels.safetensors)", flag="--calib-pixels", **_FILE)
    renumber_labels: bool = option(
        False, "image classes: number the class names (subfolders, or --calib-labels / --images labels) 0, 1, ... in "
        "natural order (LABEL_2 before LABEL_10) instead of the model's config.json label2id/id2label; without it a "
        "class is its id in the config (a name such as LABEL_3, or a class id such as 3) and a class the config does "
        "not know is refused", legacy=True)

    def __post_init__(self) -> None:
        given = [f for f, v in (("--calib", self.source), ("--calib-ids", self.ids_file),
                                ("--calib-images", self.images), ("--calib-pixels", self.pixels_file)) if v]
        if not given:
            raise UsageError("no calibration data: pass --calib PATH|c4|wikitext2 or --calib-ids FILE.safetensors "
                             "(language models), --calib-images FOLDER or --calib-pixels FILE.safetensors (vision)")
        if len(given) > 1 and not (set(given) == {"--calib", "--calib-ids"}):
            raise UsageError(f"{' and '.join(given)}: pass one source of calibration data")
        if self.labels_file and not self.images:
            raise UsageError("--calib-labels needs --calib-images (a flat image folder)")
        if self.renumber_labels and not self.images:
            raise UsageError("--renumber-labels needs --calib-images (class folders or --calib-labels)")
        validate(self)


@dataclass(frozen=True)
class RunConfig:
    """What the gradient sweep and the prune sweep share."""

    model_dir: str = option(MISSING, "local Hugging Face checkpoint folder (safetensors)", cli=False)
    out_dir: str = option(MISSING, "output folder", identity=HOW, cli=False)
    calib: CalibConfig = option(MISSING, "where the calibration windows come from", cli=False)
    device: str = option("auto", **_DEVICE)
    dtype: Dtype = option(Dtype.AUTO, **_DTYPE)
    grad_norm: GradNorm = option(GradNorm.L1, "GBLM: norm of the per-sample gradients", gradients=True)
    offload: Offload = option(
        Offload.AUTO, "activation store: auto (RAM when it fits with a margin, else disk), cpu (RAM) or disk",
        identity=HOW, plan="offload")
    batch_size: int = option(  # windows per block call in every sweep (statistics and gradients stay per window)
        1, "windows per block call: every forward, and the gradient sweep's head and backward", check=count(),
        plan="batch_size")
    store_dtype: StoreDtype = option(
        StoreDtype.AUTO, "activation store: auto (= compute dtype, exact), a float dtype, or int8 (bitsandbytes "
        "blockwise 8-bit, lossy, ~1 byte/value)", legacy=True, gradients=True, plan="store_dtype")
    grad_dtype: GradDtype = option(
        GradDtype.FLOAT32, "GBLM gradient files: float32 (exact) or bfloat16 (half the disk; accumulation stays fp32)",
        legacy=True, gradients=True, plan="grad_dtype")
    head_chunk: int | None = option(  # tokens per head call in the gradient sweep (None: the whole window)
        None, "tokens per head call: bounds the fp32 logits to chunk x vocab (default: the whole window; eval: the "
        "whole window while its fp32 logits fit 256 MiB, e.g. 256 tokens for a 262k vocabulary)", legacy=True,
        gradients=True, plan="head_chunk", check=_head_chunk)
    checkpoint_every: int | None = option(  # gradient sweep keeps every k-th block input (None: the planner's choice)
        None, "gradient sweep: keep every K-th block input and recompute the rest in the reverse walk (fewer "
        "boundaries in RAM/on disk, about one more forward pass; same gradients). Default: 1 if it fits, else the "
        "smallest K that does", identity=HOW, check=count(), plan="checkpoint_every")
    chunk_windows: int | None = option(  # windows per reduction chunk (None: ceil(N/8)); ranks get whole chunks
        None, "windows per reduction chunk (default: ceil(N/8); a call never crosses one); statistics are summed per "
        "chunk in chunk order, so the output does not depend on the number of ranks; ranks get whole ones",
        gradients=True, **_CHUNK_WINDOWS)
    prefetch: bool = option(True, **_PREFETCH)  # read the next block on a background thread (same bytes either way)
    progress: bool = option(True, "progress bars", identity=HOW, cli=False)  # set from --quiet
    plan_check: bool = option(  # refuse before heavy work when the planner says the run cannot fit
        True, "refuse before heavy work when the planner says the run cannot fit", identity=HOW,
        flag="--plan-check/--no-plan-check")
    cpu_memory: str | None = option(  # host budget for the plan check (default: RSS + MemAvailable)
        None, "host RAM budget, e.g. 32GiB (default: this process's RSS + MemAvailable)", identity=HOW, check=_size)
    gpu_memory: str | None = option(  # device budget for the plan check (default: free CUDA memory)
        None, "device budget, e.g. 24GiB (default: free CUDA memory)", identity=HOW, check=_size)
    disk_space: str | None = option(  # disk budget for the plan check (default: free space where OUT_DIR is)
        None, "disk budget, e.g. 500GB (default: free space where the output goes)", identity=HOW, check=_size)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        """Plain JSON values (choices as their strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def plan_settings(self) -> dict:
        """The options that feed the planner (declared ``plan=``), by their memory.plan.PlanSettings names; the
        engine adds what it resolves (method, windows, device, dtype, ranks, chunking)."""
        return {spec.plan: plain(getattr(self, name)) for name, (_, spec) in specs(type(self)).items() if spec.plan}


@dataclass(frozen=True)
class GradientConfig(RunConfig):
    """The gradient sweep alone (``lowmem-gblm gradients``): per-sample gradient norms of the dense model."""


@dataclass(frozen=True)
class PruneConfig(RunConfig):
    method: MethodName = option(MethodName("wanda"), f"pruning method ({_METHODS})", cli_type=str)
    sparsity: float | None = option(  # None: 0.5 with unstructured masks; an N:M pattern implies it
        None, "fraction of each row removed, in (0, 1) (default 0.5; N:M patterns imply it)", show_default=False)
    pattern: str = option("unstructured", "unstructured, or N:M (N kept of every M)")
    magnitude_scope: MagnitudeScope = option(
        MagnitudeScope(_M.magnitude_scope), "magnitude: compare weights per output row or over the whole matrix",
        method=True)
    update: Update = option(  # score methods: none, or obs / lsq updates of the kept weights
        Update.NONE, "magnitude/wanda/gblm: after the mask, none (the published methods), obs (SparseGPT's OBS sweep "
        "for that mask), lsq (exact least squares per row) update of the kept weights, or gradual (the mask chosen "
        "with the update: the sparsity grows in steps, each step scoring the refit weights with the method's score "
        "and refitting exactly)", legacy=True)
    layer_sparsity: LayerSparsity = option(  # owl: per-block sparsity from outlier ratios
        LayerSparsity.UNIFORM, "uniform (every block at --sparsity) or owl (per block from the dense model's outlier "
        "ratios, mean = --sparsity; unstructured only)", legacy=True)
    owl_lambda: float = option(  # OWL: each block's sparsity within 2 * lambda of the target (Yin et al.: 0.08)
        0.08, "OWL: blocks within 2*lambda of --sparsity", legacy=True)
    owl_m: float = option(  # OWL: an outlier is a Wanda score above M times the block's mean (Yin et al.: 5)
        5.0, "OWL: outlier = score above M x the block's mean", legacy=True)
    targets: str | None = option(  # regex (re.search) on a linear's full name: only those are pruned (None: all)
        None, "regex: prune only the decoder linears whose full name matches (re.search), e.g. 'mlp\\.' or "
        "'layers\\.([0-9]|1[0-5])\\.'; default: every linear of every block", legacy=True, check=_regex)
    ignore: str | None = option(  # regex (re.search) on a linear's full name: those are left dense
        None, "regex: leave the matching decoder linears dense, e.g. 'down_proj'", legacy=True, check=_regex)
    alpha: float = option(_M.alpha, "GBLM: weight of the gradient term", method=True,
                          check=within(0.0, ALPHA_MAX, what=" (float32's range)"))
    gradients: str | None = option(  # GBLM: a finished gradient folder to reuse
        None, "GBLM: a finished gradient folder (lowmem-gblm gradients) to reuse", **_FILE)
    percdamp: float = option(_M.percdamp, "SparseGPT: Hessian dampening, a fraction of mean(diag H)", method=True,
                             check=within(0.0, 10.0))
    blocksize: int = option(_M.blocksize, "SparseGPT: columns per lazy-update block", method=True, check=count())
    solver: Solver = option(  # --update lsq: direct, iterative, or auto (methods.update.resolve_solver)
        Solver(_M.solver), "--update lsq: iterative (fp32 conjugate gradients, all rows at once; fast at every size), "
        "direct (float64 Cholesky per row; the reference, slow beyond ~2k columns) or auto (iterative but on narrow "
        "linears)", method=True, when=_solves, plan="solver")
    solver_tol: float = option(  # iterative: each row stops at this relative residual (methods.solve.DEFAULT_TOL)
        _M.solver_tol, "iterative solver: each row stops at this relative residual (smaller: closer to the exact "
        "solution, more iterations)", method=True, when=_solves, check=within(0.0, 1.0, open_lo=True, open_hi=True))
    solver_max_iter: int = option(_M.solver_max_iter, "iterative solver: at most this many iterations per row",
                                  method=True, when=_solves, check=count())
    gradual_steps: int = option(  # --update gradual, unstructured: steps to the target sparsity
        _M.gradual_steps, "--update gradual, unstructured: steps to the target sparsity (N:M: M-N steps, one more "
        "pruned per group each)", method=True, legacy=True, check=within(1, 64))
    gradual_coarse_tol: float = option(
        _M.gradual_coarse_tol, "--update gradual: every step but the last stops at this relative residual (or "
        "--solver-tol when larger; its solution is the next step's warm start)", method=True, legacy=True,
        when=lambda c: str(c.update) == "gradual", check=within(0.0, 1.0, open_lo=True, open_hi=True))
    ridge: float | None = option(  # None: DEFAULT_RIDGE's for the mask kind with lsq / gradual, 0 for the others
        None, "--update lsq/gradual: a ridge toward the dense weights, a fraction of mean(diag H) added to the damping "
        "(0: the exact refit; large: the masked dense weights. Default with lsq and gradual: "
        f"{_ridge_default_text()})", method=True, unless=_M.ridge, show_default=False,
        check=within(0.0, 1e6, what=" (a fraction of mean(diag H))"))
    ridge_scaling: RidgeScaling | None = option(  # None: DEFAULT_RIDGE's with a default ridge, else none
        None, "none, or inputs-per-token: --ridge times a linear's inputs / calibration tokens (default: none, or the "
        "default ridge's)", method=True, unless=_M.ridge_scaling, show_default=False)
    overwrite: bool = option(False, "discard a previous run in OUT_DIR", identity=HOW)

    def __post_init__(self) -> None:
        get_method(str(self.method.value if isinstance(self.method, Enum) else self.method))  # the registry's error
        if self.sparsity is None and str(self.pattern).strip().lower() == "unstructured":
            object.__setattr__(self, "sparsity", 0.5)
        self._default_ridge()
        super().__post_init__()
        self.method_spec  # noqa: B018 (refuses --update with a method that updates its own weights)
        if str(self.layer_sparsity) == "owl":
            if self.parsed_pattern.kind != "unstructured":
                raise UsageError(f"--layer-sparsity owl sets a sparsity per block; --pattern {self.pattern} fixes it "
                                 "at N/M in every block: use --pattern unstructured with owl, or --layer-sparsity "
                                 "uniform")
            if not 0.0 <= self.owl_lambda < 0.5:
                raise UsageError(f"--owl-lambda must be in [0, 0.5), got {self.owl_lambda}")
            if not self.owl_m > 0.0:
                raise UsageError(f"--owl-m must be > 0, got {self.owl_m}")
        Pattern.parse(self.pattern, self.sparsity)
        if self.ridge and str(self.update) not in SOLVED_UPDATES:
            raise UsageError(f"--ridge regularises the exact update of the kept weights: it applies to --update lsq "
                             f"or gradual, not --update {self.update}")
        if str(self.update) == "gradual":
            if str(self.solver) == "direct":
                raise UsageError("--update gradual refits the kept weights at every step with the iterative solver; "
                                 "--solver direct applies to --update lsq: drop it (or use --solver iterative)")
            if str(self.magnitude_scope) == "matrix":
                raise UsageError("--update gradual keeps the same count in every output row; --magnitude-scope "
                                 "matrix compares over the whole matrix: use --magnitude-scope row with it")

    def _default_ridge(self) -> None:
        """Resolve --ridge / --ridge-scaling not given (default_ridge); a ridge of 0 has no scaling, so a run
        without a ridge fingerprints as runs from before the option did."""
        scaling = self.ridge_scaling
        if self.ridge is None:
            ridge, default = default_ridge(self.update, Pattern.parse(self.pattern, self.sparsity).kind)
            object.__setattr__(self, "ridge", ridge)
            scaling = default if scaling is None else scaling
        if scaling is None or self.ridge == 0:
            scaling = "none"
        object.__setattr__(self, "ridge_scaling", scaling)

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)

    def prunes(self, linear: str) -> bool:
        """Whether the linear of this full module name (e.g. ``model.layers.3.mlp.down_proj``) is pruned:
        it matches --targets (when given) and not --ignore (llm-compressor's two lists, as regexes)."""
        if self.targets is not None and not compile_user_regex("--targets", self.targets).search(linear):
            return False
        return self.ignore is None or not compile_user_regex("--ignore", self.ignore).search(linear)

    @property
    def method_spec(self) -> Method:
        """The registry's method, followed by ``--update`` of the kept weights when it is not none."""
        return get_method(str(self.method) if str(self.update) == "none" else f"{self.method}+{self.update}")

    @property
    def runs_gradient_sweep(self) -> bool:
        """GBLM without a --gradients folder computes its gradients first."""
        return self.method_spec.needs_gradients and not self.gradients

    def method_options(self) -> MethodOptions:
        """The options declared ``method=True``, as the method reads them."""
        return MethodOptions(**{name: plain(getattr(self, name)) for name in named(PruneConfig, method=True)})

    def fingerprint_dict(self) -> dict:
        """The options that decide the output bytes (declared ``identity=BYTES``). model_dir is a path: the model
        itself is fingerprinted separately (io.checkpoint.CheckpointIndex.fingerprint)."""
        data = fingerprinted(self)
        data["model_dir"] = str(Path(self.model_dir).resolve())
        data["pattern"] = str(self.parsed_pattern)
        data["sparsity"] = self.parsed_pattern.sparsity
        return data

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def without_paths(fingerprint: dict) -> dict:
    """A ``fingerprint_dict`` (this version's, or one an older version recorded) without the path-valued options
    (declared ``identity=PATH``): what is compared when a run resumes."""
    out = {k: v for k, v in fingerprint.items() if k not in named(PruneConfig, identity=PATH)}
    if isinstance(out.get("calib"), dict):
        out["calib"] = {k: v for k, v in out["calib"].items() if k not in named(CalibConfig, identity=PATH)}
    return out


@dataclass(frozen=True)
class EvalConfig:
    """Streamed evaluation of a checkpoint (``lowmem-gblm eval``): perplexity on ``data`` and/or lm-eval's
    ``tasks`` (zero-shot accuracy); at least one of the two."""

    model_dir: str = option(MISSING, "checkpoint folder (dense or pruned)", cli=False)
    data: str | None = option(
        None, "perplexity on this evaluation text: a .txt/.jsonl file, a folder of .txt, wiki-offline:eval, wikitext2, "
        "or out of domain: python-stdlib:eval (code), debian-docs:eval (manuals), moby-dick:eval (a novel of 1851; "
        "these two from scripts/fetch_ood.sh)")
    seqlen: int = option(2048, "tokens per window", check=count(2))
    max_windows: int | None = option(None, "--data: evaluate only the first K windows", check=count())
    batch_size: int = option(1, "windows (--data) or requests (--tasks) per block call", check=count())
    device: str = option("auto", **_DEVICE)
    dtype: Dtype = option(Dtype.AUTO, **_DTYPE)
    head_chunk: int | None = option(  # tokens per head call (None: the whole window while its fp32 logits fit 256 MiB)
        None, "tokens per head call: bounds the fp32 logits to chunk x vocab (default: the whole window while its "
        "fp32 logits fit 256 MiB, e.g. 256 tokens for a 262k vocabulary)", check=_head_chunk)
    chunk_windows: int | None = option(  # windows per chunk dealt to ranks (None: ceil(W/8))
        None, "windows per chunk dealt to the ranks (default: ceil(W/8))", **_CHUNK_WINDOWS)
    prefetch: bool = option(True, **_PREFETCH)
    progress: bool = option(True, "progress bars", identity=HOW, cli=False)  # set from --quiet / --json
    tasks: tuple[str, ...] = option(  # lm-eval task names (empty: no zero-shot evaluation)
        (), "zero-shot accuracy on these lm-evaluation-harness tasks, comma-separated (e.g. boolq,arc_easy; needs pip "
        "install 'lowmem-gblm[zeroshot]'); with --data both run", cli_type=str | None)
    include_path: str | None = option(  # a folder of extra lm-eval task YAMLs
        None, "--tasks: a folder of extra lm-eval task YAMLs (e.g. from `lowmem-gblm wiki-task`)", **_FILE)
    num_fewshot: int | None = option(  # None: each task's own default
        None, "--tasks: few-shot examples per prompt (default: each task's own, 0 for most)", check=count(0))
    limit: int | None = option(None, "--tasks: only the first N documents per task", check=count())
    pass_tokens: int = option(  # zero-shot: padded tokens held per streamed pass (engine.loglik)
        1 << 18, "--tasks: padded tokens of requests held per streamed pass (each pass reads every block once; hidden "
        "states take pass_tokens x hidden size x dtype bytes)", check=count())
    # vision transformers: top-1 on an image folder (or exact pixel values with labels) and the mean cosine of the
    # final features to a reference (dense) model's on the same images
    images: str | None = option(
        None, "vision transformers: top-1 on an image folder (FOLDER/<class>/<image>; flat: features only), "
        "preprocessed as for --calib-images", **_FILE)
    pixels: str | None = option(
        None, "vision transformers: safetensors pixel_values [N, 3, H, W] and optional labels [N]", **_FILE)
    reference: str | None = option(
        None, "--images/--pixels: the dense model; reports the mean cosine of the final features", **_FILE)
    renumber_labels: bool = option(  # --images: class names -> 0, 1, ... in natural order, not the model's label2id
        False, specs(CalibConfig)["renumber_labels"][1].help)

    def __post_init__(self) -> None:
        validate(self)
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.images and self.pixels:
            raise UsageError("--images and --pixels: pass one set of evaluation images")
        if self.reference and not (self.images or self.pixels):
            raise UsageError("--reference compares features on images: pass --images or --pixels too")
        if self.renumber_labels and not self.images:
            raise UsageError("--renumber-labels numbers the class folders of --images: pass --images too")
        if (self.images or self.pixels) and (self.data or self.tasks):
            raise UsageError("--images/--pixels evaluate a vision transformer; --data/--tasks a language model: "
                             "pass one kind")
        if not self.data and not self.tasks and not (self.images or self.pixels):
            raise UsageError("eval needs --data (perplexity) and/or --tasks (lm-eval zero-shot accuracy), "
                             "e.g. --data wiki-offline:eval or --tasks arc_easy; or, for a vision transformer, "
                             "--images FOLDER / --pixels FILE (top-1, feature cosine)")
        if not self.tasks:
            for name, value in (("--include-path", self.include_path), ("--num-fewshot", self.num_fewshot),
                                ("--limit", self.limit)):
                if value is not None:
                    raise UsageError(f"{name} applies to --tasks; pass --tasks too")
        if self.data is None and self.max_windows is not None:
            raise UsageError("--max-windows applies to --data; pass --data too")
        if any(not t or t != t.strip() for t in self.tasks):
            raise UsageError(f"--tasks: empty or padded task name in {list(self.tasks)}; use --tasks a,b,c")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise UsageError(f"--include-path {self.include_path}: no such folder")
