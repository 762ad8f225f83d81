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
