"""Name lookups over an ONNX graph (read with ``onnx`` alone) and a run of it with onnxruntime for checking.

Nothing here knows a model architecture: ``onnx_dinov2`` recognizes a DINOv2 backbone with these lookups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowmem_gblm.errors import InputError, UsageError

VISION_EXTRA = "pip install 'lowmem-gblm[vision]'"


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UsageError(f"reading ONNX files needs the onnx package; {VISION_EXTRA}") from None
    return onnx


def load_onnx(path: str | Path):
    """The ``onnx.ModelProto`` in ``path``, or an InputError naming the file when it is not an ONNX model."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist")
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise InputError(f"{path} is not an ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node or not model.graph.initializer:
        raise InputError(f"{path} is not an ONNX model with weights (no graph nodes or initializers)")
    return model


@dataclass
class Graph:
    """Name lookups over one ONNX graph: weights (initializers, and Identity copies of them), constants,
    the node producing each tensor and the nodes consuming it."""

    nodes: list[Any]
    values: dict[str, np.ndarray]
    constants: dict[str, np.ndarray]
    producer: dict[str, Any]
    consumers: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, model) -> Graph:
        from onnx import numpy_helper

        g = model.graph
        values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        constants, producer, consumers = {}, {}, {}
        for node in g.node:
            for name in node.output:
                producer[name] = node
            for name in node.input:
                consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        constants[node.output[0]] = numpy_helper.to_array(attr.t)
        # the TorchScript exporter shares equal initializers and gives the other names an Identity
        for node in g.node:
            if node.op_type == "Identity" and node.input[0] in values:
                values[node.output[0]] = values[node.input[0]]
        return cls(list(g.node), values, constants, producer, consumers)

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name, self.values.get(name))

    def uses(self, name: str, op: str | None = None) -> list[Any]:
        return [n for n in self.consumers.get(name, []) if op is None or n.op_type == op]


def reaches(g: Graph, start: str, target: Any, depth: int = 12) -> bool:
    """Whether tensor ``start`` flows into node ``target`` within ``depth`` nodes."""
    frontier = [start]
    for _ in range(depth):
        nxt = []
        for name in frontier:
            for node in g.uses(name):
                if node is target:
                    return True
                nxt.extend(node.output)
        frontier = nxt
    return False


def shape_dims(g: Graph, name: str) -> list[int] | None:
    """The trailing dims of a Reshape shape: a constant, or a Concat whose last parts are constants."""
    value = g.const(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = g.producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    tail: list[int] = []
    for part in reversed(node.input):
        v = g.const(part)
        if v is None:
            break
        tail = [int(x) for x in v.reshape(-1)] + tail
    return tail or None


def input_size(model) -> tuple[int, int] | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].dim_value > 0 and dims[3].dim_value > 0:
        return dims[2].dim_value, dims[3].dim_value
    return None


def onnx_tensors(model, pixel_values: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """Run ``model`` with onnxruntime (CPU) on ``pixel_values`` and return the tensors ``names``, internal ones
    included (they are added to the graph's outputs of a copy)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError(f"running ONNX files needs onnxruntime; {VISION_EXTRA}") from None
    from onnx import helper

    copy = type(model)()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as exported
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, {copy.graph.input[0].name: pixel_values.astype(np.float32)})
