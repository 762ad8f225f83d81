"""A model's shapes for the planner: block and linear shapes, vocabulary, stored dtype.

From a config.json (or a model folder; weights not needed) with ``load_shape``, or from a model the
engine already opened with ``shape_of`` (config.json is not read twice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from lowmem_gblm.errors import InputError, UsageError
from lowmem_gblm.io.checkpoint import CheckpointIndex
from lowmem_gblm.io.layout import family_for
from lowmem_gblm.io.model import StreamedModel
from lowmem_gblm.runtime import BY_NAME, COMPUTE_DTYPES, dtype_bytes, dtype_name, storage_dtype
from lowmem_gblm.units import prod


@dataclass
class ModelShape:
    name: str
    config: object
    family: object
    num_blocks: int
    hidden: int
    vocab: int
    storage_dtype: torch.dtype
    block_shapes: dict[str, tuple[int, ...]]  # names relative to the block
    linear_shapes: dict[str, tuple[int, int]]  # linear name -> [out, in]
    tied: bool
    non_block: int | None = None  # vision: values outside the blocks (else the embedding, head and final norm)

    @property
    def block_numel(self) -> int:
        return sum(prod(s) for s in self.block_shapes.values())

    @property
    def linear_numel(self) -> int:
        return sum(o * i for o, i in self.linear_shapes.values())

    @property
    def non_block_numel(self) -> int:
        if self.non_block is not None:
            return self.non_block
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def model_bytes(self) -> int:
        return (self.num_blocks * self.block_numel + self.non_block_numel) * dtype_bytes(self.storage_dtype)


def _shape(name: str, model: StreamedModel, storage: torch.dtype, tied: bool) -> ModelShape:
    """The block's tensor and linear shapes come from the model's block 0 built on meta (built once per model,
    as the engine builds every block)."""
    config = model.config
    if model.family.vision:  # the head's rows are the classes; the small rest comes from the meta model
        return ModelShape(name, config, model.family, int(config.num_hidden_layers), int(config.hidden_size),
                          max(int(getattr(config, "num_labels", 1) or 1), 1), storage, dict(model.block_shapes),
                          dict(model.linear_shapes), False, model.non_block_numel())
    return ModelShape(name, config, model.family, int(config.num_hidden_layers), int(config.hidden_size),
                      int(config.vocab_size), storage, dict(model.block_shapes), dict(model.linear_shapes), tied)


def shape_of(model: StreamedModel) -> ModelShape:
    """The shape of a model already opened (its checkpoint gives the stored dtype)."""
    return _shape(model.root.name, model, model.checkpoint_dtype(), model.tied)


def load_shape(path: str | Path) -> ModelShape:
    """A config.json path or a model folder (weights not needed: shapes come from the config; a folder's
    checkpoint, when there is one, gives the stored dtype, else config.json's dtype, else float16)."""
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise InputError(f"{path}: no config.json here; pass a model folder or a config.json file")
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
        kind = raw.pop("model_type")
        config = AutoConfig.for_model(kind, **raw)
    except Exception as exc:  # parsing the user's file: any failure is a bad config, as in load_hf_config
        raise InputError(f"{cfg_file}: not a usable Hugging Face config.json ({type(exc).__name__}: {exc})") from exc
    config._attn_implementation = "sdpa"  # as the engine (io.model.load_hf_config)
    shell = StreamedModel(cfg_file.parent, config, family_for(config), index=None)
    storage = _config_dtype(raw) or torch.float16
    if path.is_dir():
        storage = _checkpoint_dtype(path) or storage
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return _shape(cfg_file.parent.name if path.is_dir() else cfg_file.stem, shell, storage, tied)


def _config_dtype(raw: dict) -> torch.dtype | None:
    name = dtype_name(str(raw.get("dtype") or raw.get("torch_dtype")))
    return BY_NAME[name] if name in COMPUTE_DTYPES else None


def _checkpoint_dtype(folder: Path) -> torch.dtype | None:
    try:
        index = CheckpointIndex(folder)
        name = next(n for n in index.names() if ".layers." in n)
        return storage_dtype(index.tensors[name].dtype)
    except (UsageError, StopIteration):
        return None
