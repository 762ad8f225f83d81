"""Every model family row on a tiny random checkpoint that transformers writes itself (several shards,
GQA): streamed masks equal the in-memory references (whole model, hooks), the output loads with
``from_pretrained`` and computes the in-memory pruned logits, the streamed gradients equal full-model
autograd, streamed eval equals transformers' full-model loss, and a killed run resumes byte-identical.
The windows (24 tokens) are longer than the sliding window (8), so sliding layers see their own mask."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lowmem_gblm.calib.data import calibration_windows, eval_windows
from lowmem_gblm.config import CalibConfig, GradientConfig, PruneConfig
from lowmem_gblm.engine import prune
from lowmem_gblm.engine.evaluate import streamed_perplexity
from lowmem_gblm.engine.gradients import compute_gradients
from lowmem_gblm.errors import InputError
from lowmem_gblm.io.gradfiles import block_file
from lowmem_gblm.io.model import StreamedModel
from lowmem_gblm.stream.context import BlockContext
from tests.reference import full_model, inmemory_prune, reference_gradients
from tests.tiny import FAMILY_KINDS, MOE_KINDS, SLIDING, make_tiny_family, make_tokenizer, sample_text

N, T, VOCAB = 4, 24, 320
REPO = Path(__file__).resolve().parents[1]
GRAD_TOL = 1e-5


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ids") / "ids.safetensors"
    ids = torch.randint(2, VOCAB, (N, T), generator=torch.Generator().manual_seed(5))
    save_file({"input_ids": ids}, str(path))
    return path


@pytest.fixture(scope="module", params=FAMILY_KINDS)
def family_model(request, tmp_path_factory) -> tuple[str, Path]:
    kind = request.param
    return kind, make_tiny_family(tmp_path_factory.mktemp(kind) / "model", kind, seed=3)


def _ids(path: Path) -> torch.Tensor:
    return load_file(str(path))["input_ids"].long()


def _prune(model_dir: Path, out: Path, ids_file: Path, **kw) -> dict:
    options = {"method": "wanda", "sparsity": 0.5, "device": "cpu", "progress": False, **kw}
    calib = CalibConfig(ids_file=str(ids_file), nsamples=N, seqlen=T)
    return prune(PruneConfig(model_dir=str(model_dir), out_dir=str(out), calib=calib, **options))


# where the tiny MoE checkpoints keep each expert's matrices (what transformers' save_pretrained writes)
STORED_EXPERTS = {"mixtral": ("block_sparse_moe.experts.{e}.{m}.weight", ("w1", "w3"), "w2"),
                  "qwen3_moe": ("mlp.experts.{e}.{m}.weight", ("gate_proj", "up_proj"), "down_proj")}


def _block_weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for p in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(p)))
    return {n: t for n, t in tensors.items() if ".layers." in n and t.dim() == 2}


def _saved(model, folder: Path) -> dict[str, torch.Tensor]:
    """The in-memory model's block matrices as transformers itself saves them (one per expert and matrix)."""
    model.save_pretrained(str(folder))
    return _block_weights(folder)


def _stored_grads(kind: str, grads: dict) -> dict:
    """Reference gradients of fused expert parameters [E, out, in] split into the stored matrices."""
    out = {k: v for k, v in grads.items() if ".mlp.experts." not in k}
    for key, g in grads.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            fmt, (gate, up), down = STORED_EXPERTS[kind]
            prefix, inter = key[: key.index("mlp.experts.")], g.shape[1] // 2
            dn = grads[prefix + "mlp.experts.down_proj"]
            for e in range(g.shape[0]):
                out[prefix + fmt.format(e=e, m=gate)] = g[e, :inter]
                out[prefix + fmt.format(e=e, m=up)] = g[e, inter:]
                out[prefix + fmt.format(e=e, m=down)] = dn[e]
    return out


