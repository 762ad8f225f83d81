import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_gblm.calib.data import eval_windows, split_windows
from lowmem_gblm.engine.evaluate import checkpoint_sparsity, streamed_perplexity
from lowmem_gblm.errors import InputError
from lowmem_gblm.io.model import StreamedModel
from tests.tiny_eval import SENTENCES, make_tiny_llama


def reference_ppl(model_dir, ids):
    """Plain transformers: loss per window, averaged token-weighted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = count = 0.0
    with torch.no_grad():
        for w in range(ids.shape[0]):
            loss = model(ids[w:w + 1], labels=ids[w:w + 1]).loss
            n = ids.shape[1] - 1
            total += float(loss) * n
            count += n
    return math.exp(total / count), total / count


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_matches_full_model(tmp_path, tied, batch_size):
    path = make_tiny_llama(tmp_path / "m", tied=tied)
    model = StreamedModel.open(path)
    assert len(model.index.shards) > 3 and model.tied == tied
    ids = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(1))
    got = streamed_perplexity(model, ids, "cpu", torch.float32, batch_size=batch_size)
    ppl, nll = reference_ppl(path, ids)
    assert got["tokens"] == 5 * 23 and got["windows"] == 5 and got["seqlen"] == 24
    assert got["nll"] == pytest.approx(nll, rel=1e-4)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-4)


def test_split_windows_drops_partial_tail():
    stream = torch.arange(23)
    ids = split_windows(stream, 5)
    assert ids.shape == (4, 5) and ids[-1].tolist() == [15, 16, 17, 18, 19]
    assert split_windows(stream, 5, max_windows=2).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(InputError, match="fewer than one window"):
        split_windows(stream, 24)


def test_eval_windows_from_text(tmp_path):
    from transformers import AutoTokenizer

    path = make_tiny_llama(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(SENTENCES * 4))
    ids = eval_windows(tok, str(text), 16)
    stream = torch.tensor(tok(text.read_text())["input_ids"])
    assert ids.shape == (stream.numel() // 16, 16)
    assert torch.equal(ids.flatten(), stream[: ids.numel()])
    got = streamed_perplexity(StreamedModel.open(path), ids[:2], "cpu", torch.float32)
    assert got["ppl"] == pytest.approx(reference_ppl(path, ids[:2])[0], rel=1e-4)


def test_checkpoint_sparsity_counts_exact_zeros(tmp_path):
    path = make_tiny_llama(tmp_path / "m", layers=2)
    model = StreamedModel.open(path)
    target = "model.layers.1.mlp.down_proj.weight"  # [64, 128]
    shard = path / model.index.tensors[target].shard
    tensors = load_file(shard)
    w = tensors[target]
    w[:, :32] = 0  # 64 * 32 = 2048 zeros
    save_file(tensors, shard, metadata={"format": "pt"})
    model = StreamedModel.open(path)
    got = checkpoint_sparsity(model)
    assert len(got["per_linear"]) == 2 * 7  # q k v o gate up down per block
    assert all(not n.endswith("norm.weight") for n in got["per_linear"])
    assert got["per_linear"][target] == pytest.approx(0.25)
    others = [v for n, v in got["per_linear"].items() if n != target]
    assert all(v == 0.0 for v in others)
    # per block: q 64x64, k/v 32x64 each, o 64x64, gate/up 128x64, down 64x128
    per_block = 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3
    assert got["total"] == 2 * per_block and got["zeros"] == 2048
    assert got["overall"] == pytest.approx(2048 / (2 * per_block))


def test_rejects_ids_outside_vocab(tmp_path):
    model = StreamedModel.open(make_tiny_llama(tmp_path / "m", layers=1, tokenizer=False))
    with pytest.raises(InputError, match="vocabulary"):
        streamed_perplexity(model, torch.full((1, 4), 128), "cpu", torch.float32)


def test_eval_chunks_a_large_vocabulary_head_by_default():
    from lowmem_gblm.stream.head import EVAL_LOGITS_BYTES, auto_head_chunk

    assert auto_head_chunk(32000, 2048) is None  # LLaMA-2: 250 MiB of fp32 logits, the whole window
    assert auto_head_chunk(262144, 2048) == 256  # Gemma 3: 256 positions per call
    assert auto_head_chunk(262144, 258) == 256 and auto_head_chunk(262144, 257) is None  # 256 positions fit
    assert auto_head_chunk(10**9, 2048) == 1
    assert EVAL_LOGITS_BYTES >= 256 * 262144 * 4


def test_streamed_eval_with_the_default_chunk_equals_the_whole_window(tmp_path, monkeypatch):
    from lowmem_gblm.stream import head

    path = make_tiny_llama(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    whole = streamed_perplexity(StreamedModel.open(path), ids, "cpu", torch.float32)
    monkeypatch.setattr(head, "EVAL_LOGITS_BYTES", 5 * 128 * 4)  # 5 positions of a 128-word vocabulary
    chunked = streamed_perplexity(StreamedModel.open(path), ids, "cpu", torch.float32)
    assert whole["head_chunk"] is None and chunked["head_chunk"] == 5
    assert chunked["nll"] == pytest.approx(whole["nll"], rel=1e-6)
