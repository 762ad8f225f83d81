"""Every option of a run as one frozen dataclass, validated in one place, with typed choices (Enums),
plain-JSON export and a stable fingerprint of the options that decide the output bytes.

``RunConfig`` holds what the two sweeps share (model, output, calibration, device, stores, budgets);
``PruneConfig`` adds the method and its options (handed to the method as ``MethodOptions``),
``GradientConfig`` is the gradient sweep alone, ``EvalConfig`` the streamed perplexity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern
from lowmem_gblm.methods import Method, MethodOptions, get_method, registered
from lowmem_gblm.runtime import COMPUTE_DTYPES, GRAD_FILE_DTYPES
from lowmem_gblm.stream.store import STORE_DTYPES
from lowmem_gblm.units import check_count, parse_size
from lowmem_gblm.userregex import compile_user_regex


class Choice(str, Enum):
    """A typed choice: compares equal to its value and prints as it (typer lists the values in --help)."""

    def __str__(self) -> str:
        return self.value


def _choices(name: str, values) -> type[Choice]:
    return Choice(name, {v.upper(): v for v in values})


Dtype = _choices("Dtype", ("auto", *COMPUTE_DTYPES))  # compute dtype
StoreDtype = _choices("StoreDtype", STORE_DTYPES)  # activation store: auto (= compute, exact), a float, int8 (lossy)
GradDtype = _choices("GradDtype", GRAD_FILE_DTYPES)  # GBLM gradient files (accumulation is fp32 either way)


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
_SOLVER_OPTIONS = ("solver", "solver_tol", "solver_max_iter")
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


MethodName = _choices("MethodName", sorted(registered()))

ALPHA_MAX = 3.4028234663852886e38  # float32's largest value: --alpha multiplies float32 scores, beyond it is inf

# Options that do not change the output bytes; left out of the resume fingerprint.
_NOT_FINGERPRINTED = frozenset({"out_dir", "overwrite", "offload", "progress", "prefetch", "plan_check",
                                "cpu_memory", "gpu_memory", "disk_space", "checkpoint_every"})
# Fingerprinted only when not at this default, so runs started before the option existed still resume.
_FINGERPRINT_IF_NOT = {"store_dtype": "auto", "grad_dtype": "float32", "head_chunk": None, "update": "none",
                       "layer_sparsity": "uniform", "owl_lambda": 0.08, "owl_m": 5.0, "targets": None,
                       "ignore": None, "gradual_steps": 4, "ridge": 0.0, "ridge_scaling": "none"}
# fingerprinted only when set (not None, not False): older runs resume
_VISION_CALIB = ("images", "labels_file", "pixels_file", "renumber_labels")
# Options naming a file or folder whose content the run identity records another way: the calibration windows'
# sha256 (beside the config), the gradient folder's identity and block hashes (in the manifest). How such a path
# was typed (relative from another folder, absolute, through a symlink) decides no byte, so it is not
# fingerprinted (MODEL_DIR is fingerprinted resolved: its config and tokenizer files are not hashed).
_PATH_OPTIONS = ("gradients",)
_PATH_CALIB = ("source", "ids_file", "images", "labels_file", "pixels_file")
_CHOICES = {"dtype": Dtype, "store_dtype": StoreDtype, "grad_dtype": GradDtype, "offload": Offload,
            "grad_norm": GradNorm, "magnitude_scope": MagnitudeScope, "method": MethodName, "update": Update,
            "layer_sparsity": LayerSparsity, "solver": Solver, "ridge_scaling": RidgeScaling}


def _coerce(cfg, name: str) -> None:
    """Turn a plain string option into its Choice, or say which values it takes."""
    kind = _CHOICES[name]
    value = getattr(cfg, name)
    try:
        object.__setattr__(cfg, name, kind(str(value.value if isinstance(value, Enum) else value)))
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} must be one of {', '.join(m.value for m in kind)}, got {value!r}") from None


def _check_device(device: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    index = device.removeprefix("cuda:")
    if index == device or not index.isdigit():
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (N >= 0), got {device!r}")


def _check_chunk(chunk: int | None) -> None:
    check_count("--chunk-windows", chunk)


def _check_head_chunk(chunk: int | None) -> None:
    if chunk is not None and chunk < 1:
        raise UsageError(f"--head-chunk must be >= 1 token (or omitted: the whole window), got {chunk}")
    check_count("--head-chunk", chunk)


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration windows come from. ``source`` is a path or a hub name (c4, wikitext2)."""

    source: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    ids_file: str | None = None  # reuse exact windows: safetensors with int tensor input_ids [N, T]
    # vision transformers: an image folder (ImageFolder layout, or flat with ``labels_file``), or exact inputs
    # (safetensors pixel_values [N, 3, H, W] and optional labels [N]); see calib.images
    images: str | None = None
    labels_file: str | None = None
    pixels_file: str | None = None
    renumber_labels: bool = False  # class names -> 0, 1, ... in natural order, not the model's label2id

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
        check_count("--nsamples", self.nsamples)
        check_count("--seqlen", self.seqlen, 2)  # one predicted token


