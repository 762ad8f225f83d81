"""Durable bytes: atomic file writes, deterministic safetensors bytes, the shard names.

Every file is written to a temporary name in the same folder, fsynced, renamed over its final
name, and the folder fsynced, so after a crash a file is either whole under its name or absent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from lowmem_gblm.errors import InputError, OutOfSpace
from lowmem_gblm.io.checkpoint import side_files
from lowmem_gblm.testing_hooks import crash_point


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TMP_MARK = ".tmp-"  # temporary files: .NAME.tmp-PID beside NAME


def atomic_write_bytes(path: Path, data: bytes, point: str = "write") -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, rename over ``path``, fsync the folder.

    On any OSError the temporary file is removed, so a failed write leaves ``path`` as it was.
    ``point`` names the fault-injection point (see testing_hooks) reached half-way through the write.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            crash_point(point)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(
                f"no space left on the device while writing {path} ({exc.strerror}); nothing half-written was "
                "kept. Free space and run the same command again to resume (finished blocks are kept)"
            ) from exc
        raise InputError(f"cannot write {path} ({exc.strerror or exc}); nothing half-written was kept") from exc


def atomic_write_text(path: Path, text: str, point: str = "write") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), point)


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes (sorted names, metadata {"format": "pt"})."""
    ordered = {k: tensors[k].contiguous() for k in sorted(tensors)}
    return safetensors_save(ordered, metadata={"format": "pt"})


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors atomically; return the sha256 of the bytes written."""
    data = tensors_bytes(tensors)
    atomic_write_bytes(path, data, point="shard_write")
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_name(k: int, total: int) -> str:
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


_SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def shard_total(name: str) -> int | None:
    """The total a ``shard_name`` carries (``model-00002-of-00031.safetensors`` -> 31); None for other names."""
    match = _SHARD_NAME.fullmatch(name)
    return int(match.group(2)) if match else None


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy ``side_files(model_dir)`` into ``out_dir``; return their names."""
    names = side_files(model_dir)
    for name in names:
        atomic_write_bytes(out_dir / name, (Path(model_dir) / name).read_bytes())
    return names


