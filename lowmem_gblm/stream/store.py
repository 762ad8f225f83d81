"""The activation store: calibration hidden states [N, T, D] between blocks.

``cpu`` keeps them in host RAM; ``disk`` keeps them in files under a folder, for boundaries that do
not fit in RAM. A disk buffer is read and written with positional I/O (``os.pwrite``/``os.preadv``)
into fresh tensors, one sample range per call, and its ranges are advised out of the page cache once
written back or read: nothing of it stays in the process's RSS or in the page cache between calls (a
memory map, which this replaced, kept every page it touched resident and counted in RssFile until
the buffer was released). Nothing else large lives on the host.

The store dtype (``--store-dtype``) is the compute dtype by default (exact). ``int8`` keeps each
sample as bitsandbytes blockwise 8-bit codes (dynamic map, one fp32 absmax per
``INT8_BLOCKSIZE`` values of the flattened [T, D] sample): about 1 byte per value instead of 2 or
4, lossy (each value within its block's absmax times half the widest gap of the map; the tests hold it
to that bound). ``get`` always returns the dtype the buffer was made for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lowmem_gblm.io.writer import fsync_dir
from lowmem_gblm.runtime import BY_NAME, COMPUTE_DTYPES, SAFETENSORS_CODE, dtype_bytes
from lowmem_gblm.stream.diskarray import DiskArray

_NP_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # file element types
STORE_DTYPES = ("auto", *COMPUTE_DTYPES, "int8")  # config.StoreDtype's values
INT8_BLOCKSIZE = 256  # values per absmax: 1 + 4/256 bytes per value; rel. error ~1% (4096: ~2%)


class ActivationBuffer:
    """One boundary: N samples of [T, D] in ``dtype``, in RAM or in a file (``DiskArray``)."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, path: Path | None = None):
        self.shape, self.dtype, self.path = tuple(shape), dtype, path
        self._ram = torch.empty(shape, dtype=dtype) if path is None else None
        self._file = None if path is None else DiskArray(path, _NP_VIEW[dtype], self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def get(self, n: int, count: int = 1) -> torch.Tensor:
        """Samples n..n+count as a [count, T, D] tensor (a fresh one for disk, a view for RAM)."""
        if self._ram is not None:
            return self._ram[n:n + count]
        out = torch.empty((count, *self.shape[1:]), dtype=self.dtype)
        self._file.read(n, out)
        return out

    def put(self, n: int, value: torch.Tensor) -> None:
        """Samples n..n+B from ``value`` [B, T, D] (converted to the buffer's dtype on the CPU)."""
        value = value.detach().to(device="cpu", dtype=self.dtype)
        if self._ram is not None:
            self._ram[n:n + value.shape[0]].copy_(value)
            return
        if tuple(value.shape[1:]) != self.shape[1:]:
            raise ValueError(f"put of {tuple(value.shape)} into a buffer of {self.shape}")
        self._file.write(n, value.contiguous())

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def release(self) -> None:
        self._ram = None
        if self._file is not None:
            self._file.remove()
            self._file = None

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
    """One boundary as blockwise int8 codes + fp32 absmax per sample (RAM, or two .npy files: ``path``
    and ``NAME.absmax.npy`` beside it, each a ``DiskArray``).

    Same interface as ``ActivationBuffer``; ``get`` dequantizes to ``dtype``.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, path: Path | None = None,
                 blocksize: int = INT8_BLOCKSIZE):
        self.shape, self.dtype, self.path, self.blocksize = tuple(shape), dtype, path, blocksize
        n, t, d = shape
        self._numel = t * d
        self._nblocks = -(-self._numel // blocksize)
        if path is None:
            self._codes = torch.empty((n, self._numel), dtype=torch.uint8)
            self._absmax = torch.empty((n, self._nblocks), dtype=torch.float32)
        else:
            self._codes = DiskArray(path, np.uint8, (n, self._numel))
            try:
                self._absmax = DiskArray(self._absmax_path, np.float32, (n, self._nblocks))
            except BaseException:
                self._codes.remove()
                raise

    @property
    def _absmax_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".absmax.npy")

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, n: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [count, numel] uint8, absmax [count, nblocks] fp32) of samples n..n+count."""
        if isinstance(self._codes, torch.Tensor):
            return self._codes[n:n + count], self._absmax[n:n + count]
        codes = torch.empty((count, self._numel), dtype=torch.uint8)
        absmax = torch.empty((count, self._nblocks), dtype=torch.float32)
        self._codes.read(n, codes)
        self._absmax.read(n, absmax)
        return codes, absmax

    def get(self, n: int, count: int = 1) -> torch.Tensor:
        """Samples n..n+count dequantized to a new [count, T, D] tensor in ``dtype``."""
        _, t, d = self.shape
        codes, absmax = self._rows(n, count)
        out = torch.empty((count, t, d), dtype=self.dtype)
        for k in range(count):
            out[k].copy_(dequantize_int8(codes[k], absmax[k], self.blocksize).view(t, d))
        return out

    def put(self, n: int, value: torch.Tensor) -> None:
        value = value.detach().to(device="cpu", dtype=self.dtype)  # quantize what an exact store would hold
        for k in range(value.shape[0]):
            codes, absmax = quantize_int8(value[k], self.blocksize)
            if isinstance(self._codes, torch.Tensor):
                self._codes[n + k].copy_(codes)
                self._absmax[n + k].copy_(absmax)
            else:
                self._codes.write(n + k, codes.contiguous())
                self._absmax.write(n + k, absmax.contiguous())

    def flush(self) -> None:
        if isinstance(self._codes, DiskArray):
            self._codes.flush()
            self._absmax.flush()

    def release(self) -> None:
        for part in (self._codes, self._absmax):
            if isinstance(part, DiskArray):
                part.remove()
        self._codes = self._absmax = None

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


def save_windows(path: Path, shape: tuple[int, int, int], dtype: torch.dtype, tag: str,
                 window: Callable[[int], torch.Tensor]) -> None:
    """Write windows ``window(0..N-1)`` (each [1, T, D]) as one safetensors file {"grad": [N, T, D]} with metadata
    block=``tag``, atomically; one window in memory at a time (the windows may come from other ranks)."""
    n, t, d = shape
    nbytes = n * t * d * dtype_bytes(dtype)
    header = {"__metadata__": {"format": "pt", "block": tag},
              "grad": {"dtype": SAFETENSORS_CODE[dtype], "shape": [n, t, d], "data_offsets": [0, nbytes]}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in range(n):
            f.write(window(k).to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def saved_windows(path: Path, tag: str, shape: tuple[int, ...]):
    """The {"grad"} slice of a file ``save_windows`` wrote with ``tag`` and ``shape`` (index it by window
    ranges), or None when there is no such usable file."""
    if not path.is_file():
        yield None
        return
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
        grad = f.get_slice("grad") if (f.metadata() or {}).get("block") == tag else None
        if grad is not None and list(grad.get_shape()) != list(shape):
            grad = None
    except Exception:  # a torn or foreign file: the caller recomputes
        grad = None
    yield grad
