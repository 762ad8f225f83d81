"""A disk buffer's file: a preallocated ``.npy`` file of [N, ...] samples, read and written in place with
positional I/O (``os.pwrite`` / ``os.preadv``) and advised out of the page cache once written back or read, so
nothing of it stays in the process's RSS or in the page cache between calls. The activation store
(``stream.store``) keeps a disk boundary in one of these (int8: two)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import weakref
from pathlib import Path

import numpy as np
import torch

from lowmem_gblm.errors import InputError, OutOfSpace
from lowmem_gblm.units import fmt_size, prod

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
