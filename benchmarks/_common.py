"""What the benchmarks share with each other and with the tests: tiny random checkpoints (and a tokenizer) built
here, the CLI in a fresh interpreter, and an output-folder comparison. The tests import these (tests/tiny.py,
tests/faults.py); a benchmark imports the package and this module, never tests/.

Run a benchmark from the repository root as ``python benchmarks/NAME.py`` with the package installed
(``pip install -e .``): the script's folder is on ``sys.path``, so ``from _common import ...`` needs no path edit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SKIP = {"prune_report.json", ".lowmem/lock"}  # the report holds timings; the lock holds a pid

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "in the old town square and many people watch from windows above the narrow streets"
).split()


def sample_text(n_words: int = 4000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n_words,), generator=g).tolist()
    lines, line = [], []
    for k, i in enumerate(idx):
        line.append(WORDS[i])
        if k % 13 == 12:
            lines.append(" ".join(line) + ".")
            line = []
    return "\n".join(lines)


def make_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained on sample text, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([sample_text(2000, seed=1)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return fast


def make_tiny_llama(path: Path, *, layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    inter: int = 128, vocab: int = 320, tied: bool = False, seed: int = 0,
                    shard_size: str = "60KB", dtype: torch.dtype = torch.float32, max_pos: int = 256,
                    tokenizer: bool = True) -> Path:
    """Write a random LlamaForCausalLM checkpoint with several safetensors shards (GQA by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=max_pos, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norms so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    model = model.to(dtype)
    model.save_pretrained(str(path), max_shard_size=shard_size)
    if tokenizer:
        make_tokenizer(path)
    return Path(path)


# -- other families: each a config of transformers' own class, random weights, several shards ------------
SLIDING = 8  # sliding-window size of the tiny families that have one (windows in the tests are longer)


def _family_config(kind: str, layers: int, vocab: int, sizes: dict | None = None):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1) | (sizes or {})
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
                     shard_size: str = "60KB", starve: bool = False, sizes: dict | None = None) -> Path:
    """A random checkpoint of family ``kind`` (FAMILY_KINDS) written by transformers itself. ``starve`` (MoE):
    one expert per token, router rows (u, -u, 0, 0): experts 2 and 3 never win, so no token reaches them.
    sizes: config fields that replace the tiny ones (e.g. hidden_size, intermediate_size)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _family_config(kind, layers, vocab, sizes)
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


def cli_args(model: Path, out: Path, calib: Path, method: str = "wanda", offload: str = "cpu") -> list[str]:
    return ["prune", str(model), str(out), "--method", method, "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--offload", offload, "--quiet"]


def spawn(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    """``lowmem-gblm ARGS`` in a fresh interpreter (the console script is cli.main:main)."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tree(out: Path) -> dict[str, bytes]:
    """Every file under OUT_DIR (relative path -> bytes) except the report and the lock."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and rel not in SKIP:
            files[rel] = path.read_bytes()
    return files


def diff_trees(a: Path, b: Path) -> list[str]:
    ta, tb = tree(a), tree(b)
    return sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
