"""Every option of a run as one frozen, validated dataclass, with JSON round-trip and a stable hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLOADS = ("auto", "cpu", "disk")  # auto: the plan check chooses (never changes output bytes)
GRAD_NORMS = ("l1", "l2")
MAGNITUDE_SCOPES = ("row", "matrix")

STORE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # as stream.store.STORE_DTYPES
GRAD_DTYPES = ("float32", "bfloat16")  # GBLM gradient files (accumulation is fp32 either way)

# Options that do not change the output bytes; left out of the resume fingerprint.
_NOT_FINGERPRINTED = frozenset({"out_dir", "overwrite", "offload", "progress", "prefetch", "plan_check",
                                "cpu_memory", "gpu_memory"})
# Fingerprinted only when not at this default, so runs started before the option existed still resume.
_FINGERPRINT_IF_NOT = {"store_dtype": "auto", "grad_dtype": "float32"}


def _check_store_dtype(value: str) -> None:
    if value not in STORE_DTYPES:
        raise UsageError(f"--store-dtype must be one of {STORE_DTYPES} (auto: the compute dtype, exact), "
                         f"got {value!r}")


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration windows come from. ``source`` is a path or a hub name (c4, wikitext2)."""

    source: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    ids_file: str | None = None  # reuse exact windows: safetensors with int tensor input_ids [N, T]

    def __post_init__(self) -> None:
        if self.source is None and self.ids_file is None:
            raise UsageError("no calibration data: pass --calib PATH|c4|wikitext2 or --calib-ids FILE.safetensors")
        if self.nsamples < 1:
            raise UsageError(f"--nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise UsageError(f"--seqlen must be >= 2 (one predicted token), got {self.seqlen}")


@dataclass(frozen=True)
class PruneConfig:
    model_dir: str
    out_dir: str
    calib: CalibConfig
    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    magnitude_scope: str = "row"
    device: str = "auto"
    dtype: str = "auto"
    alpha: float = 100.0
    grad_norm: str = "l1"
    gradients: str | None = None
    offload: str = "auto"
    percdamp: float = 0.01
    blocksize: int = 128
    batch_size: int = 1  # windows per block call in the prune sweep's forwards (statistics are per token)
    store_dtype: str = "auto"  # activation store: auto (= compute dtype, exact) | float dtype | int8 (lossy)
    grad_dtype: str = "float32"  # GBLM gradient files: float32 (exact) | bfloat16 (half the disk)
    prefetch: bool = True  # read the next block on a background thread (same bytes either way)
    overwrite: bool = False
    progress: bool = True
    plan_check: bool = True  # refuse before heavy work when the planner says the run cannot fit
    cpu_memory: str | None = None  # host budget for the plan check (default: RSS + MemAvailable)
    gpu_memory: str | None = None  # device budget for the plan check (default: free CUDA memory)

    def __post_init__(self) -> None:
        from lowmem_gblm.methods import get_method  # registry imports config-free modules only

        get_method(self.method)  # raises UsageError listing the methods
        Pattern.parse(self.pattern, self.sparsity)
        if self.magnitude_scope not in MAGNITUDE_SCOPES:
            raise UsageError(f"--magnitude-scope must be one of {MAGNITUDE_SCOPES}, got {self.magnitude_scope!r}")
        _check_runtime(self)
        if not self.alpha >= 0.0:
            raise UsageError(f"--alpha must be >= 0, got {self.alpha}")
        if not 0.0 <= self.percdamp <= 10.0:
            raise UsageError(f"--percdamp must be in [0, 10], got {self.percdamp}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.blocksize < 1:
            raise UsageError(f"--blocksize must be >= 1, got {self.blocksize}")

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> PruneConfig:
        data = dict(data)
        data["calib"] = CalibConfig(**data["calib"])
        return cls(**data)

    def fingerprint_dict(self) -> dict:
        """The options that decide the output bytes. model_dir is a path: the model itself is
        fingerprinted separately (io.checkpoint.model_fingerprint)."""
        data = {k: v for k, v in self.to_dict().items()
                if k not in _NOT_FINGERPRINTED and _FINGERPRINT_IF_NOT.get(k, object()) != v}
        data["model_dir"] = str(Path(self.model_dir).resolve())
        data["pattern"] = str(self.parsed_pattern)
        data["sparsity"] = self.parsed_pattern.sparsity
        return data

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class GradientConfig:
    """The gradient sweep alone (``lowmem-gblm gradients``): per-sample gradient norms of the dense model."""

    model_dir: str
    out_dir: str
    calib: CalibConfig
    grad_norm: str = "l1"
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "auto"
    store_dtype: str = "auto"
    grad_dtype: str = "float32"
    prefetch: bool = True
    progress: bool = True
    plan_check: bool = True
    cpu_memory: str | None = None
    gpu_memory: str | None = None

    def __post_init__(self) -> None:
        _check_runtime(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_runtime(cfg) -> None:
    """Options PruneConfig and GradientConfig share: device, dtype, store, offload, norm, budgets."""
    if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.offload not in OFFLOADS:
        raise UsageError(f"--offload must be one of {OFFLOADS}, got {cfg.offload!r}")
    if cfg.grad_norm not in GRAD_NORMS:
        raise UsageError(f"--grad-norm must be one of {GRAD_NORMS}, got {cfg.grad_norm!r}")
    _check_store_dtype(cfg.store_dtype)
    if cfg.grad_dtype not in GRAD_DTYPES:
        raise UsageError(f"--grad-dtype must be one of {GRAD_DTYPES} (the gradient files; accumulation is fp32), "
                         f"got {cfg.grad_dtype!r}")
    _check_sizes(cfg.cpu_memory, cfg.gpu_memory)


def _check_sizes(*sizes: str | None) -> None:
    from lowmem_gblm.memory.planner import parse_size  # raises UsageError naming the bad size

    for size in sizes:
        parse_size(size)


def diff_dicts(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprint dicts ("alpha: 100 -> 10")."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_dicts(a, b, prefix + key + ".")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
