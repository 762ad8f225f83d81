"""The streamed pruner against in-memory references on tiny random checkpoints (CPU, fp32)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lowmem_gblm.config import CalibConfig, PruneConfig
from lowmem_gblm.engine import prune
from tests.reference import inmemory_prune, load_ids

NSAMPLES, SEQLEN = 6, 32


def run(model_dir, out_dir, calib_text, **kw):
    calib = CalibConfig(source=str(calib_text), nsamples=NSAMPLES, seqlen=SEQLEN, seed=kw.pop("seed", 0))
    return prune(PruneConfig(model_dir=str(model_dir), out_dir=str(out_dir), calib=calib, progress=False, **kw))


def read_all(out_dir) -> dict:
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, shard in index["weight_map"].items():
        with safe_open(str(out_dir / shard), framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


def assert_matches_reference(out_dir, ref_model):
    got = read_all(out_dir)
    ref = ref_model.state_dict()
    linear_names = [n for n in got if ".layers." in n and got[n].dim() == 2]
    assert linear_names
    for name in linear_names:
        assert torch.equal(got[name] == 0, ref[name] == 0), f"mask differs for {name}"
        assert torch.equal(got[name], ref[name]), f"values differ for {name}"


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_tied"])
def test_streamed_wanda_equals_inmemory_reference(request, fixture, calib_text, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    report = run(model_dir, out, calib_text, method="wanda", sparsity=0.5)
    ids = load_ids(out)
    assert ids.shape == (NSAMPLES, SEQLEN)
    ref = inmemory_prune(model_dir, ids, "wanda", "unstructured", 0.5)
    assert_matches_reference(out, ref)
    assert report["sparsity"]["overall"] == pytest.approx(0.5)

    # the output loads as an ordinary checkpoint and computes what the in-memory pruned model computes
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_per_row_sparsity_is_exact(tiny_model, calib_text, tmp_path):
    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method="wanda", sparsity=0.3)
    for name, w in read_all(out).items():
        if ".layers." in name and w.dim() == 2:
            per_row = (w == 0).sum(dim=1)
            assert torch.all(per_row == int(w.shape[1] * 0.3)), name


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_structure_and_reference(tiny_model, calib_text, tmp_path, pattern):
    n, m = (int(v) for v in pattern.split(":"))
    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method="wanda", sparsity=None, pattern=pattern)
    for name, w in read_all(out).items():
        if ".layers." in name and w.dim() == 2:
            groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
            assert torch.all(groups == n), name
    assert_matches_reference(out, inmemory_prune(tiny_model, load_ids(out), "wanda", pattern, None))


def test_magnitude_row_and_matrix(tiny_model, calib_text, tmp_path):
    out = tmp_path / "row"
    run(tiny_model, out, calib_text, method="magnitude", sparsity=0.5)
    assert_matches_reference(out, inmemory_prune(tiny_model, load_ids(out), "magnitude", "unstructured", 0.5))
    out2 = tmp_path / "matrix"
    run(tiny_model, out2, calib_text, method="magnitude", sparsity=0.5, magnitude_scope="matrix")
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).state_dict()
    for name, w in read_all(out2).items():
        if ".layers." in name and w.dim() == 2:
            k = int(w.numel() * 0.5)
            order = torch.argsort(dense[name].abs().reshape(-1), stable=True)
            expected = dense[name].clone().reshape(-1)
            expected[order[:k]] = 0
            assert torch.equal(w.reshape(-1), expected), name


def test_output_layout_and_provenance(tiny_model, calib_text, tmp_path):
    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method="wanda", sparsity=0.5)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118
                total += f.get_tensor(name).numel() * 4
    assert index["metadata"]["total_size"] == total
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (tiny_model / side).read_bytes()
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "wanda" and report["options"]["calib"]["nsamples"] == NSAMPLES
    assert len(report["sparsity"]["per_linear"]) == 3 * 7
    assert {p["phase"] for p in report["phases"]} >= {"prune_sweep"}
    assert report["phases"][0]["peak_rss_bytes"] > 0 and report["versions"]["torch"]


def test_calib_ids_reuse_gives_identical_output(tiny_model, calib_text, tmp_path):
    a = tmp_path / "a"
    run(tiny_model, a, calib_text, method="wanda", sparsity=0.5)
    b = tmp_path / "b"
    calib = CalibConfig(source=None, ids_file=str(a / "calibration_ids.safetensors"), nsamples=NSAMPLES,
                        seqlen=SEQLEN)
    prune(PruneConfig(model_dir=str(tiny_model), out_dir=str(b), calib=calib, method="wanda", sparsity=0.5,
                      progress=False))
    for shard in sorted(a.glob("model-*.safetensors")):
        assert shard.read_bytes() == (b / shard.name).read_bytes()


def test_resume_refuses_other_options_and_overwrite_starts_over(tiny_model, calib_text, tmp_path):
    from lowmem_gblm.errors import ResumeMismatch

    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method="wanda", sparsity=0.5)
    with pytest.raises(ResumeMismatch, match="sparsity"):
        run(tiny_model, out, calib_text, method="wanda", sparsity=0.6)
    run(tiny_model, out, calib_text, method="wanda", sparsity=0.6, overwrite=True)
    assert json.loads((out / "prune_report.json").read_text())["sparsity"]["overall"] == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize(("stored", "compute"), [
    (torch.bfloat16, torch.float32),  # widened: cast back from the loaded block
    (torch.float16, torch.float32),
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),  # narrowed: read again from the checkpoint
])
def test_stored_tensors_are_the_stored_bytes(tmp_path, stored, compute):
    from lowmem_gblm.io.model import StreamedModel
    from tests.tiny import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "m", dtype=stored, tokenizer=False)
    model = StreamedModel.open(model_dir)
    for i in range(model.num_blocks):
        block = model.load_block(i, torch.device("cpu"), compute)
        got = model.stored_tensors(block, i, compute)
        want = model.index.read(model.block_names(i))
        assert sorted(got) == sorted(want) and len(got) == 9
        for name, t in want.items():
            assert got[name].dtype == stored and torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
        # copies, never views of the block's weights (the sweep writes into those)
        weights = {p.data_ptr() for p in block.parameters()}
        assert not weights & {t.data_ptr() for t in got.values()}


def test_each_block_is_freed_before_its_shard_is_written(tiny_model, calib_text, tmp_path, monkeypatch):
    """The prune sweep holds one block at a time: by the time a block's shard is serialized the block (its
    weights: as large as the shard in the compute dtype) is gone, as the planner's host terms assume."""
    import importlib
    import weakref

    from lowmem_gblm.io.prefetch import BlockReader

    prune_mod = importlib.import_module("lowmem_gblm.engine.prune")  # the module (the package exports the function)

    blocks, checked = [], []
    take, save = BlockReader.next, prune_mod.save_tensors_atomic

    def next_block(self, i):
        block = take(self, i)
        blocks.append(weakref.ref(block))
        return block

    def save_shard(path, tensors):
        if blocks:  # a block's shard (the embedding / norm / head shard is written before any block is read)
            checked.append(path.name)
            assert all(ref() is None for ref in blocks), f"a block is still alive while {path.name} is written"
        return save(path, tensors)

    monkeypatch.setattr(BlockReader, "next", next_block)
    monkeypatch.setattr(prune_mod, "save_tensors_atomic", save_shard)
    run(tiny_model, tmp_path / "out", calib_text, method="wanda", sparsity=0.5, prefetch=False)
    assert len(checked) == 3
