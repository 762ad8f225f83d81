"""One lazy block I/O path: a model is its config, its family row and a checkpoint index.

Blocks are built on the meta device and their tensors loaded with ``assign=True``: nothing but the
block being processed (or the embedding / head while they are used) is ever materialized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from lowmem_gblm.errors import InputError, first_line
from lowmem_gblm.io.checkpoint import CheckpointIndex
from lowmem_gblm.io.layout import Family, family_for
from lowmem_gblm.runtime import storage_dtype

log = logging.getLogger(__name__)


def load_hf_config(model_dir: str | Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"MODEL_DIR {model_dir}: cannot read config.json ({first_line(exc)})") from exc
    # Streamed blocks get the masks the full model would pass for unpadded input (stream.context: None for
    # full attention, where SDPA's causal path applies; eager attention would need an explicit mask there).
    config._attn_implementation = "sdpa"
    # Fused experts run transformers' own per-expert loop (one F.linear per expert and matrix), which the
    # statistics and gradient taps see; the grouped kernels would hide the experts from them.
    config._experts_implementation = "eager"
    return config


@dataclass
class StreamedModel:
    """Everything needed to stream a checkpoint block by block."""

    root: Path
    config: object
    family: Family
    index: CheckpointIndex | None

    def __post_init__(self) -> None:
        self.family.check_sizes(self.config, f"{self.root / 'config.json'}")

    @classmethod
    def open(cls, model_dir: str | Path) -> StreamedModel:
        index = CheckpointIndex(model_dir)  # validates the folder and shards first
        config = load_hf_config(model_dir)
        family = family_for(config)
        model = cls(Path(model_dir), config, family, index)
        model._check_tensors()
        if not family.vision:
            model._check_rotary()
        return model

    # -- layout --------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def tied(self) -> bool:
        if self.family.vision:
            return False
        return bool(getattr(self.config, "tie_word_embeddings", False)) or self.family.lm_head not in self.index

    def identity(self) -> dict:
        """What tells this model from another in a report (``lowmem-gblm report --compare``): the folder, the
        architecture, sha256 of config.json's bytes and of its tensor layout (every tensor's name, dtype and shape,
        whatever the sharding), and of the files' size, time and header (CheckpointIndex.fingerprint). Weight
        values are not hashed (that would read the whole model)."""
        layout = {name: [info["dtype"], info["shape"]] for header in self.index.headers.values()
                  for name, info in header.items() if name != "__metadata__"}
        config = self.root / "config.json"
        return {
            "dir": str(self.root.resolve()),
            "architecture": self.family.name,
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "layout_sha256": hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest(),
            "files_sha256": hashlib.sha256(json.dumps(self.index.fingerprint(), sort_keys=True).encode()).hexdigest(),
        }

    def block_names(self, i: int) -> list[str]:
        """Block i's tensors by their full module names (io.layout.Family.to_module of the stored ones)."""
        prefix = self.family.block_prefix(i)
        names = (self.family.to_module(n) for n in self.index.names() if not self.family.ignored(n))
        return [n for n in names if n.startswith(prefix)]

    @cached_property
    def _stored_block(self) -> re.Pattern:
        """Matches a block tensor's stored name (``<stored layers prefix>.<i>.``)."""
        stored = self.family.stored_layers_prefix or self.family.layers_prefix
        return re.compile(re.escape(stored) + r"\.\d+\.")

    def non_block_names(self) -> list[str]:
        """Every tensor outside the blocks (stored and module names agree there)."""
        return [n for n in self.index.names() if not self._stored_block.match(n) and not self.family.ignored(n)]

    def read_tensors(self, names, source=None) -> dict[str, torch.Tensor]:
        """Tensors by their module names, read from ``source`` (default: this checkpoint) under their stored ones."""
        names = list(names)
        raw = (source or self.index).read([self.family.to_stored(n) for n in names])
        return {n: raw[self.family.to_stored(n)] for n in names}

    def stored_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{module name: tensor} -> {stored name: tensor}: what a shard holds."""
        return {self.family.to_stored(n): t for n, t in tensors.items()}

    def _check_tensors(self) -> None:
        if self.family.vision:
            return self._check_vision_tensors()
        for name in (self.family.embed, self.family.final_norm):
            if name not in self.index:
                raise InputError(f"{self.root}: tensor {name!r} is missing; the checkpoint is incomplete")
        vocab, d = int(self.config.vocab_size), self.hidden_size
        expected = {self.family.embed: (vocab, d), self.family.final_norm: (d,)}
        if self.family.lm_head in self.index:
            expected[self.family.lm_head] = (vocab, d)
        block = self.stored_block_shapes
        for i in range(self.num_blocks):
            prefix = self.family.block_prefix(i)
            expected.update({prefix + suffix: shape for suffix, shape in block.items()})
        ignored = [n for n in self.index.names() if self.family.ignored(n)]
        if ignored:
            log.info("skipping %d buffer(s) transformers recomputes (%s, ...)", len(ignored), ignored[0])
        self._compare_tensors(expected)

    @cached_property
    def vision_shapes(self) -> dict[str, tuple[int, ...]]:
        """Vision: every tensor's shape by stored name, from the whole model built from config.json on the meta
        device (never materialized)."""
        from transformers import AutoModel, AutoModelForImageClassification

        auto = AutoModelForImageClassification if self.family.task == "image_classification" else AutoModel
        try:
            with torch.device("meta"):
                full = auto.from_config(self.config)
        except Exception as exc:
            raise InputError(f"{self.root / 'config.json'}: transformers cannot build a {self.family.name} model from "
                             f"it ({type(exc).__name__}: {exc})") from exc
        return {self.family.to_stored(k): tuple(v.shape) for k, v in full.state_dict().items()}

    def non_block_numel(self) -> int:
        """Vision: the values outside the blocks (embeddings, final norm, classifier)."""
        return sum(int(torch.Size(s).numel()) for n, s in self.vision_shapes.items() if not self._stored_block.match(n))

    def _check_vision_tensors(self) -> None:
        """Every stored tensor against the shapes config.json implies, by stored name."""
        self._compare_tensors(self.vision_shapes)

    def _compare_tensors(self, expected: dict[str, tuple[int, ...]]) -> None:
        for name, shape in expected.items():
            if name not in self.index:
                raise InputError(f"{self.root}: tensor {name!r} is missing; the checkpoint is incomplete")
            info = self.index.tensors[name]
            if tuple(info.shape) != shape:
                raise InputError(
                    f"{self.root}: tensor {name!r} in {info.shard} has shape "
                    f"{list(info.shape)}, config.json implies {list(shape)}"
                )
            storage_dtype(info.dtype, f"tensor {name!r} in {self.root / info.shard}")
        extra = [n for n in self.index.names() if n not in expected and not self.family.ignored(n)]
        if extra:
            shown = ", ".join(repr(n) for n in extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            raise InputError(
                f"{self.root}: {len(extra)} tensor(s) that config.json ({self.family.name}, num_hidden_layers="
                f"{self.num_blocks}) does not explain: {shown} (in {self.index.tensors[extra[0]].shard}); "
                "the config does not match the weights"
            )

    def _check_rotary(self) -> None:
        """The rotary embedding config.json describes can be built and gives finite values (a bad
        ``rope_parameters`` would otherwise fail deep in the first block call)."""
        self.family.layer_kinds(self.config)  # layer_types: one known kind per layer
        try:
            tables = self.family.rotary_tables(self.config, torch.arange(2).unsqueeze(0), torch.float32)
            ok = all(bool(torch.isfinite(cos).all() and torch.isfinite(sin).all()) for cos, sin in tables.values())
        except Exception as exc:  # transformers' own reading of the rope settings
            raise InputError(f"{self.root / 'config.json'}: its rotary embedding settings do not work "
                             f"({type(exc).__name__}: {exc})") from exc
        if not ok:
            raise InputError(f"{self.root / 'config.json'}: its rotary embedding settings give NaN/Inf")

    @cached_property
    def _meta_block(self) -> nn.Module:
        """Block 0 on the meta device, built once: shapes without weights."""
        try:
            return self.build_block(0)
        except Exception as exc:  # transformers' own checks of the config's sizes
            raise InputError(f"{self.root / 'config.json'}: transformers cannot build a "
                             f"{self.family.layer_class} from it ({type(exc).__name__}: {exc})") from exc

    @cached_property
    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name relative to a block -> shape, as config.json implies."""
        return {k: tuple(v.shape) for k, v in self._meta_block.state_dict().items()}

    @cached_property
    def stored_block_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name relative to a block -> shape, in the checkpoint's layout (a mixture of experts stores one
        matrix per expert where the module fuses them)."""
        if self.family.experts is None:
            return self.block_shapes
        return self.family.experts.stored_shapes(self.block_shapes)

    @cached_property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every pruned unit of a block -> (out, in), in module order: each nn.Linear by its module name, and
        each stored expert matrix (mixtures of experts) by its stored name without ``.weight``."""
        modules = dict(self._meta_block.named_modules())
        shapes = {n: (modules[n].out_features, modules[n].in_features) for n in linear_names(self._meta_block)}
        stored = self.stored_block_shapes
        shapes.update({name: tuple(stored[name + ".weight"]) for name in self.expert_units})
        return shapes

    @cached_property
    def expert_units(self) -> dict[str, tuple[str, int, slice]]:
        """Stored expert matrix (relative, without ``.weight``) -> (fused parameter, expert, rows of
        parameter[expert]); empty for families without experts."""
        layout = self.family.experts
        if layout is None:
            return {}
        fused = self.block_shapes[f"{layout.module}.gate_up_proj"]
        return {name: (param, e, rows) for name, param, e, rows in layout.units(fused[0], fused[1] // 2)}

    def unit_weight(self, block: nn.Module, name: str) -> torch.Tensor:
        """The [out, in] weight of a pruned unit of ``block``: a linear's weight, or a view of its expert's rows
        in the fused parameter (writing to it writes the block's parameter)."""
        if name in self.expert_units:
            param, e, rows = self.expert_units[name]
            return block.get_parameter(param).data[e, rows]
        return block.get_submodule(name).weight.data

    def block_linears(self, i: int, chosen=None) -> list[str]:
        """Block i's linear names (relative to the block, in module order) that ``chosen(full module name)``
        accepts (None: every one)."""
        prefix = self.family.block_prefix(i)
        return [n for n in self.linear_shapes if chosen is None or chosen(prefix + n)]

    # -- building ------------------------------------------------------------------------------
    def build_block(self, i: int) -> nn.Module:
        layer_cls = self.family.cls("layer_class")
        with torch.device("meta"):
            return layer_cls(self.config, layer_idx=i) if self.family.layer_idx else layer_cls(self.config)

    def load_block(self, i: int, device: torch.device, dtype: torch.dtype,
                   source: CheckpointIndex | None = None) -> nn.Module:
        """Block i with weights from ``source`` (default: this checkpoint) in ``dtype`` on ``device``."""
        return self.assemble_block(i, self.read_block(i, device, dtype, source), device, dtype)

    def read_block(self, i: int, device: torch.device, dtype: torch.dtype,
                   source: CheckpointIndex | None = None) -> dict[str, torch.Tensor]:
        """Block i's tensors in host memory, keyed relative to the block: the host half of ``load_block``
        (safe on a background thread). For a CPU device they are already in ``dtype``; for another device
        they stay in the stored dtype (converted on the device) and are pinned when CUDA is available."""
        prefix = self.family.block_prefix(i)
        raw = self.read_tensors(self.block_names(i), source)
        device = torch.device(device)
        if device.type == "cpu":
            return {name[len(prefix):]: t.to(dtype=dtype) for name, t in raw.items()}
        pin = device.type == "cuda" and torch.cuda.is_available()
        return {name[len(prefix):]: t.pin_memory() if pin else t for name, t in raw.items()}

    def assemble_block(self, i: int, host: dict[str, torch.Tensor], device: torch.device,
                       dtype: torch.dtype) -> nn.Module:
        """Block i from ``read_block``'s tensors, moved to ``device`` in ``dtype`` (the device half)."""
        state = {name: t.to(device=device, dtype=dtype) for name, t in host.items()}
        del host
        if self.family.experts is not None:  # stored per-expert matrices -> the module's fused parameters
            state = self.family.experts.fuse(state, self.block_shapes[f"{self.family.experts.module}.down_proj"][0])
        block = self.build_block(i)
        block.load_state_dict(state, strict=True, assign=True)
        block.requires_grad_(False)
        return block.eval()

    def load_embedding_rows(self, ids: torch.Tensor, device: torch.device,
                            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [U, D], ids remapped into it): only the U distinct rows ``ids`` use, read a slice at a
        time, so ``F.embedding(local, table)`` equals ``F.embedding(ids, full_table)`` without the full
        [vocab, D] table in memory."""
        rows, local = torch.unique(ids.long(), sorted=True, return_inverse=True)
        table = self.index.read_rows(self.family.embed, rows).to(device=device, dtype=dtype)
        if self.family.embed_scale:  # as Gemma's scaled embedding: the sqrt(D) scalar in the table's dtype
            table = table * torch.tensor(self.hidden_size ** 0.5, dtype=torch.float32).to(dtype)
        return table, local

    @property
    def num_labels(self) -> int:
        """Vision classifiers: the classifier's classes."""
        return int(self.stored_shape(self.family.lm_head)[0]) if self.family.task == "image_classification" else 0

    def seqlen(self, samples) -> int:
        """Tokens per sample of ``samples`` (calib.samples.Samples): a window's T, or an image's patches plus the
        special tokens. Images of a size the model cannot take are refused (ViT and DeiT need config.image_size;
        DINOv2 interpolates its position embeddings to any size)."""
        if samples.kind == "tokens":
            return int(samples.ids.shape[1])
        h, w = samples.pixel_values.shape[-2:]
        size, patch = self.config.image_size, self.config.patch_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
        if self.family.fixed_image_size and (h, w) != size:
            raise InputError(f"images are {h}x{w}; {self.root} ({self.family.name}) takes {size[0]}x{size[1]} (its "
                             "config.json image_size): preprocess them to that size")
        if h < patch[0] or w < patch[1]:
            raise InputError(f"images are {h}x{w}, smaller than one {patch[0]}x{patch[1]} patch")
        return (h // patch[0]) * (w // patch[1]) + self.family.special_tokens

    def load_embeddings(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """Vision: the patch embedding module (CLS and other special tokens, position embeddings) with its weights."""
        prefix = self.family.embed_prefix
        names = [n for n in self.non_block_names() if n.startswith(prefix)]
        with torch.device("meta"):
            module = self.family.cls("embeddings_class")(self.config)
        state = {n[len(prefix):]: t.to(device=device, dtype=dtype) for n, t in self.index.read(names).items()}
        module.load_state_dict(state, strict=True, assign=True)
        module.requires_grad_(False)
        return module.eval()

    def load_classifier(self, device: torch.device, dtype: torch.dtype) -> ClassifierHead:
        """Vision: the final layernorm, the pooling and (task image_classification) the classifier."""
        d, fam = self.hidden_size, self.family
        bias = fam.final_norm.removesuffix("weight") + "bias"
        head = [fam.lm_head, fam.lm_head.removesuffix("weight") + "bias"] if fam.task == "image_classification" else []
        raw = {n: t.to(device=device, dtype=dtype) for n, t in self.index.read([fam.final_norm, bias, *head]).items()}
        with torch.device("meta"):
            norm = nn.LayerNorm(d, eps=float(getattr(self.config, fam.eps_field)))
        norm.load_state_dict({"weight": raw[fam.final_norm], "bias": raw[bias]}, assign=True)
        classifier = None
        if head:
            weight = raw[head[0]]
            with torch.device("meta"):
                classifier = nn.Linear(weight.shape[1], weight.shape[0])
            classifier.load_state_dict({"weight": weight, "bias": raw[head[1]]}, assign=True)
        return ClassifierHead(norm, classifier, fam.pooling).requires_grad_(False).eval()

    def load_head(self, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
        """(final norm module, lm_head weight [vocab, D]); the embedding when tied."""
        head_name = self.family.embed if self.tied else self.family.lm_head
        raw = self.index.read([self.family.final_norm, head_name])
        norm_cls = self.family.cls("norm_class")
        with torch.device("meta"):
            norm = norm_cls(self.hidden_size, eps=self.config.rms_norm_eps)
        norm.load_state_dict({"weight": raw[self.family.final_norm].to(device=device, dtype=dtype)}, assign=True)
        norm.requires_grad_(False)
        return norm.eval(), raw[head_name].to(device=device, dtype=dtype)


    def stored_tensors(self, block: nn.Module, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Block i's tensors as the checkpoint stores them {full name: CPU tensor}, before any pruning.

        ``block`` is block i loaded in ``dtype``. When ``dtype`` holds every stored value exactly (the same
        dtype, or fp32 over bf16/fp16) they are cast back from it, so a sweep reads each block once;
        otherwise (e.g. an fp32 checkpoint computed in bf16) they are read from the checkpoint again.
        """
        names = self.block_names(i)
        stored = {n: self.stored_dtype(n) for n in names}
        if self.family.experts is not None or not all(s == dtype or s in _EXACT_WIDENING.get(dtype, ())
                                                      for s in stored.values()):
            return self.read_tensors(names)  # (a mixture of experts: the block fuses what the checkpoint stores)
        prefix = self.family.block_prefix(i)
        state = block.state_dict()
        return {n: state[n[len(prefix):]].detach().to(device="cpu", dtype=stored[n], copy=True) for n in names}

    def stored_dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor given by its module name."""
        return storage_dtype(self.index.tensors[self.family.to_stored(name)].dtype, f"tensor {name!r}")

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index.tensors[self.family.to_stored(name)].shape)

    def checkpoint_dtype(self) -> torch.dtype:
        """The stored dtype of the first block's weights (what ``--dtype auto`` computes in on CUDA)."""
        return self.stored_dtype(self.block_names(0)[0])


# dtypes that hold every value of a stored dtype exactly (a cast back gives the stored bytes)
_EXACT_WIDENING = {torch.float32: {torch.float32, torch.bfloat16, torch.float16}}


class ClassifierHead(nn.Module):
    """A vision transformer's head on the last block's output: final layernorm, pooling ("cls": the CLS token;
    "cls+mean": the CLS token and the mean of the other tokens, as Dinov2ForImageClassification), classifier."""

    def __init__(self, norm: nn.Module, classifier: nn.Linear | None, pooling: str):
        super().__init__()
        self.norm, self.classifier, self.pooling = norm, classifier, pooling

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] -> the classifier's input [B, F] (F = D, or 2D for cls+mean)."""
        h = self.norm(hidden)  # [B, T, D]
        if self.pooling == "cls+mean":
            return torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1)
        return h[:, 0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] -> logits [B, classes]."""
        if self.classifier is None:
            raise InputError("this model has no classifier (a backbone): it gives features, not logits")
        return self.classifier(self.features(hidden))


def linear_names(block: nn.Module) -> list[str]:
    """Names (relative to the block) of every nn.Linear in it, in module order."""
    return [name for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]
