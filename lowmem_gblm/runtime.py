"""The one dtype table (option names, safetensors codes, byte widths) and the device / dtype decisions,
made once per run and logged with their reason."""

from __future__ import annotations

import logging

import torch
from torch._subclasses.fake_tensor import is_fake

from lowmem_gblm.errors import UsageError

log = logging.getLogger(__name__)

# (option name, safetensors code, torch dtype): every dtype the package reads, writes or computes in
_TABLE = (
    ("float64", "F64", torch.float64), ("float32", "F32", torch.float32), ("bfloat16", "BF16", torch.bfloat16),
    ("float16", "F16", torch.float16), ("int64", "I64", torch.int64), ("int32", "I32", torch.int32),
    ("int16", "I16", torch.int16), ("int8", "I8", torch.int8), ("uint8", "U8", torch.uint8),
    ("bool", "BOOL", torch.bool), ("float8_e4m3fn", "F8_E4M3", torch.float8_e4m3fn),
    ("float8_e5m2", "F8_E5M2", torch.float8_e5m2),
)
BY_NAME: dict[str, torch.dtype] = {name: dt for name, _, dt in _TABLE}
BY_SAFETENSORS: dict[str, torch.dtype] = {code: dt for _, code, dt in _TABLE}
SAFETENSORS_CODE: dict[torch.dtype, str] = {dt: code for _, code, dt in _TABLE}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what blocks may compute in
GRAD_FILE_DTYPES = ("float32", "bfloat16")  # GBLM gradient files (accumulation is fp32 either way)
STORAGE_FLOATS = frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16})  # checkpoint weights


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 -> 'bfloat16'; a name stays itself."""
    return str(dtype).removeprefix("torch.")


def named_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' (or torch.bfloat16) -> torch.bfloat16."""
    if isinstance(name, torch.dtype):
        return name
    if str(name) not in BY_NAME:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    return BY_NAME[str(name)]


def concrete(t: torch.Tensor) -> bool:
    """True for a tensor with values (not meta, not a planner probe's fake tensor): only those can be checked."""
    return t.device.type != "meta" and not is_fake(t)


def storage_dtype(code: str, where: str = "") -> torch.dtype:
    """The torch dtype of a checkpoint's floating-point weights stored as safetensors ``code``."""
    dtype = BY_SAFETENSORS.get(code)
    if dtype not in STORAGE_FLOATS:
        raise UsageError(f"unsupported checkpoint dtype {code}" + (f" ({where})" if where else ""))
    return dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return device


def auto_dtype(device_type: str, checkpoint_dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """(compute dtype, reason) for ``--dtype auto``: fp32 on CPU (exact, and CPU half matmuls are slow);
    on CUDA the checkpoint's 16-bit dtype (fp32 if the checkpoint is fp32)."""
    if device_type == "cpu":
        return torch.float32, "CPU: fp32 compute"
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype, "CUDA: the checkpoint's 16-bit dtype"
    return torch.float32, "CUDA: fp32 checkpoint"


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The compute dtype for ``--dtype NAME`` (auto: see ``auto_dtype``), logged with its reason."""
    if str(name) != "auto":
        dtype, reason = named_dtype(str(name)), "--dtype"
    else:
        dtype, reason = auto_dtype(device.type, checkpoint_dtype)
    log.info("compute dtype %s on %s (%s); statistics, scores and accumulators in fp32",
             dtype_name(dtype), device, reason)
    return dtype