def test_wanda_masks_weights_and_logits_equal_the_in_memory_reference(family_model, ids_file, tmp_path):
    kind, model_dir = family_model
    out = tmp_path / "out"
    report = _prune(model_dir, out, ids_file)
    ids = _ids(ids_file)
    ref = inmemory_prune(model_dir, ids, "wanda", "unstructured", 0.5)
    got, want = _block_weights(out), _saved(ref, tmp_path / "ref")
    assert sorted(got) == sorted(want)
    assert len(report["sparsity"]["per_linear"]) == 3 * len(StreamedModel.open(model_dir).linear_shapes)
    for name, w in got.items():
        assert torch.equal(w, want[name]), f"{kind}: {name} differs"
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
    assert report["magnitude_fallback"] == []
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_gradients_and_gblm_masks_equal_full_model_autograd(family_model, ids_file, tmp_path):
    kind, model_dir = family_model
    ids = _ids(ids_file)
    folder = tmp_path / "grads"
    calib = CalibConfig(ids_file=str(ids_file), nsamples=N, seqlen=T)
    result = compute_gradients(GradientConfig(model_dir=str(model_dir), out_dir=str(folder), calib=calib,
                                              device="cpu", progress=False, batch_size=2))
    fused, _, mean_loss = reference_gradients(model_dir, ids)
    l1 = _stored_grads(kind, fused)
    got = {}
    for i in range(3):
        got.update(load_file(str(folder / block_file(i))))
    assert sorted(got) == sorted(l1)
    for name, g in got.items():
        err = float((g - l1[name]).abs().max() / l1[name].abs().max())
        assert err <= GRAD_TOL, (kind, name, err)
    assert result["mean_loss"] == pytest.approx(mean_loss, rel=1e-5)

    _prune(model_dir, tmp_path / "out", ids_file, method="gblm", gradients=str(folder), alpha=100.0)
    ref = _saved(inmemory_prune(model_dir, ids, "gblm", "unstructured", 0.5, grads=fused, alpha=100.0),
                 tmp_path / "ref")
    for name, w in _block_weights(tmp_path / "out").items():
        assert torch.equal(w != 0, ref[name] != 0), f"{kind}: GBLM mask of {name} differs"


def test_streamed_eval_equals_the_full_model_loss(family_model):
    kind, model_dir = family_model
    ids = torch.randint(2, VOCAB, (3, T), generator=torch.Generator().manual_seed(9))
    got = streamed_perplexity(StreamedModel.open(model_dir), ids, "cpu", torch.float32, batch_size=2)
    model = full_model(model_dir)
    with torch.no_grad():
        nll = sum(float(model(ids[w:w + 1], labels=ids[w:w + 1]).loss) for w in range(3)) / 3
    assert got["nll"] == pytest.approx(nll, rel=1e-4), kind
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


# Resume reads finished shards back and replays their blocks: a family's own block layout matters there (Gemma's
# tied scaled embedding, Phi-3's fused linears, the experts' stored per-expert matrices). Llama 3, sliding Mistral
# and Qwen3 store their blocks exactly like LLaMA (tests/test_resume.py) and differ only in the block context,
# which every other test here covers; they skip the two subprocess launches.
RESUME_KINDS = ("gemma3", "phi3", *MOE_KINDS)


def test_sigkill_then_resume_is_byte_identical(family_model, ids_file, tmp_path):
    kind, model_dir = family_model
    if kind not in RESUME_KINDS:
        pytest.skip("stored like LLaMA: tests/test_resume.py")
    _prune(model_dir, tmp_path / "ref", ids_file, device="auto")  # the CLI's run in-process, uninterrupted
    out = tmp_path / "out"
    args = [sys.executable, "-m", "cli.main", "prune", str(model_dir), str(out), "--calib-ids", str(ids_file),
            "--nsamples", str(N), "--seqlen", str(T), "--method", "wanda", "--sparsity", "0.5", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "LOWMEM_TEST_CRASH_AT"}
    r = subprocess.run(args, env=dict(env, LOWMEM_TEST_CRASH_AT="block_done:1"), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, (kind, r.stderr)
    r = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (kind, r.stderr)

    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("prune_report.json", "lock")}

    assert tree(out) == tree(tmp_path / "ref"), kind


# -- family specifics ------------------------------------------------------------------------------------


def test_sliding_layers_get_a_sliding_mask_and_gemma_its_two_ropes(tmp_path):
    model = StreamedModel.open(make_tiny_family(tmp_path / "g", "gemma3", seed=1))
    ctx = BlockContext.build(model, T, torch.device("cpu"), torch.float32)
    assert ctx.kinds == ("sliding_attention", "full_attention", "sliding_attention")
    sliding, full = ctx.inputs["sliding_attention"], ctx.inputs["full_attention"]
    assert full.attention_mask is None  # SDPA's causal path, as the full model
    mask = sliding.attention_mask[0, 0]
    q, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    assert torch.equal(mask, (k <= q) & (q - k < SLIDING))
    # local rope (theta 1e4) and global rope (theta 1e6) differ
    assert not torch.allclose(sliding.position_embeddings[0], full.position_embeddings[0])


