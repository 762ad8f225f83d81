"""A gradient folder: GBLM's per-block gradient norms, resumable like any run folder.

``block_{i:05d}.safetensors`` holds block i's finished G tensors keyed by the checkpoint's weight
names; ``gradients.json`` is the folder's run state (identity, done blocks with file sha256 and each
tensor's sha256, complete flag). Reading checks each tensor against its recorded sha256 as it is read,
so the files are read once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from lowmem_gblm.errors import InputError
from lowmem_gblm.io.checkpoint import read_header, read_tensors
from lowmem_gblm.io.runstate import GRADIENTS_JSON, RunState
from lowmem_gblm.io.writer import save_tensors_atomic


def block_file(i: int) -> str:
    return f"block_{i:05d}.safetensors"


INPUT_NORMS_FILE = "input_sq.safetensors"  # the dense forward's sum_n sum_t x^2 of every linear's input
INPUT_NORMS_KEY = "input_sq"  # its entry in gradients.json: file, sha256, size


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a CPU tensor's bytes (any dtype)."""
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _changed(folder: Path, file: str) -> InputError:
    return InputError(f"gradient folder {folder}: {file} is missing or changed since it was written; "
                      "compute the gradients again")


class GradientFolder(RunState):
    """The run state of a gradient folder, keyed by block index."""

    @classmethod
    def load_folder(cls, path: Path) -> GradientFolder | None:
        state = RunState.load(path, GRADIENTS_JSON)
        return None if state is None else cls(path, GRADIENTS_JSON, state.data)

    def block_done(self, i: int) -> bool:
        return self.is_done(str(i))

    def mark_block(self, i: int, sha256: str, tensors: dict[str, str]) -> None:
        """Record block i's file (durable): its sha256 and size, and the sha256 of each tensor's bytes."""
        self.mark_done(str(i), block_file(i), sha256, {"tensors": tensors})

    def read(self, i: int) -> BlockGradients:
        """Block i's G tensors {full weight name: [out, in] fp32 CPU}, each read (and checked against its
        recorded sha256) when it is looked up: one linear's G in memory at a time."""
        entry = self.done.get(str(i))
        if entry is None:
            raise InputError(f"gradient folder {self.folder}: block {i} is missing; compute the gradients again")
        file = self.folder / entry["file"]
        if not file.is_file() or file.stat().st_size != entry["size"] or "tensors" not in entry:
            raise _changed(self.folder, entry["file"])
        return BlockGradients(file, entry["tensors"], self.folder)

    def save_input_norms(self, tensors: dict[str, torch.Tensor]) -> None:
        """Record the dense forward's input statistics {full unit name: [in] fp32 sum over windows of sum_t x^2}
        (durable before it is recorded). OWL's outlier ratios come from them without a forward sweep of its own."""
        sha = save_tensors_atomic(self.folder / INPUT_NORMS_FILE, tensors)
        size = (self.folder / INPUT_NORMS_FILE).stat().st_size
        self.data[INPUT_NORMS_KEY] = {"file": INPUT_NORMS_FILE, "sha256": sha, "size": size}
        self.save()

    def input_norms(self) -> dict[str, torch.Tensor] | None:
        """The recorded input statistics, or None when the folder has none (older folders, or a sweep whose forward
        was resumed) or the file changed since it was written."""
        entry = self.data.get(INPUT_NORMS_KEY)
        path = self.folder / INPUT_NORMS_FILE
        if entry is None or not path.is_file() or path.stat().st_size != entry["size"]:
            return None
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            return None
        return read_tensors(path, [k for k in read_header(path) if k != "__metadata__"])

    def discard(self, i: int) -> None:
        """Delete block i's file (its entry stays, so hashes recorded elsewhere still match); the prune
        sweep calls this once block i's output shard is durable, so the folder shrinks as the output grows."""
        entry = self.done.get(str(i))
        if entry is not None:
            (self.folder / entry["file"]).unlink(missing_ok=True)


class BlockGradients(Mapping):
    """One block's gradient file as a read-on-lookup mapping: name -> fp32 CPU tensor (bfloat16 files are
    widened). Lookups go through the checkpoint's read path (finite check included) and are checked against
    each tensor's recorded sha256 as they are read."""

    def __init__(self, file: Path, sha256: dict[str, str], folder: Path):
        self.file, self.sha256, self.folder = file, sha256, folder
        self._names = tuple(k for k in read_header(file) if k != "__metadata__")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        t = read_tensors(self.file, [name])[name]
        if self.sha256.get(name) != tensor_sha256(t):
            raise _changed(self.folder, self.file.name)
        return t.float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
