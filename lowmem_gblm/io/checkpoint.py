"""A lazy view of a safetensors checkpoint: tensor name -> shard, read only what is asked for.

Callers never see the shard layout. Each read opens the shard, reads the requested tensors' bytes
straight into fresh tensors (no memory map) and closes it again, so only the tensors asked for are
resident.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_gblm.errors import InputError
from lowmem_gblm.runtime import BY_SAFETENSORS, dtype_bytes

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPE_BYTES = {code: dtype_bytes(dt) for code, dt in BY_SAFETENSORS.items()}
_MAX_HEADER = 100 * 1024 * 1024


class ShardChanged(InputError):
    """A finished output shard whose bytes are not the ones its run recorded."""


@dataclass(frozen=True)
class TensorInfo:
    shard: str
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict:
    """Parse a safetensors header and check it against the file size before any tensor is read."""
    return _parse_header(path)[0]


def _parse_header(path: Path) -> tuple[dict, int]:
    """(validated header, offset of the data section).

    Checked as the safetensors library checks before it reads a byte of data: the header is a JSON
    object of tensor entries (and an optional ``__metadata__`` object of strings); each entry has a
    known dtype, a shape of non-negative integers and two integer offsets; sorted by offset the tensors
    tile the data section exactly (no gap, no overlap, nothing past the end, nothing left over), and
    each one's byte length is its dtype's width times its element count.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: truncated safetensors file ({size} bytes); re-download or re-export it")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(f"{path}: broken safetensors header (claims {n} bytes, file has {size})")
            blob = f.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: broken safetensors header ({exc}); re-download the shard") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: broken safetensors header (a JSON {type(header).__name__}, not an object); "
                         "re-download the shard")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise InputError(f"{path}: broken safetensors header (__metadata__ must map names to strings)")
            continue
        spans.append((*_entry_span(path, name, info), name))
    data = size - 8 - n
    end, last = 0, None
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise InputError(f"{path}: broken safetensors header: tensor {name!r} (bytes {begin}..{stop}) "
                             f"overlaps tensor {last!r} (ends at {end}); re-download the shard")
        if begin > end:
            raise InputError(f"{path}: broken safetensors header: {begin - end} unaccounted byte(s) before "
                             f"tensor {name!r}; re-download the shard")
        end, last = stop, name
    if end > data:
        raise InputError(
            f"{path}: truncated: tensor {last!r} needs bytes up to {8 + n + end}, file has {size}; "
            "re-download the shard"
        )
    if end < data:
        raise InputError(f"{path}: broken safetensors file: {data - end} byte(s) after the last tensor "
                         f"({last!r}) belong to no tensor; re-download the shard")
    return header, 8 + n


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_span(path: Path, name: str, info) -> tuple[int, int]:
    """(begin, end) byte offsets of one header entry, after checking its dtype, shape and size."""
    def bad(why: str) -> InputError:
        return InputError(f"{path}: tensor {name!r} has a malformed header entry ({why}); re-download the shard")

    if not isinstance(info, dict):
        raise bad(f"a JSON {type(info).__name__}, not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str):
        raise bad(f"dtype {code!r}")
    width = _DTYPE_BYTES.get(code)
    if width is None:
        raise InputError(f"{path}: tensor {name!r} has dtype {code!r}, which lowmem-gblm does not read "
                         f"(it reads {', '.join(sorted(_DTYPE_BYTES))})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r}: a list of non-negative integers is needed")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r}: two integers 0 <= begin <= end are needed")
    count = 1
    for d in shape:
        count *= d
    if offsets[1] - offsets[0] != count * width:
        raise InputError(f"{path}: tensor {name!r} header size does not match its shape {shape} "
                         f"({offsets[1] - offsets[0]} bytes for {count} x {code})")
    return offsets[0], offsets[1]


