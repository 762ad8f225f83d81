"""Tiny random LLaMA checkpoints (several safetensors shards, GQA, a small offline tokenizer) for tests."""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a block streamed model reads one decoder block at a time.",
    "pruning removes weights with small scores from every linear layer.",
    "perplexity is the exponential of the mean negative log likelihood.",
    "wikipedia articles make a fine offline evaluation text, 1234567890!",
]


def make_tiny_tokenizer(vocab: int = 128):
    """A character-level BPE (whitespace pre-tokenized) trained on SENTENCES; ``vocab`` ids at most."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    assert tok.get_vocab_size() <= vocab
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_llama(path, *, layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    inter: int = 128, vocab: int = 128, tied: bool = False, seed: int = 0,
                    shard_size: str = "40KB", dtype: torch.dtype = torch.float32,
                    tokenizer: bool = True) -> Path:
    """Write a random LlamaForCausalLM (GQA when kv_heads < heads) to ``path``; return the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # Random norms make the test sensitive to a missing or misplaced norm weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size=shard_size, safe_serialization=True)
    if tokenizer:
        make_tiny_tokenizer(vocab).save_pretrained(path)
    return path
