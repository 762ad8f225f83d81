"""Durable output: atomic file writes, the per-block shard layout, and the resume manifest.

Every file is written to a temporary name in the same folder, fsynced, renamed over its final
name, and the folder fsynced. The manifest lists a block as done only after its shard is durable,
so after a crash a block is either complete on disk and listed, or redone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from lowmem_gblm.errors import InputError, OutOfSpace
from lowmem_gblm.testing_hooks import crash_point

STATE_DIR = ".lowmem"  # inside OUT_DIR: manifest, lock, temporary stores
MANIFEST = "manifest.json"
INDEX_NAME = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TMP_MARK = ".tmp-"


def atomic_write_bytes(path: Path, data: bytes, point: str = "write") -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, rename over ``path``, fsync the folder.

    On any OSError the temporary file is removed, so a failed write leaves ``path`` as it was.
    ``point`` names the fault-injection point (see testing_hooks) reached half-way through the write.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
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
        raise


def remove_stale_temps(out_dir: Path) -> list[str]:
    """Delete temporary files a killed run left in OUT_DIR and its state folder (call under the lock)."""
    removed = []
    for folder in (out_dir, out_dir / STATE_DIR):
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            stale = _TMP_MARK in child.name or child.name.startswith(".write-probe-")
            if child.is_file() and child.name.startswith(".") and stale:
                child.unlink()
                removed.append(child.name)
    return removed


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


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy config, generation config, tokenizer and every other non-weight file."""
    copied = []
    for src in sorted(model_dir.iterdir()):
        if not src.is_file() or src.name == INDEX_NAME or src.name.endswith(_WEIGHT_SUFFIXES):
            continue
        atomic_write_bytes(out_dir / src.name, src.read_bytes())
        copied.append(src.name)
    return copied


class OutputLock:
    """An exclusive flock on OUT_DIR/.lowmem/lock: a second run refuses; a dead run leaves no stale lock."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / STATE_DIR / "lock"
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise InputError(
                f"another lowmem-gblm run (pid {holder or '?'}) is writing {self.path.parent.parent}; "
                "wait for it or pick another OUT_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Manifest:
    """OUT_DIR/.lowmem/manifest.json: what run this is and which shards are durable (with sha256)."""

    def __init__(self, out_dir: Path, data: dict):
        self.out_dir = out_dir
        self.data = data

    @property
    def path(self) -> Path:
        return self.out_dir / STATE_DIR / MANIFEST

    @classmethod
    def load(cls, out_dir: Path) -> Manifest | None:
        path = out_dir / STATE_DIR / MANIFEST
        if not path.is_file():
            return None
        try:
            return cls(out_dir, json.loads(path.read_text()))
        except json.JSONDecodeError:
            return None  # a manifest is only ever replaced atomically; unreadable means foreign

    @classmethod
    def new(cls, out_dir: Path, identity: dict) -> Manifest:
        m = cls(out_dir, {"identity": identity, "done": {}, "complete": False})
        m.save()
        return m

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, sort_keys=True, indent=1), point="manifest_write")

    def is_done(self, key: str) -> bool:
        entry = self.data["done"].get(key)
        if entry is None:
            return False
        path = self.out_dir / entry["file"]
        return path.is_file() and path.stat().st_size == entry["size"]

    def mark_done(self, key: str, file: str, sha256: str, extra: dict | None = None) -> None:
        size = (self.out_dir / file).stat().st_size
        self.data["done"][key] = {"file": file, "sha256": sha256, "size": size, **(extra or {})}
        self.save()

    def entry(self, key: str) -> dict:
        return self.data["done"][key]


def prepare_out_dir(out_dir: Path, model_dir: Path, overwrite: bool) -> None:
    """Validate OUT_DIR (not the model folder, not inside it, writable) and clear it on --overwrite."""
    out_r, model_r = out_dir.resolve(), model_dir.resolve()
    if out_r == model_r or model_r in out_r.parents:
        raise InputError(f"OUT_DIR {out_dir} is MODEL_DIR or inside it; choose a folder outside {model_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"OUT_DIR {out_dir} exists and is not a folder")
    if overwrite and out_dir.exists():
        for child in out_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"OUT_DIR {out_dir} is not writable ({exc.strerror}); choose a writable folder") from exc