ROW_CHUNK = 4096  # rows per read when reading part of a matrix (read_rows)
FINITE_CHUNK = 1 << 24  # elements per finiteness check (its bool mask stays small)


def read_tensors(path: Path, names: list[str], sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The one read path: read ``names`` out of one safetensors file and check they are finite.

    Plain reads straight into freshly allocated tensors: no memory map, so nothing but the tensors
    themselves becomes resident (a mapped file's pages count in RSS while the copy is made).
    With ``sha256`` the whole file is read front to back (the header's offsets tile it exactly) and hashed
    on the way; a different digest raises :class:`ShardChanged` before any tensor is returned.
    """
    header, data = _parse_header(path)
    out = {}
    with open(path, "rb") as f:
        if sha256 is None:
            for name in names:
                info = _info(path, header, name)
                t = torch.empty(info["shape"], dtype=_dtype(path, name, info))
                _read_into(f, path, name, t, data + info["data_offsets"][0])
                out[name] = t
        else:
            for name in names:
                _info(path, header, name)
            h = hashlib.sha256(f.read(data))
            order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
            for name in order:
                info = header[name]
                t = torch.empty(info["shape"], dtype=_dtype(path, name, info))
                _read_into(f, path, name, t, data + info["data_offsets"][0])
                h.update(memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else b"")
                if name in names:
                    out[name] = t
            if h.hexdigest() != sha256:
                raise ShardChanged(f"{path} changed since this run wrote it (its sha256 differs from the manifest)")
    for name, t in out.items():
        _check_finite(path, name, t)
    return {name: out[name] for name in names}


def read_rows(path: Path, name: str, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` (sorted, unique int64) of a 2-d tensor in one safetensors file, [len(rows), ...].

    Read ROW_CHUNK consecutive rows at a time, so memory holds the result and one chunk, never the
    whole tensor (an embedding table is [vocab, D]); the rows read get read_tensors' finiteness check.
    """
    header, data = _parse_header(path)
    info = _info(path, header, name)
    shape, dtype = info["shape"], _dtype(path, name, info)
    if len(shape) != 2:
        raise InputError(f"{path}: tensor {name!r} has shape {shape}; rows of a matrix were asked for")
    nrows, width = shape
    if len(rows) and (int(rows[0]) < 0 or int(rows[-1]) >= nrows):
        raise InputError(f"{path}: tensor {name!r} has {nrows} rows; row {int(rows[-1])} was asked for")
    row_bytes = width * _DTYPE_BYTES[info["dtype"]]
    out = torch.empty(len(rows), width, dtype=dtype)
    with open(path, "rb") as f:
        for start in range(0, nrows, ROW_CHUNK):
            lo, hi = torch.searchsorted(rows, torch.tensor([start, start + ROW_CHUNK])).tolist()
            if lo == hi:
                continue
            first, last = int(rows[lo]), int(rows[hi - 1])
            chunk = torch.empty(last - first + 1, width, dtype=dtype)
            _read_into(f, path, name, chunk, data + info["data_offsets"][0] + first * row_bytes)
            out[lo:hi] = chunk[rows[lo:hi] - first]
            del chunk
    _check_finite(path, name, out)
    return out


def _info(path: Path, header: dict, name: str) -> dict:
    info = header.get(name)
    if name == "__metadata__" or info is None:
        raise InputError(f"{path}: cannot read tensor {name!r}: it is not in this file; re-download the shard")
    return info


def _dtype(path: Path, name: str, info: dict) -> torch.dtype:
    dtype = BY_SAFETENSORS.get(info.get("dtype"))
    if dtype is None:
        raise InputError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    return dtype


def _read_into(f, path: Path, name: str, t: torch.Tensor, offset: int) -> None:
    """Fill contiguous ``t`` with its bytes from ``offset`` (safetensors data is little-endian, as is every
    machine torch runs on here; a big-endian host is refused rather than read wrong)."""
    if sys.byteorder != "little":
        raise InputError("lowmem-gblm reads safetensors on little-endian machines only")
    if t.numel() == 0:
        return
    view = memoryview(t.view(-1).view(torch.uint8).numpy())
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise InputError(f"{path}: cannot read tensor {name!r}: the file ends early; re-download the shard")
        done += got


def _check_finite(path: Path, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        return
    flat = t.view(-1)
    if not all(bool(torch.isfinite(c).all()) for c in flat.split(FINITE_CHUNK)):
        bad = sum(int((~torch.isfinite(c)).sum()) for c in flat.split(FINITE_CHUNK))
        raise InputError(
            f"{path}: tensor {name!r} holds {bad} NaN/Inf value(s); the checkpoint is damaged or "
            "was saved after a diverged run; re-download or re-export it"
        )


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index file (tensor name -> shard file name), validated."""
    try:
        doc = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{index}: not a valid safetensors index ({exc})") from exc
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: not a valid safetensors index (needs a JSON object with a 'weight_map' object "
                         "of tensor name -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\0" in shard:
            raise InputError(f"{index}: weight_map gives tensor {name!r} the shard {shard!r}; a file name is needed")
    return weight_map


def _is_file(path: Path) -> bool:
    """``path.is_file()``, but a name the OS refuses (too long, a loop) is an input error, not a crash."""
    try:
        return path.is_file()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def side_files(model_dir: Path) -> list[str]:
    """The model folder's files an output folder gets a copy of: config, generation config, tokenizer and
    every other non-weight file."""
    return [src.name for src in sorted(Path(model_dir).iterdir())
            if _is_file(src) and src.name != INDEX_NAME and not src.name.endswith(WEIGHT_SUFFIXES)]


def hf_cache_repo(folder: Path) -> Path | None:
    """``.../models--ORG--NAME`` when resolved ``folder`` is a Hugging Face cache snapshot in it, else None."""
    snapshots = folder.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--")):
        return repo
    return None


class CheckpointIndex:
    """name -> TensorInfo for a local checkpoint folder (single file or sharded with an index)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.root = Path(model_dir)
        if not self.root.is_dir():
            raise InputError(f"MODEL_DIR {self.root} is not a folder; pass a local Hugging Face checkpoint folder")
        if not _is_file(self.root / "config.json"):
            raise InputError(f"MODEL_DIR {self.root} has no config.json; it is not a Hugging Face checkpoint")
        self.shards = self._find_shards()
        self.tensors: dict[str, TensorInfo] = {}
        self.headers: dict[str, dict] = {}
        for shard in self.shards:
            header = read_header(self.root / shard)
            self.headers[shard] = header
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise InputError(f"{self.root}: tensor {name!r} is stored twice, in {self.tensors[name].shard} "
                                     f"and in {shard}; re-download the checkpoint")
                self.tensors[name] = TensorInfo(shard, info["dtype"], tuple(info["shape"]))
        for name in side_files(self.root):  # copied into OUT_DIR: refused where a shard would be
            self._inside(name, f"{self.root}: side file")
        if self.weight_map is not None:
            for name, shard in self.weight_map.items():
                if name not in self.tensors or self.tensors[name].shard != shard:
                    raise InputError(f"{self.root / INDEX_NAME} names {name!r} in {shard}, but that shard does not "
                                     "hold it; re-download the checkpoint")

    def _find_shards(self) -> list[str]:
        self.weight_map = None
        index = self.root / INDEX_NAME
        if _is_file(index):
            self.weight_map = read_weight_map(index)
            shards = sorted(set(self.weight_map.values()))
            if _is_file(self.root / SINGLE_NAME) and shards != [SINGLE_NAME]:
                raise InputError(f"MODEL_DIR {self.root} holds both {SINGLE_NAME} and {INDEX_NAME} (naming "
                                 f"{len(shards)} other shard(s)): from_pretrained loads {SINGLE_NAME}, so which "
                                 "weights are the model is ambiguous; move one of them aside")
            for shard in shards:
                path = self._inside(shard, f"{index}: shard path")
                if not _is_file(path):
                    first = next(k for k, v in self.weight_map.items() if v == shard)
                    raise InputError(f"{index} names shard {shard} (holding {first!r}, ...), which is missing; "
                                     "re-download the checkpoint")
            return shards
        if _is_file(self.root / SINGLE_NAME):
            self._inside(SINGLE_NAME, f"{self.root}:")
            return [SINGLE_NAME]
        if any(self.root.glob("*.bin")) or any(self.root.glob("*.pt")) or any(self.root.glob("*.pth")):
            raise InputError(
                f"MODEL_DIR {self.root} holds only pickle checkpoints (.bin/.pt); lowmem-gblm reads safetensors only. "
                "Convert it once: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)"
            )
        raise InputError(f"MODEL_DIR {self.root} has no model.safetensors or {INDEX_NAME}")

    def _inside(self, shard: str, where: str) -> Path:
        """The resolved path of ``shard``, refused unless it names a file inside the model folder.

        Symlinks may point elsewhere inside the model folder, or, when the folder is a Hugging Face cache
        snapshot (``models--ORG--NAME/snapshots/REV``), into that repository's ``blobs`` folder, where the
        cache keeps the bytes; anything else is refused.
        """
        if Path(shard).is_absolute() or any(part in ("..", ".") for part in Path(shard).parts):
            raise InputError(f"{where} {shard!r} points outside the model folder; refusing")
        try:
            root, path = self.root.resolve(), (self.root / shard).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise InputError(f"{where} {shard!r}: cannot follow it ({exc})") from exc
        allowed = [root]
        repo = hf_cache_repo(root)
        if repo is not None:
            allowed.append(repo / "blobs")
        if not any(a in path.parents for a in allowed):
            raise InputError(f"{where} {shard!r} points outside the model folder; refusing")
        return path

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read tensors (their stored dtype, CPU), opening each needed shard once."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self.tensors:
                raise InputError(f"tensor {name!r} is missing from the checkpoint in {self.root}")
            by_shard.setdefault(self.tensors[name].shard, []).append(name)
        out = {}
        for shard, shard_names in by_shard.items():
            out.update(read_tensors(self.root / shard, shard_names))
        return out

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of the 2-d tensor ``name``; see :func:`read_rows`."""
        if name not in self.tensors:
            raise InputError(f"tensor {name!r} is missing from the checkpoint in {self.root}")
        return read_rows(self.root / self.tensors[name].shard, name, rows)

    def nbytes(self, names: Iterable[str]) -> int:
        total = 0
        for name in names:
            info = self.tensors[name]
            count = 1
            for d in info.shape:
                count *= d
            total += count * _DTYPE_BYTES.get(info.dtype, 4)
        return total

    def fingerprint(self) -> dict[str, str]:
        """Identity of the input model, per shard (so a resume mismatch names the changed file):
        size, modification time and header. A content change that keeps all three is not seen."""
        out = {}
        for shard in self.shards:
            st = (self.root / shard).stat()
            h = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|".encode())
            h.update(json.dumps(self.headers[shard], sort_keys=True).encode())
            out[shard] = h.hexdigest()[:16]
        return out


class ShardFile:
    """A single finished safetensors file read like a checkpoint (used to replay finished blocks).

    With ``sha256`` (the digest its run recorded) every read checks the file is still those bytes.
    """

    def __init__(self, path: str | os.PathLike, sha256: str | None = None):
        self.path = Path(path)
        self.sha256 = sha256
        try:
            self.header = read_header(self.path)
        except InputError as exc:
            raise ShardChanged(str(exc)) from exc

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self.header]
        if missing:
            raise ShardChanged(f"{self.path}: tensor {missing[0]!r} is missing")
        return read_tensors(self.path, names, self.sha256)
