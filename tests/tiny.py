"""Tiny random checkpoints and tokenizers written by the tests themselves (no network). The LLaMA one and its
tokenizer are benchmarks/_common.py's (the crash campaign and the planner validation build them too)."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks._common import WORDS, make_tiny_llama, make_tokenizer, sample_text  # noqa: F401 (re-exported)

# -- other families: each a config of transformers' own class, random weights, several shards ------------
SLIDING = 8  # sliding-window size of the tiny families that have one (windows in the tests are longer)


def _family_config(kind: str, layers: int, vocab: int):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if kind == "llama3":  # Llama 3 rope scaling: wavelengths above 16 positions slowed 8x
        return tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "mistral_sliding":
        return tf.MistralConfig(**common, sliding_window=SLIDING)
    if kind == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if kind == "gemma3":  # local (sliding) and global layers, each with its own rope
        return tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING,
                                   layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                   + ["sliding_attention"] * (layers % 2))
    if kind == "phi3":  # fused qkv_proj / gate_up_proj, half the head dims rotated
        return tf.Phi3Config(**common, partial_rotary_factor=0.5, original_max_position_embeddings=256)
    if kind == "mixtral":  # 4 experts, 2 per token; few tokens, so some experts may get none
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, norm_topk_prob=True)
    raise ValueError(kind)


MOE_KINDS = ("mixtral", "qwen3_moe")
FAMILY_KINDS = ("llama3", "mistral_sliding", "qwen3", "gemma3", "phi3", *MOE_KINDS)


def make_tiny_family(path: Path, kind: str, *, layers: int = 3, vocab: int = 320, seed: int = 0,
                     shard_size: str = "60KB", starve: bool = False) -> Path:
    """A random checkpoint of family ``kind`` (FAMILY_KINDS) written by transformers itself. ``starve`` (MoE):
    one expert per token, router rows (u, -u, 0, 0): experts 2 and 3 never win, so no token reaches them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _family_config(kind, layers, vocab)
    if starve:
        config.num_experts_per_tok = 1
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
            if starve and name.endswith("mlp.gate.weight"):
                p[1] = -p[0]
                p[2:] = 0
    model.save_pretrained(str(path), max_shard_size=shard_size)
    return Path(path)


VISION_SIZE, VISION_CLASSES = 28, 3


def make_tiny_vision(path: Path, kind: str, *, layers: int = 3, seed: int = 0) -> Path:
    """A tiny random ViT / DeiT / DINOv2 image classifier (28x28 images, 7x7 patches, 3 classes) written by
    transformers' own save_pretrained in several shards (stored names are transformers 4's)."""
    from transformers import (
        DeiTConfig,
        DeiTForImageClassification,
        Dinov2Config,
        Dinov2ForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    config_cls, model_cls = {"vit": (ViTConfig, ViTForImageClassification),
                             "deit": (DeiTConfig, DeiTForImageClassification),
                             "dinov2": (Dinov2Config, Dinov2ForImageClassification)}[kind]
    torch.manual_seed(seed)
    config = config_cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                        image_size=VISION_SIZE, patch_size=7, num_labels=VISION_CLASSES)
    model_cls(config).save_pretrained(str(path), max_shard_size="40KB")
    return path