@dataclass(frozen=True)
class RunConfig:
    """What the gradient sweep and the prune sweep share."""

    model_dir: str
    out_dir: str
    calib: CalibConfig
    device: str = "auto"
    dtype: Dtype = Dtype.AUTO
    grad_norm: GradNorm = GradNorm.L1
    offload: Offload = Offload.AUTO
    batch_size: int = 1  # windows per block call in every sweep (statistics and gradients stay per window)
    store_dtype: StoreDtype = StoreDtype.AUTO
    grad_dtype: GradDtype = GradDtype.FLOAT32
    head_chunk: int | None = None  # tokens per head call in the gradient sweep (None: the whole window)
    checkpoint_every: int | None = None  # gradient sweep keeps every k-th block input (None: the planner's choice)
    chunk_windows: int | None = None  # windows per reduction chunk (None: ceil(N/8)); ranks get whole chunks
    prefetch: bool = True  # read the next block on a background thread (same bytes either way)
    progress: bool = True
    plan_check: bool = True  # refuse before heavy work when the planner says the run cannot fit
    cpu_memory: str | None = None  # host budget for the plan check (default: RSS + MemAvailable)
    gpu_memory: str | None = None  # device budget for the plan check (default: free CUDA memory)
    disk_space: str | None = None  # disk budget for the plan check (default: free space where OUT_DIR is)

    def __post_init__(self) -> None:
        for name in _CHOICES:
            if hasattr(self, name):
                _coerce(self, name)
        _check_device(self.device)
        _check_head_chunk(self.head_chunk)
        check_count("--batch-size", self.batch_size)
        check_count("--checkpoint-every", self.checkpoint_every)
        _check_chunk(self.chunk_windows)
        for size in (self.cpu_memory, self.gpu_memory, self.disk_space):
            parse_size(size)  # raises UsageError naming the bad size

    def to_dict(self) -> dict:
        """Plain JSON values (choices as their strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class GradientConfig(RunConfig):
    """The gradient sweep alone (``lowmem-gblm gradients``): per-sample gradient norms of the dense model."""


@dataclass(frozen=True)
class PruneConfig(RunConfig):
    method: MethodName = MethodName("wanda")
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    magnitude_scope: MagnitudeScope = MagnitudeScope.ROW
    update: Update = Update.NONE  # score methods: none, or obs / lsq updates of the kept weights
    layer_sparsity: LayerSparsity = LayerSparsity.UNIFORM  # owl: per-block sparsity from outlier ratios
    owl_lambda: float = 0.08  # OWL: each block's sparsity within 2 * lambda of the target (Yin et al.: 0.08)
    owl_m: float = 5.0  # OWL: an outlier is a Wanda score above M times the block's mean (Yin et al.: 5)
    targets: str | None = None  # regex (re.search) on a linear's full name: only those are pruned (None: all)
    ignore: str | None = None  # regex (re.search) on a linear's full name: those are left dense
    alpha: float = 100.0
    gradients: str | None = None  # GBLM: a finished gradient folder to reuse
    percdamp: float = 0.01
    blocksize: int = 128
    solver: Solver = Solver.AUTO  # --update lsq: direct, iterative, or auto (methods.update.resolve_solver)
    solver_tol: float = 3e-2  # iterative: each row stops at this relative residual (methods.solve.DEFAULT_TOL)
    solver_max_iter: int = 100  # iterative: at most this many iterations per row
    gradual_steps: int = 4  # --update gradual, unstructured: steps to the target sparsity
    ridge: float | None = None  # lsq / gradual: a ridge toward the dense weights, a fraction of mean(diag H)
    # (None: DEFAULT_RIDGE's for the mask kind with lsq / gradual, 0 for the other updates)
    ridge_scaling: RidgeScaling | None = None  # inputs-per-token: the ridge times in_features / calib tokens
    # (None: DEFAULT_RIDGE's with a default ridge, else none)
    overwrite: bool = False

    def __post_init__(self) -> None:
        get_method(str(self.method.value if isinstance(self.method, Enum) else self.method))  # the registry's error
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
        for flag, regex in (("--targets", self.targets), ("--ignore", self.ignore)):
            if regex is not None:
                compile_user_regex(flag, regex)
        if not 0.0 <= self.alpha <= ALPHA_MAX:
            raise UsageError(f"--alpha must be a number in [0, {ALPHA_MAX:g}] (float32's range), got {self.alpha}")
        if not 0.0 <= self.percdamp <= 10.0:
            raise UsageError(f"--percdamp must be in [0, 10], got {self.percdamp}")
        check_count("--blocksize", self.blocksize)
        if not 0.0 < self.solver_tol < 1.0:
            raise UsageError(f"--solver-tol must be in (0, 1), got {self.solver_tol}")
        check_count("--solver-max-iter", self.solver_max_iter)
        if not isinstance(self.ridge, (int, float)) or not 0.0 <= self.ridge <= 1e6:
            raise UsageError(f"--ridge must be in [0, 1e6] (a fraction of mean(diag H)), got {self.ridge}")
        if self.ridge and str(self.update) not in SOLVED_UPDATES:
            raise UsageError(f"--ridge regularises the exact update of the kept weights: it applies to --update lsq "
                             f"or gradual, not --update {self.update}")
        if not 1 <= self.gradual_steps <= 64:
            raise UsageError(f"--gradual-steps must be in [1, 64], got {self.gradual_steps}")
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
        return MethodOptions(magnitude_scope=str(self.magnitude_scope), alpha=self.alpha, percdamp=self.percdamp,
                             blocksize=self.blocksize, solver=str(self.solver), solver_tol=self.solver_tol,
                             solver_max_iter=self.solver_max_iter, gradual_steps=self.gradual_steps,
                             ridge=self.ridge, ridge_scaling=str(self.ridge_scaling))

    def fingerprint_dict(self) -> dict:
        """The options that decide the output bytes. model_dir is a path: the model itself is
        fingerprinted separately (io.checkpoint.CheckpointIndex.fingerprint)."""
        data = {k: v for k, v in self.to_dict().items()
                if k not in _NOT_FINGERPRINTED and _FINGERPRINT_IF_NOT.get(k, object()) != v}
        data["calib"] = {k: v for k, v in data["calib"].items()
                         if k not in _VISION_CALIB or (v is not None and v is not False)}
        if str(self.update) not in SOLVED_UPDATES or str(self.solver) == "direct":  # runs before --solver resume
            for k in _SOLVER_OPTIONS:
                data.pop(k, None)
        data["model_dir"] = str(Path(self.model_dir).resolve())
        data["pattern"] = str(self.parsed_pattern)
        data["sparsity"] = self.parsed_pattern.sparsity
        return without_paths(data)

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def without_paths(fingerprint: dict) -> dict:
    """A ``fingerprint_dict`` (this version's, or one an older version recorded) without the path-valued options
    (``_PATH_OPTIONS``, ``_PATH_CALIB``): what is compared when a run resumes."""
    out = {k: v for k, v in fingerprint.items() if k not in _PATH_OPTIONS}
    if isinstance(out.get("calib"), dict):
        out["calib"] = {k: v for k, v in out["calib"].items() if k not in _PATH_CALIB}
    return out


@dataclass(frozen=True)
class EvalConfig:
    """Streamed evaluation of a checkpoint (``lowmem-gblm eval``): perplexity on ``data`` and/or lm-eval's
    ``tasks`` (zero-shot accuracy); at least one of the two."""

    model_dir: str
    data: str | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    device: str = "auto"
    dtype: Dtype = Dtype.AUTO
    head_chunk: int | None = None  # tokens per head call (None: the whole window while its fp32 logits fit 256 MiB)
    chunk_windows: int | None = None  # windows per chunk dealt to ranks (None: ceil(W/8))
    prefetch: bool = True
    progress: bool = True
    tasks: tuple[str, ...] = ()  # lm-eval task names (empty: no zero-shot evaluation)
    include_path: str | None = None  # a folder of extra lm-eval task YAMLs
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None  # documents per task (None: all)
    pass_tokens: int = 1 << 18  # zero-shot: padded tokens held per streamed pass (engine.loglik)
    # vision transformers: top-1 on an image folder (or exact pixel values with labels) and the mean cosine of the
    # final features to a reference (dense) model's on the same images
    images: str | None = None
    pixels: str | None = None
    reference: str | None = None
    renumber_labels: bool = False  # --images: class names -> 0, 1, ... in natural order, not the model's label2id

    def __post_init__(self) -> None:
        _coerce(self, "dtype")
        _check_chunk(self.chunk_windows)
        _check_device(self.device)
        _check_head_chunk(self.head_chunk)
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
        for flag, value, lo in (("--num-fewshot", self.num_fewshot, 0), ("--limit", self.limit, 1),
                                ("--pass-tokens", self.pass_tokens, 1), ("--seqlen", self.seqlen, 2),
                                ("--batch-size", self.batch_size, 1), ("--max-windows", self.max_windows, 1)):
            check_count(flag, value, lo)
