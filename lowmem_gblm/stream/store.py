"""The activation store: calibration hidden states [N, T, D] between blocks.

``cpu`` keeps them in host RAM; ``disk`` keeps them in raw files under a folder (memory-mapped
reads, one sample at a time), for boundaries that do not fit in RAM. Nothing else large lives on
the host.

The store dtype (``--store-dtype``) is the compute dtype by default (exact). ``int8`` keeps each
sample as bitsandbytes blockwise 8-bit codes (dynamic map, one fp32 absmax per
``INT8_BLOCKSIZE`` values of the flattened [T, D] sample): about 1 byte per value instead of 2 or
4, lossy (see ``int8_error_bound``). ``get`` always returns the dtype the buffer was made for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lowmem_gblm.io.writer import fsync_dir
from lowmem_gblm.runtime import BY_NAME, COMPUTE_DTYPES, SAFETENSORS_CODE, dtype_bytes

_NP_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # memmap element types
STORE_DTYPES = ("auto", *COMPUTE_DTYPES, "int8")  # config.StoreDtype's values
INT8_BLOCKSIZE = 256  # values per absmax: 1 + 4/256 bytes per value; rel. error ~1% (4096: ~2%)


class ActivationBuffer:
    """One boundary: N samples of [T, D] in ``dtype``, in RAM or in a file."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, path: Path | None = None):
        self.shape, self.dtype, self.path = shape, dtype, path
        if path is None:
            self._ram = torch.empty(shape, dtype=dtype)
            self._map = None
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._ram = None
            self._map = np.lib.format.open_memmap(str(path), mode="w+", dtype=_NP_VIEW[dtype], shape=shape)

    def __len__(self) -> int:
        return self.shape[0]

    def get(self, n: int, count: int = 1) -> torch.Tensor:
        """Samples n..n+count as a [count, T, D] tensor (a copy for disk, a view for RAM)."""
        if self._ram is not None:
            return self._ram[n:n + count]
        arr = torch.from_numpy(np.array(self._map[n:n + count]))
        return arr.view(self.dtype) if self.dtype == torch.bfloat16 else arr

    def put(self, n: int, value: torch.Tensor) -> None:
        value = value.detach().to(device="cpu", dtype=self.dtype)
        if self._ram is not None:
            self._ram[n:n + value.shape[0]].copy_(value)
        else:
            data = value.view(torch.uint16).numpy() if self.dtype == torch.bfloat16 else value.numpy()
            self._map[n:n + value.shape[0]] = data

    def flush(self) -> None:
        if self._map is not None:
            self._map.flush()

    def release(self) -> None:
        self._ram = None
        if self._map is not None:
            del self._map
            self._map = None
            if self.path is not None and self.path.exists():
                os.unlink(self.path)

    @property
    def nbytes(self) -> int:
        n, t, d = self.shape
        return n * t * d * dtype_bytes(self.dtype)


# ---------------------------------------------------------------------------------------------
# int8: bitsandbytes blockwise 8-bit


def _bnb():
    import bitsandbytes.functional as bnbf  # lazy: only an int8 store needs it

    return bnbf


def int8_code() -> torch.Tensor:
    """The 256-value dynamic quantization map bitsandbytes uses by default (fp32, in [-1, 1])."""
    return _bnb().create_dynamic_map().to(torch.float32)


def int8_error_bound(absmax: torch.Tensor) -> torch.Tensor:
    """Per-block bound on |x - dequant(quant(x))|: absmax times the largest distance from a point of
    [-1, 1] to the map (half its widest gap, or an end: the map's lowest value is -0.993, not -1)."""
    code = int8_code().sort().values
    worst = max(float((code[1:] - code[:-1]).max()) / 2, float(code[0]) + 1, 1 - float(code[-1]))
    return absmax.to(torch.float32) * worst


