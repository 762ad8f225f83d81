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
    # config.json sizes that must be positive integers (None allowed for the optional ones)
    sizes: tuple[str, ...] = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                              "vocab_size")
    optional_sizes: tuple[str, ...] = ("num_key_value_heads", "head_dim")
    # tensors some checkpoints carry that transformers ignores on load (buffers it recomputes): skipped,
    # not written to the output
    ignored_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)

    def cls(self, attr: str):
        return getattr(importlib.import_module(self.module), getattr(self, attr))

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}."

    def ignored(self, name: str) -> bool:
        return name.endswith(self.ignored_suffixes)

    def check_sizes(self, config, where: str) -> None:
        """Refuse a config.json whose sizes are not positive integers, naming the field."""
        for field in self.sizes + self.optional_sizes:
            value = getattr(config, field, None)
            if value is None and field in self.optional_sizes:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{where}: {field} is {value!r}; a positive integer is needed")
        eps = getattr(config, "rms_norm_eps", None)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise InputError(f"{where}: rms_norm_eps is {eps!r}; a number between 0 and 1 is needed")


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
