"""A run's calibration samples: token windows for language models, images for vision transformers.

Both are a dict of tensors whose first dimension is the sample: ``input_ids`` [N, T] (int64), or
``pixel_values`` [N, 3, H, W] (float32) with optional ``labels`` [N] (int64). The engine keeps one
``Samples`` per run: it deals samples to ranks (``select``), names them in run folders (``sha256``) and
saves them beside the output (``tensors``, the file ``--calib-ids`` / ``--calib-pixels`` read back).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lowmem_gblm.calib.data import ids_sha256

TOKENS, PIXELS = "tokens", "pixels"
# what GBLM's loss on an image is taken against (recorded in the gradient folder and the prune report)
LABEL_SOURCES = {True: "labels: cross-entropy on each calibration image's true label",
                 False: "dense prediction: cross-entropy against the dense model's own predicted class (no labels "
                        "were given)"}


@dataclass(frozen=True)
class Samples:
    tensors: dict[str, torch.Tensor]

    @classmethod
    def of_ids(cls, ids: torch.Tensor) -> Samples:
        return cls({"input_ids": ids})

    @classmethod
    def of_pixels(cls, pixel_values: torch.Tensor, labels: torch.Tensor | None) -> Samples:
        tensors = {"pixel_values": pixel_values.to(torch.float32).contiguous()}
        if labels is not None:
            tensors["labels"] = labels.to(torch.int64).contiguous()
        return cls(tensors)

    @property
    def kind(self) -> str:
        return TOKENS if "input_ids" in self.tensors else PIXELS

    @property
    def ids(self) -> torch.Tensor:
        """[N, T] token ids (token samples only)."""
        return self.tensors["input_ids"]

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.tensors["pixel_values"]

    @property
    def labels(self) -> torch.Tensor | None:
        return self.tensors.get("labels")

    @property
    def label_source(self) -> str | None:
        """Images: what the gradient's cross-entropy is taken against (LABEL_SOURCES); None for token windows."""
        return None if self.kind == TOKENS else LABEL_SOURCES[self.labels is not None]

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def select(self, index) -> Samples:
        """The samples at ``index`` (a list, a slice), in that order."""
        return Samples({k: v[index] for k, v in self.tensors.items()})

    @property
    def sample_bytes(self) -> int | None:
        """Host bytes of one image's inputs (pixel values and label); None for token windows (the planner's
        default: T int64 ids)."""
        if self.kind == TOKENS:
            return None
        return sum(t[0].numel() * t.element_size() for t in self.tensors.values())

    @property
    def shape(self) -> list[int]:
        """What a report shows: [N, T] windows or [N, 3, H, W] images."""
        return list((self.ids if self.kind == TOKENS else self.pixel_values).shape)

    @property
    def sha256(self) -> str:
        """The calibration identity in run folders: token windows as int64 bytes (as before images existed);
        images: every tensor's name, dtype, shape and bytes, in name order."""
        if self.kind == TOKENS:
            return ids_sha256(self.ids)
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name].contiguous()
            h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a run saves beside its output (readable again by --calib-ids / --calib-pixels)."""
        return {k: v.contiguous() for k, v in self.tensors.items()}
