"""Tiny random checkpoints and tokenizers written by the tests themselves (no network). The LLaMA one, the other
language families and the tokenizer are benchmarks/_common.py's (the crash campaign, the planner validation and
the planner conformance build them too)."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks._common import (  # noqa: F401 (re-exported)
    FAMILY_KINDS,
    MOE_KINDS,
    SLIDING,
    WORDS,
    make_tiny_family,
    make_tiny_llama,
    make_tokenizer,
    sample_text,
)

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