def quantize_int8(x: torch.Tensor, blocksize: int = INT8_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any float dtype, CPU) -> (uint8 codes [x.numel()], fp32 absmax [ceil(numel / blocksize)])."""
    codes, state = _bnb().quantize_blockwise(x.contiguous().reshape(-1), blocksize=blocksize)
    return codes, state.absmax.to(torch.float32)


def dequantize_int8(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = INT8_BLOCKSIZE) -> torch.Tensor:
    """Inverse of ``quantize_int8`` as fp32 [numel]."""
    bnbf = _bnb()
    state = bnbf.QuantState(absmax=absmax, code=int8_code(), blocksize=blocksize, dtype=torch.float32)
    return bnbf.dequantize_blockwise(codes, quant_state=state)


class Int8Buffer:
    """One boundary as blockwise int8 codes + fp32 absmax per sample (RAM, or two .npy files).

    Same interface as ``ActivationBuffer``; ``get`` dequantizes to ``dtype``.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, path: Path | None = None,
                 blocksize: int = INT8_BLOCKSIZE):
        self.shape, self.dtype, self.path, self.blocksize = shape, dtype, path, blocksize
        n, t, d = shape
        self._numel = t * d
        self._nblocks = -(-self._numel // blocksize)
        if path is None:
            self._codes = torch.empty((n, self._numel), dtype=torch.uint8)
            self._absmax = torch.empty((n, self._nblocks), dtype=torch.float32)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._codes = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.uint8, shape=(n, self._numel))
            self._absmax = np.lib.format.open_memmap(str(self._absmax_path), mode="w+", dtype=np.float32,
                                                     shape=(n, self._nblocks))

    @property
    def _absmax_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".absmax.npy")

    def __len__(self) -> int:
        return self.shape[0]

    def get(self, n: int, count: int = 1) -> torch.Tensor:
        """Samples n..n+count dequantized to a new [count, T, D] tensor in ``dtype``."""
        _, t, d = self.shape
        out = torch.empty((count, t, d), dtype=self.dtype)
        for k in range(count):
            codes, absmax = self._codes[n + k], self._absmax[n + k]
            if isinstance(codes, np.ndarray):
                codes, absmax = torch.from_numpy(np.array(codes)), torch.from_numpy(np.array(absmax))
            out[k].copy_(dequantize_int8(codes, absmax, self.blocksize).view(t, d))
        return out

    def put(self, n: int, value: torch.Tensor) -> None:
        value = value.detach().to(device="cpu", dtype=self.dtype)  # quantize what an exact store would hold
        for k in range(value.shape[0]):
            codes, absmax = quantize_int8(value[k], self.blocksize)
            if isinstance(self._codes, np.ndarray):
                self._codes[n + k] = codes.numpy()
                self._absmax[n + k] = absmax.numpy()
            else:
                self._codes[n + k].copy_(codes)
                self._absmax[n + k].copy_(absmax)

    def flush(self) -> None:
        if isinstance(self._codes, np.memmap):
            self._codes.flush()
            self._absmax.flush()

    def release(self) -> None:
        self._codes = self._absmax = None
        if self.path is not None:
            for p in (self.path, self._absmax_path):
                if p.exists():
                    os.unlink(p)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * (self._numel + 4 * self._nblocks)


def store_nbytes(shape: tuple[int, int, int], store_dtype: str | torch.dtype) -> int:
    """Bytes one boundary of ``shape`` takes in a store of ``store_dtype`` (a name or a float dtype)."""
    n, t, d = shape
    if store_dtype == "int8":
        return n * (t * d + 4 * -(-(t * d) // INT8_BLOCKSIZE))
    dtype = BY_NAME[store_dtype] if isinstance(store_dtype, str) else store_dtype
    return n * t * d * dtype_bytes(dtype)


class ActivationStore:
    """Factory for boundaries in one place: ``cpu`` (RAM) or ``disk`` (files under ``folder``).

    ``store_dtype``: ``auto`` (the dtype each buffer is made for: exact), a float dtype name, or
    ``int8`` (blockwise 8-bit). Buffers made with ``exact=True`` ignore it.
    """

    def __init__(self, kind: str, folder: Path | None = None, store_dtype: str = "auto"):
        if kind not in ("cpu", "disk"):
            raise ValueError(kind)
        if kind == "disk" and folder is None:
            raise ValueError("disk store needs a folder")
        if str(store_dtype) not in STORE_DTYPES:
            raise ValueError(store_dtype)
        self.kind, self.folder, self.store_dtype = kind, folder, str(store_dtype)
        self._count = 0

    def new(self, shape: tuple[int, int, int], dtype: torch.dtype, name: str | None = None,
            exact: bool = False) -> ActivationBuffer | Int8Buffer:
        """A boundary read back as ``dtype`` (stored as ``store_dtype`` unless ``exact``)."""
        path = None
        if self.kind == "disk":
            self._count += 1
            path = self.folder / f"{name or f'buf{self._count}'}.npy"
        sdt = "auto" if exact else self.store_dtype
        if sdt == "int8":
            return Int8Buffer(shape, dtype, path)
        return ActivationBuffer(shape, dtype if sdt == "auto" else BY_NAME[sdt], path)


@contextlib.contextmanager
def scratch(folder: Path):
    """``folder`` holds a disk store: scratch that a resumed run rebuilds. When the work inside fails (a full
    disk above all) it is removed, so the space it took is free again for the rerun."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# a buffer saved to one safetensors file (one sample in memory at a time): the gradient sweep's
# persisted incoming gradient, so a killed sweep resumes at the block it was on


def save_buffer(path: Path, buf: ActivationBuffer, tag: str) -> None:
    """Write ``buf`` [N, T, D] as a safetensors file {"grad"} with metadata block=``tag``, atomically."""
    n, t, d = buf.shape
    header = {"__metadata__": {"format": "pt", "block": tag},
              "grad": {"dtype": SAFETENSORS_CODE[buf.dtype], "shape": [n, t, d], "data_offsets": [0, buf.nbytes]}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in range(n):
            f.write(buf.get(k).contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_buffer(path: Path, buf: ActivationBuffer, tag: str) -> bool:
    """Fill ``buf`` from a file ``save_buffer`` wrote with the same ``tag`` and shape; False if there is none."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("block") != tag:
                return False
            grad = f.get_slice("grad")
            if list(grad.get_shape()) != list(buf.shape):
                return False
            for k in range(len(buf)):
                buf.put(k, grad[k:k + 1])
    except Exception:  # a torn or foreign file: the caller recomputes
        return False
    return True
