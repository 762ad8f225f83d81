"""Model families as data: where a family keeps its blocks, embedding, final norm and head, and
which transformers classes build one decoder block. Adding a family is adding a row."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from lowmem_gblm.errors import InputError


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    module: str  # transformers module holding the classes below
    layer_class: str
    rotary_class: str
    norm_class: str
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def cls(self, attr: str):
        return getattr(importlib.import_module(self.module), getattr(self, attr))

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}."


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), "transformers.models.llama.modeling_llama",
           "LlamaDecoderLayer", "LlamaRotaryEmbedding", "LlamaRMSNorm"),
    Family("mistral", ("MistralForCausalLM",), "transformers.models.mistral.modeling_mistral",
           "MistralDecoderLayer", "MistralRotaryEmbedding", "MistralRMSNorm"),
    Family("qwen2", ("Qwen2ForCausalLM",), "transformers.models.qwen2.modeling_qwen2",
           "Qwen2DecoderLayer", "Qwen2RotaryEmbedding", "Qwen2RMSNorm"),
)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_for(config) -> Family:
    archs = list(getattr(config, "architectures", None) or [])
    for family in FAMILIES:
        if any(a in family.architectures for a in archs) or (not archs and config.model_type == family.name):
            return family
    raise InputError(
        f"unsupported architecture {archs or config.model_type!r}; supported: {', '.join(supported_architectures())}"
    )
