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


def _permute_for_gguf(w, n_head: int):
    """llama.cpp's rotary permutation of q/k rows (transformers reverses it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(hf_dir, gguf_path) -> Path:
    """An F32 llama GGUF of a checkpoint written by ``make_tiny_llama`` (any tokenizer; vocab <= 98 + 1).

    The GGUF tokenizer is byte-level BPE over printable ASCII (95 tokens) + 3 specials + one merge.
    """
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hf_dir, gguf_path = Path(hf_dir), Path(gguf_path)
    cfg = AutoConfig.from_pretrained(hf_dir)
    spelling = bytes_to_unicode()
    tokens = ["<unk>", "<s>", "</s>"] + [spelling[b] for b in range(32, 127)] + ["th"]
    assert cfg.vocab_size == len(tokens), f"make the model with vocab={len(tokens)}"
    state = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    w = gguf.GGUFWriter(str(gguf_path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["t h"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def put(name, t):
        w.add_tensor(name, t.float().numpy())

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    if "lm_head.weight" in state and not cfg.tie_word_embeddings:
        put("output.weight", state["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in GGUF_NAMES.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute_for_gguf(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute_for_gguf(t, cfg.num_key_value_heads)
            put(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_path
