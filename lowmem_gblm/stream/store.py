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
import ctypes
import errno
import json
import os
import shutil
import struct
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lowmem_gblm.errors import InputError, OutOfSpace
from lowmem_gblm.io.writer import fsync_dir
from lowmem_gblm.runtime import BY_NAME, COMPUTE_DTYPES, SAFETENSORS_CODE, dtype_bytes
from lowmem_gblm.units import fmt_size, prod

_NP_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # file element types
STORE_DTYPES = ("auto", *COMPUTE_DTYPES, "int8")  # config.StoreDtype's values
INT8_BLOCKSIZE = 256  # values per absmax: 1 + 4/256 bytes per value; rel. error ~1% (4096: ~2%)


# ---------------------------------------------------------------------------------------------
# a disk buffer's file: a preallocated .npy file, read and written in place, kept out of the page cache

HEADER_BYTES = 4096  # the .npy header, padded so sample data starts on a (4 KiB) page boundary
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_SYNC_START = 2  # SYNC_FILE_RANGE_WRITE: start writeback of the range's dirty pages, do not wait
_SYNC_WAIT = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER: the range is written back when it returns


def _find_sync_file_range():
    """libc's ``sync_file_range`` (Linux; Python's ``os`` has none), or None: per-range writeback, so a
    written range can be made clean, and then dropped, without ``fdatasync`` of the whole file."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _find_sync_file_range()


def npy_header(np_dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header of HEADER_BYTES (spaces pad it, as the format allows): the file stays a
    plain .npy that ``np.load`` reads, and its data is page-aligned, so advising whole-sample ranges away
    leaves no partial pages behind (when a sample is a whole number of pages)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(np_dtype)), "fortran_order": False,
                 "shape": tuple(shape)}).encode("latin1")
    prefix = np.lib.format.MAGIC_PREFIX + bytes([1, 0])
    room = HEADER_BYTES - len(prefix) - 2
    if len(text) >= room:
        raise ValueError(f"shape {shape} too long for a .npy header")
    return prefix + struct.pack("<H", room) + text.ljust(room - 1) + b"\n"


def _space_error(path: Path, exc: OSError, size: int) -> OutOfSpace:
    return OutOfSpace(
        f"no space left on the device for the activation store file {path} ({fmt_size(size)}; {exc.strerror}); "
        "the store is scratch that a rerun rebuilds. Free space (or use --store-dtype int8, or --offload cpu if RAM "
        "allows) and run the same command again to resume (finished blocks are kept)")


def _io_error(path: Path, exc: OSError, what: str) -> InputError:
    return InputError(f"cannot {what} the activation store file {path} ({exc.strerror or exc})")


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks now (``posix_fallocate``), so a disk too small fails here with ENOSPC: the
    gradient sweep makes every boundary before its forward pass, so that is before any compute rather than
    blocks into it, and a later write cannot find the disk full (except on copy-on-write filesystems; it
    then raises OutOfSpace just the same). Where the filesystem refuses fallocate (EOPNOTSUPP/EINVAL:
    glibc emulates it elsewhere) or Python has none, the file is made sparse at full size with
    ``ftruncate`` instead, and a full disk shows at the write that finds it."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        os.ftruncate(fd, size)
        return
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _NO_SPACE or exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _drop(fd: int, offset: int, length: int) -> None:
    """Advise ``length`` bytes at ``offset`` out of the page cache. Linux drops only clean pages not under
    writeback (and starts writeback of dirty ones): call it on read ranges, or written ranges once written
    back. Partial pages at either end are kept."""
    if hasattr(os, "posix_fadvise") and length > 0:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _no_readahead(fd: int) -> None:
    """``POSIX_FADV_RANDOM``: reads bring in exactly the requested range. With readahead the kernel also
    caches what follows, in large folios that straddle sample boundaries, and ``POSIX_FADV_DONTNEED``
    evicts only folios wholly inside its range: after one sequential pass over a 32 MiB buffer ~10 MiB
    stayed cached (Linux 6.18, ext4). Readahead buys little here: every read is a whole sample (tens of
    KiB to MiBs) in one request, and the compute on each sample dwarfs its read."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def _writeback(fd: int, offset: int, length: int, flags: int) -> None:
    """Write back a range's dirty pages: start it (``_SYNC_START``) or finish it (``_SYNC_WAIT``). Without
    ``sync_file_range`` finishing falls back to ``fdatasync`` (the whole file) and starting is skipped."""
    if _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, offset, length, flags) == 0:
        return
    err = errno.ENOSYS if _SYNC_FILE_RANGE is None else ctypes.get_errno()
    if err != errno.ENOSYS:  # ENOSYS: a kernel without the call (the libc symbol is there, the syscall not)
        raise OSError(err, os.strerror(err))
    if flags == _SYNC_WAIT:
        os.fdatasync(fd)


