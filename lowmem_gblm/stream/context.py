"""What every block call needs besides hidden states: positions, rotary embeddings and the attention mask
of the block's kind of attention (full or sliding window), built by the family's own classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class KindInputs:
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [1, T, rotary dim]
    attention_mask: torch.Tensor | None  # [1, 1, T, T] bool (True: attend); None: SDPA's causal path


@dataclass
class BlockContext:
    position_ids: torch.Tensor | None  # [1, T]; None for vision transformers (no per-kind inputs either)
    kinds: tuple[str, ...]  # each layer's attention kind (Family.layer_kinds)
    inputs: dict[str, KindInputs]  # by attention kind

    @classmethod
    def build(cls, model, seqlen: int, device: torch.device, dtype: torch.dtype) -> BlockContext:
        """``model``: anything with ``family`` and ``config`` (a StreamedModel or a ModelShape). The masks are
        the ones transformers' full model passes to its layers for unpadded windows (None where it relies on
        SDPA's causal path)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        family, config = model.family, model.config
        if family.vision:  # encoder layers: every token attends to every token, no positions to pass
            return cls(None, (), {})
        kinds = tuple(family.layer_kinds(config))
        position_ids = torch.arange(seqlen, device=device).unsqueeze(0)
        tables = family.rotary_tables(config, position_ids, dtype, device)
        embeds = torch.empty(1, seqlen, 1, device=device, dtype=dtype)
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        inputs = {}
        for kind in sorted(set(kinds)):
            mask = makers[kind](config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                position_ids=position_ids)
            inputs[kind] = KindInputs(tables[kind], mask)
        return cls(position_ids, kinds, inputs)

    def for_block(self, block: nn.Module) -> KindInputs:
        if len(self.inputs) == 1:
            return next(iter(self.inputs.values()))
        return self.inputs[self.kinds[layer_index(block)]]


def layer_index(block: nn.Module) -> int:
    """The decoder layer's index, as transformers records it (on the layer or on its attention)."""
    for module in (block, getattr(block, "self_attn", None)):
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    raise ValueError(f"{type(block).__name__} records no layer_idx; its attention kind is unknown")


def run_block(block: nn.Module, ctx: BlockContext, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [B, T, D] -> [B, T, D]; no cache. The mask (when the block's kind has one) broadcasts over B.
    An encoder layer (a context without inputs) takes the hidden states alone."""
    if not ctx.inputs:
        out = block(hidden)
        return out[0] if isinstance(out, tuple) else out
    inputs = ctx.for_block(block)
    out = block(hidden, attention_mask=inputs.attention_mask, position_ids=ctx.position_ids,
                position_embeddings=inputs.position_embeddings, use_cache=False)
    return out[0] if isinstance(out, tuple) else out
