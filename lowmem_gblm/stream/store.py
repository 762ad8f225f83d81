"""The activation store: calibration hidden states [N, T, D] between blocks.

``cpu`` keeps them in host RAM; ``disk`` keeps them in raw files under a folder (memory-mapped
reads, one sample at a time), for boundaries that do not fit in RAM. Nothing else large lives on
the host.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

_NP_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


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
        return n * t * d * torch.finfo(self.dtype).bits // 8


class ActivationStore:
    """Factory for boundaries in one place: ``cpu`` (RAM) or ``disk`` (files under ``folder``)."""

    def __init__(self, kind: str, folder: Path | None = None):
        if kind not in ("cpu", "disk"):
            raise ValueError(kind)
        if kind == "disk" and folder is None:
            raise ValueError("disk store needs a folder")
        self.kind, self.folder = kind, folder
        self._count = 0

    def new(self, shape: tuple[int, int, int], dtype: torch.dtype, name: str | None = None) -> ActivationBuffer:
        if self.kind == "cpu":
            return ActivationBuffer(shape, dtype)
        self._count += 1
        return ActivationBuffer(shape, dtype, self.folder / f"{name or f'buf{self._count}'}.npy")
