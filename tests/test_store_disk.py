"""The disk store without memory maps (issue 18): exact round trips against the RAM store, RSS and page
cache left alone, a full disk as OutOfSpace, and the tracker's RSS parts."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm.errors import InputError, OutOfSpace
from lowmem_gblm.memory.tracker import RSS_PARTS, PhaseTracker, rss_parts
from lowmem_gblm.stream import diskarray
from lowmem_gblm.stream.diskarray import HEADER_BYTES
from lowmem_gblm.stream.store import ActivationBuffer, ActivationStore, Int8Buffer
from tests.faults import cli_args, diff_trees

runner = CliRunner()
MIB = 1 << 20
PAGE = mmap.PAGESIZE


def _data(shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])).to(dtype)


def _fill(buf, x: torch.Tensor) -> None:
    """Out of order, several samples per put: 3..5, 0, 1..2 (and N-1 alone when there are more)."""
    n = x.shape[0]
    buf.put(3, x[3:6])
    buf.put(0, x[0:1])
    buf.put(1, x[1:3])
    for k in range(6, n):
        buf.put(k, x[k:k + 1])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_round_trip_matches_ram(tmp_path, dtype):
    x = _data((7, 9, 33), dtype)
    ram = ActivationStore("cpu").new(tuple(x.shape), dtype, "h")
    disk = ActivationStore("disk", tmp_path).new(tuple(x.shape), dtype, "h")
    for buf in (ram, disk):
        _fill(buf, x)
    assert _same_bits(disk.get(0, 7), x) and _same_bits(ram.get(0, 7), x)
    for n, count in [(5, 2), (0, 3), (6, 1), (2, 4)]:  # out of order, count > 1
        assert _same_bits(disk.get(n, count), x[n:n + count])
    got = disk.get(1)
    got.zero_()  # a fresh tensor: changing it changes nothing stored
    assert _same_bits(disk.get(1), x[1:2])
    disk.put(4, x[0:1])  # overwrite in place
    assert _same_bits(disk.get(4), x[0:1]) and _same_bits(disk.get(3, 3)[[0, 2]], x[[3, 5]])
    assert disk.nbytes == ram.nbytes == x.numel() * x.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_file_is_a_plain_npy(tmp_path, dtype):
    """One .npy per buffer (bf16 as its uint16 bits), data after a page-sized header; released: gone."""
    x = _data((3, 4, 8), dtype, seed=1)
    buf = ActivationStore("disk", tmp_path).new(tuple(x.shape), dtype, "h")
    buf.put(0, x)
    buf.flush()
    assert buf.path == tmp_path / "h.npy" and buf.path.stat().st_size == HEADER_BYTES + buf.nbytes
    arr = np.load(buf.path)
    assert arr.shape == tuple(x.shape)
    assert _same_bits(torch.from_numpy(arr).view(dtype), x)
    buf.release()
    buf.release()  # twice is harmless
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_disk_matches_ram_bit_for_bit(tmp_path, dtype):
    x = _data((6, 19, 37), dtype, seed=3)  # 703 values a sample: a partial last block
    ram = ActivationStore("cpu", None, "int8").new(tuple(x.shape), dtype, "h")
    disk = ActivationStore("disk", tmp_path, "int8").new(tuple(x.shape), dtype, "h")
    assert isinstance(disk, Int8Buffer)
    for buf in (ram, disk):
        _fill(buf, x)
    assert _same_bits(disk.get(0, 6), ram.get(0, 6))
    for n, count in [(4, 2), (1, 3), (0, 1)]:
        assert _same_bits(disk.get(n, count), ram.get(n, count))
    disk.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.absmax.npy", "h.npy"]
    disk.release()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("store_dtype", ["auto", "int8"])
def test_without_sync_file_range(tmp_path, monkeypatch, store_dtype):
    """Where libc has no sync_file_range, written ranges are made clean with fdatasync: same bytes."""
    monkeypatch.setattr(diskarray, "_SYNC_FILE_RANGE", None)
    x = _data((6, 5, 16), torch.bfloat16, seed=4)
    ram = ActivationStore("cpu", None, store_dtype).new(tuple(x.shape), torch.bfloat16, "h")
    disk = ActivationStore("disk", tmp_path, store_dtype).new(tuple(x.shape), torch.bfloat16, "h")
    for buf in (ram, disk):
        _fill(buf, x)
    disk.flush()
    assert _same_bits(disk.get(0, 6), ram.get(0, 6))


def test_bad_ranges_and_shapes_are_refused(tmp_path):
    buf = ActivationStore("disk", tmp_path).new((2, 3, 4), torch.float32, "h")
    with pytest.raises(IndexError):
        buf.get(1, 2)
    with pytest.raises(IndexError):
        buf.put(2, torch.zeros(1, 3, 4))
    with pytest.raises(ValueError):
        buf.put(0, torch.zeros(1, 4, 3))


# ---------------------------------------------------------------------------------------------
# memory: nothing of the store stays mapped (RSS) or cached


def _rss_file() -> int:
    return rss_parts()["RssFile"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("store_dtype", ["auto", "int8"])
def test_disk_store_does_not_grow_rss_file(tmp_path, store_dtype):
    """64 MiB written and read back a sample at a time: RssFile, read after every call (no sampling thread,
    so no timing), never grows by a quarter of it. A memory map grew by all of it and kept it."""
    n, t, d = 64, 256, 1024  # 1 MiB fp32 samples
    store = ActivationStore("disk", tmp_path, store_dtype)
    warm = store.new((2, t, d), torch.float32, "warm")  # lazy imports and first-call code paths, before the baseline
    warm.put(0, torch.ones(2, t, d))
    warm.get(0, 2)
    warm.release()
    buf = store.new((n, t, d), torch.float32, "h")
    base, grown, sums = _rss_file(), 0, []
    for k in range(n):
        sample = torch.full((1, t, d), float(k))
        buf.put(k, sample)
        grown = max(grown, _rss_file() - base)
    for k in range(n):
        sums.append(float(buf.get(k).mean()))
        grown = max(grown, _rss_file() - base)
    assert sums == pytest.approx([float(k) for k in range(n)], rel=0.02)
    assert grown < (n * t * d * 4) // 4, f"RssFile grew by {grown / MIB:.1f} MiB"
    buf.release()


def _cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore on a private, untouched mapping: it faults nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        anchor = ctypes.c_char.from_buffer(m)
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
        del anchor
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec) * PAGE


def _drops_clean_pages(folder: Path) -> bool:
    """Whether this filesystem lets fadvise drop a written-back file's pages (tmpfs cannot: they are the file)."""
    probe = folder / "probe"
    with open(probe, "wb") as f:
        f.write(b"\1" * (4 * MIB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cached = _cached_bytes(probe)
    probe.unlink()
    return cached < MIB


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_disk_store_leaves_the_page_cache(tmp_path):
    """Written ranges are written back and dropped, read ranges dropped: at most one written range and the
    kernel's readahead window stay cached, not the buffer."""
    if not _drops_clean_pages(tmp_path):
        pytest.skip("this filesystem keeps pages cached whatever fadvise says")
    n, t, d = 32, 256, 1024
    buf = ActivationStore("disk", tmp_path).new((n, t, d), torch.float32, "h")
    for k in range(n):
        buf.put(k, torch.full((1, t, d), float(k)))
    after_write = _cached_bytes(buf.path)
    for k in range(n):
        buf.get(k)
    after_read = _cached_bytes(buf.path)
    buf.flush()
    after_flush = _cached_bytes(buf.path)
    assert after_write < buf.nbytes // 4 and after_read < buf.nbytes // 4, (after_write, after_read)
    assert after_flush < buf.nbytes // 4
    buf.release()


# ---------------------------------------------------------------------------------------------
# a full disk


def _enospc_after(monkeypatch, calls: int, err: int = errno.ENOSPC) -> None:
    """os.pwrite fails with ``err`` from its ``calls``-th call on (earlier calls write)."""
    real, seen = os.pwrite, [0]

    def pwrite(fd, data, offset):
        seen[0] += 1
        if seen[0] >= calls:
            raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("store_dtype", ["auto", "int8"])
def test_full_disk_on_put_is_out_of_space(tmp_path, monkeypatch, err, store_dtype):
    buf = ActivationStore("disk", tmp_path, store_dtype).new((3, 4, 8), torch.float32, "h")
    buf.put(0, torch.ones(1, 4, 8))
    _enospc_after(monkeypatch, 1, err)
    with pytest.raises(OutOfSpace, match="no space left on the device for the activation store file .*h"):
        buf.put(1, torch.ones(1, 4, 8))
    monkeypatch.undo()
    buf.release()
    assert not list(tmp_path.iterdir())


def test_other_write_errors_are_input_errors(tmp_path, monkeypatch):
    buf = ActivationStore("disk", tmp_path).new((3, 4, 8), torch.float32, "h")
    _enospc_after(monkeypatch, 1, errno.EIO)
    with pytest.raises(InputError, match="cannot write the activation store file") as info:
        buf.put(1, torch.ones(1, 4, 8))
    assert not isinstance(info.value, OutOfSpace)


@pytest.mark.parametrize("store_dtype", ["auto", "int8"])
def test_full_disk_at_creation_is_out_of_space_and_leaves_no_file(tmp_path, monkeypatch, store_dtype):
    """The file is preallocated: a disk without room for a whole buffer fails when it is made."""
    calls = [0]

    def fallocate(fd, offset, length):
        calls[0] += 1
        if calls[0] == 2 or store_dtype == "auto":  # int8: the codes fit, the absmax file does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(OutOfSpace, match="no space left"):
        ActivationStore("disk", tmp_path, store_dtype).new((3, 4, 8), torch.float32, "h")
    assert not list(tmp_path.iterdir())


def test_filesystem_without_fallocate_gets_a_full_size_file(tmp_path, monkeypatch):
    def fallocate(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    buf = ActivationBuffer((3, 4, 8), torch.float16, tmp_path / "h.npy")
    assert buf.path.stat().st_size == HEADER_BYTES + buf.nbytes
    x = _data((3, 4, 8), torch.float16)
    buf.put(0, x)
    assert _same_bits(buf.get(0, 3), x)


def test_cli_disk_full_in_the_store_exits_2_then_resumes(tiny_model, calib_text, pruned, tmp_path, monkeypatch):
    """A store write that finds the disk full mid-sweep: exit 2 with the line, the store removed, and the
    rerun finishes with the same output as a RAM-store run."""
    out = tmp_path / "out"
    _enospc_after(monkeypatch, 9)  # 2 headers, 4 embedded windows, 2 of block 0's outputs, then a full disk
    result = runner.invoke(app, cli_args(tiny_model, out, calib_text, offload="disk"))
    assert result.exit_code == 2 and "no space left on the device for the activation store" in result.stderr, \
        result.output
    assert [p for p in out.rglob("*.npy")] == []
    monkeypatch.undo()
    result = runner.invoke(app, cli_args(tiny_model, out, calib_text, offload="disk"))
    assert result.exit_code == 0, result.output
    assert diff_trees(out, pruned) == []


# ---------------------------------------------------------------------------------------------
# the tracker


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_tracker_reports_rss_parts(tmp_path):
    mapped = tmp_path / "mapped"
    mapped.write_bytes(b"\1" * (32 * MIB))
    with open(mapped, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        with PhaseTracker("probe", torch.device("cpu")) as tracker:
            base = rss_parts()  # after the tracker's own heap trim
            anon = torch.ones(16 * MIB // 4)  # 16 MiB, written: resident
            assert sum(m[i] for i in range(0, len(m), PAGE)) == len(m) // PAGE  # every page read: resident
        # the tracker's exit took its last sample with both still alive: no timing involved
        del anon
    assert set(base) == set(RSS_PARTS) and base["RssAnon"] > 0 and base["RssFile"] > 0
    stats = tracker.stats.to_dict()
    for key in ("peak_rss_bytes", "peak_rss_anon_bytes", "peak_rss_file_bytes", "peak_rss_shmem_bytes",
                "device_peak_allocated_bytes", "bytes_read", "bytes_written", "seconds"):
        assert key in stats
    assert stats["peak_rss_file_bytes"] >= base["RssFile"] + 30 * MIB
    assert stats["peak_rss_anon_bytes"] >= base["RssAnon"] + 15 * MIB
    assert stats["peak_rss_bytes"] >= base["RssAnon"] + base["RssFile"] + 45 * MIB
