"""What every block call needs besides hidden states: positions and rotary embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BlockContext:
    position_ids: torch.Tensor  # [1, T]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [1, T, head_dim]

    @classmethod
    def build(cls, model, seqlen: int, device: torch.device, dtype: torch.dtype) -> BlockContext:
        rotary_cls = model.family.cls("rotary_class")
        rotary = rotary_cls(config=model.config).to(device)
        position_ids = torch.arange(seqlen, device=device).unsqueeze(0)
        probe = torch.zeros(1, seqlen, 1, device=device, dtype=dtype)
        with torch.no_grad():
            cos, sin = rotary(probe, position_ids)
        return cls(position_ids, (cos, sin))


def run_block(block: nn.Module, ctx: BlockContext, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [B, T, D] -> [B, T, D]; causal attention (SDPA, no mask tensor), no cache."""
    out = block(hidden, attention_mask=None, position_ids=ctx.position_ids,
                position_embeddings=ctx.position_embeddings, use_cache=False)
    return out[0] if isinstance(out, tuple) else out