class DiskArray:
    """One .npy file of ``shape`` rows (axis 0), read and written by byte ranges with positional I/O.

    Why not a memory map: every page a map touches stays mapped and counts in the process's RSS
    (RssFile) until it is unmapped, so a store "on disk" grew RSS by all it wrote and read (0.70 GB on
    SmolLM2 16x512). Here data goes straight between the file and the caller's tensor, and the page
    cache is told to drop what is done with:

    * written ranges are dirty pages, which ``POSIX_FADV_DONTNEED`` cannot drop (it only starts their
      writeback). So writes are written behind: each range's writeback is started when it is written
      (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, no wait) and, at the next write, the previous range is
      waited for (normally done by then) and dropped. At most one written range stays cached.
    * read ranges are clean and dropped right after the read; readahead is off (``_no_readahead``), so
      nothing past them comes in.

    What stays cached: the header page, the last written range until the next write or ``flush``, and
    pages a sample shares with its neighbour when a sample is not a whole number of pages (``fadvise``
    keeps partial pages): a few KiB per sample at most.
    """

    def __init__(self, path: Path, np_dtype, shape: tuple[int, ...]):
        self.path, self.shape = path, tuple(shape)
        self.row_bytes = prod(self.shape[1:]) * np.dtype(np_dtype).itemsize
        header = npy_header(np_dtype, self.shape)
        self.offset, size = len(header), len(header) + self.shape[0] * self.row_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise (_space_error(path, exc, size) if exc.errno in _NO_SPACE else _io_error(path, exc, "create")) \
                from exc
        self._fd, self._pending = fd, None
        self._close = weakref.finalize(self, os.close, fd)  # a buffer dropped without release() closes too
        try:
            _no_readahead(fd)
            _preallocate(fd, size)
            _pwrite_all(fd, memoryview(header), 0)
        except OSError as exc:
            self.remove()
            raise (_space_error(path, exc, size) if exc.errno in _NO_SPACE else _io_error(path, exc, "create")) \
                from exc

    def _span(self, row: int, count: int) -> tuple[int, int]:
        """(file offset, bytes) of rows row..row+count; IndexError outside the array."""
        if row < 0 or count < 0 or row + count > self.shape[0]:
            raise IndexError(f"rows {row}..{row + count} of {self.shape[0]} in {self.path}")
        return self.offset + row * self.row_bytes, count * self.row_bytes

    def read(self, row: int, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, a whole number of rows) from rows row.. of the file."""
        view = _bytes_of(out)
        offset, length = self._span(row, len(view) // self.row_bytes)
        done = 0
        try:
            while done < length:
                k = os.preadv(self._fd, [view[done:]], offset + done)
                if k == 0:
                    raise OSError(errno.EIO, f"the file ends at byte {offset + done}, expected {offset + length}")
                done += k
        except OSError as exc:
            raise _io_error(self.path, exc, "read") from exc
        _drop(self._fd, offset, length)

    def write(self, row: int, value: torch.Tensor) -> None:
        """Write ``value`` (contiguous, a whole number of rows) as rows row.. of the file."""
        view = _bytes_of(value)
        offset, length = self._span(row, len(view) // self.row_bytes)
        if length == 0:
            return
        try:
            _pwrite_all(self._fd, view, offset)
            self._write_behind(offset, length)
        except OSError as exc:
            raise self._write_error(exc) from exc

    def _write_behind(self, offset: int, length: int) -> None:
        """Start writeback of the range just written; finish the previous one and drop it (see the class)."""
        _writeback(self._fd, offset, length, _SYNC_START)
        if self._pending is not None and self._pending != (offset, length):
            self._settle()
        self._pending = (offset, length)

    def _settle(self) -> None:
        """The pending written range waited for (clean) and dropped from the page cache."""
        if self._pending is not None:
            offset, length = self._pending
            self._pending = None
            _writeback(self._fd, offset, length, _SYNC_WAIT)
            _drop(self._fd, offset, length)

    def _write_error(self, exc: OSError) -> Exception:
        return _space_error(self.path, exc, self.offset + self.shape[0] * self.row_bytes) \
            if exc.errno in _NO_SPACE else _io_error(self.path, exc, "write")

    def flush(self) -> None:
        """Everything written is on disk (``fdatasync``, as the memory map's msync was) and out of the cache."""
        try:
            self._settle()
            os.fdatasync(self._fd)
        except OSError as exc:
            raise self._write_error(exc) from exc

    def remove(self) -> None:
        """Close the file and delete it (its page cache goes with it)."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """All of ``view`` at ``offset`` (``pwrite`` may write less than asked, e.g. past 2 GiB on Linux)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (any dtype, bf16 included), shared, as a flat memoryview."""
    if not t.is_contiguous():
        raise ValueError("a contiguous tensor is needed")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


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