def test_llama3_rope_scaling_is_honoured(tmp_path):
    """The llama3 row's rotary tables are the scaled ones: the same weights with default rope compute another
    loss, and the streamed eval follows transformers' scaled model (test above)."""
    scaled = StreamedModel.open(make_tiny_family(tmp_path / "l3", "llama3", seed=2))
    plain_dir = make_tiny_family(tmp_path / "plain", "llama3", seed=2)
    cfg = (plain_dir / "config.json").read_text().replace('"llama3"', '"default"')
    (plain_dir / "config.json").write_text(cfg)
    ids = torch.randint(2, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))
    a = streamed_perplexity(scaled, ids, "cpu", torch.float32)["nll"]
    b = streamed_perplexity(StreamedModel.open(plain_dir), ids, "cpu", torch.float32)["nll"]
    assert abs(a - b) > 1e-4


def test_gemma_windows_start_with_bos(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    text = tmp_path / "t.txt"
    text.write_text(sample_text(800, seed=4))
    calib = calibration_windows(tok, str(text), 3, 16, 0, bos_per_window=True)
    plain = calibration_windows(tok, str(text), 3, 16, 0)
    assert calib.shape == plain.shape == (3, 16)
    assert (calib[:, 0] == tok.bos_token_id).all() and (calib[:, 1:] != tok.bos_token_id).all()
    ev = eval_windows(tok, str(text), 16, 2, bos_per_window=True)
    stream = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    assert ev[:, 0].tolist() == [tok.bos_token_id] * 2
    assert ev[0, 1:].tolist() == stream[:15] and ev[1, 1:].tolist() == stream[15:30]


def test_a_family_needing_bos_refuses_a_tokenizer_without_one(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    tok.bos_token = None
    text = tmp_path / "t.txt"
    text.write_text(sample_text(400, seed=4))
    with pytest.raises(InputError, match="starts every window with BOS"):
        calibration_windows(tok, str(text), 2, 16, 0, bos_per_window=True)


def test_logit_softcapping_is_refused_by_name(tmp_path):
    model_dir = make_tiny_family(tmp_path / "g", "gemma3", seed=1)
    cfg = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(cfg.replace('"final_logit_softcapping": null',
                                                       '"final_logit_softcapping": 30.0'))
    with pytest.raises(InputError, match="final_logit_softcapping"):
        StreamedModel.open(model_dir)


# -- mixtures of experts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_experts_pruned_per_row_and_a_starved_expert_falls_back_to_magnitude(kind, ids_file, tmp_path):
    model_dir = make_tiny_family(tmp_path / "m", kind, seed=4, starve=True)
    report = _prune(model_dir, tmp_path / "out", ids_file)
    fmt, (gate, up), down = STORED_EXPERTS[kind]
    per_linear = report["sparsity"]["per_linear"]
    starved = sorted(n for n, r in per_linear.items() if "fallback" in r)
    assert report["magnitude_fallback"] == starved
    # experts 2 and 3 of every block: their three matrices, and nothing else
    assert starved == sorted(f"model.layers.{i}.{fmt.format(e=e, m=m)}" for i in range(3) for e in (2, 3)
                             for m in (gate, up, down))
    dense, got = _block_weights(model_dir), _block_weights(tmp_path / "out")
    for name, w in got.items():
        if ".experts." not in name:
            continue
        zeros = (w == 0).sum(dim=1)
        assert torch.equal(zeros, torch.full_like(zeros, w.shape[1] // 2)), name  # exact per row
        if name in starved:  # magnitude's mask: the smaller half of |W| in each row
            k = w.shape[1] // 2
            drop = torch.sort(dense[name].abs(), dim=1, stable=True).indices[:, :k]
            keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
            assert torch.equal(w != 0, keep), name
    router = [n for n in got if n.endswith("gate.weight") and ".experts." not in n]
    assert len(router) == 3 and all(torch.equal(got[n], dense[n]) for n in router)  # the router is not pruned
    ref = _saved(inmemory_prune(model_dir, _ids(ids_file), "wanda", "unstructured", 0.5), tmp_path / "ref")
    for name, w in got.items():
        assert torch.equal(w, ref[name]), name
