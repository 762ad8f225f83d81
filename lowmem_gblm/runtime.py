"""Device and dtype decisions, made once per run and logged with their reason."""

from __future__ import annotations

import logging

import torch

from lowmem_gblm.errors import UsageError

log = logging.getLogger(__name__)

_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return device


def storage_dtype(st_dtype: str) -> torch.dtype:
    if st_dtype not in _SAFETENSORS:
        raise UsageError(f"unsupported checkpoint dtype {st_dtype}")
    return _SAFETENSORS[st_dtype]


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """Compute dtype. auto: fp32 on CPU (exact, and CPU half matmuls are slow); on CUDA the
    checkpoint's 16-bit dtype (fp32 if the checkpoint is fp32)."""
    if name != "auto":
        dtype = _NAMED[name]
        reason = "--dtype"
    elif device.type == "cpu":
        dtype, reason = torch.float32, "CPU: fp32 compute"
    elif checkpoint_dtype in (torch.float16, torch.bfloat16):
        dtype, reason = checkpoint_dtype, "CUDA: the checkpoint's 16-bit dtype"
    else:
        dtype, reason = torch.float32, "CUDA: fp32 checkpoint"
    log.info("compute dtype %s on %s (%s); statistics, scores and accumulators in fp32",
             str(dtype).removeprefix("torch."), device, reason)
    return dtype
