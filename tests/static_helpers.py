"""Shared by the static-quantization structure tests: quantize a zoo model once per module
(``qcache``), and read back what the quantized graph stores for a value (its DequantizeLinear,
stored initializer, axis, parameters; weight and bias checks against the float model)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant import StaticQuantConfig, quantize_static

__all__ = ["CALIB_FEEDS", "Q", "DQ", "INT8", "UINT8", "INT16", "INT32", "FLOAT", "BYTE_SCALE",
           "Quantized", "quantize", "qcache", "const", "dequantizer", "axis_of",
           "stored_initializer", "qdq_counts", "activation_qs", "float_initializers",
           "check_weight", "check_bias", "zoo_tensors"]

CALIB_FEEDS = 8
Q, DQ = "QuantizeLinear", "DequantizeLinear"
INT8, UINT8, INT16, INT32 = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16,
                             ir.DataType.INT32)
FLOAT = ir.DataType.FLOAT
BYTE_SCALE = np.float32(1.0 / 255.0)  # the scale of a fixed [0, 1] range on an 8-bit grid


# -- helpers ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Quantized:
    proto: onnx.ModelProto
    model: ir.Model
    result: onnxquant.QuantizationResult
    path: Path

    def nodes(self) -> list[ir.Node]:
        return list(ir.traversal.RecursiveGraphIterator(self.model.graph))

    def node(self, name: str) -> ir.Node:
        found = [n for n in self.nodes() if n.name == name]
        assert len(found) == 1, f"expected one node named {name!r}, found {len(found)}"
        return found[0]

    def ops(self) -> collections.Counter:
        return collections.Counter(n.op_type for n in self.nodes())

    def graph(self, name: str) -> ir.Graph:
        graphs = [self.model.graph, *self.model.graph.subgraphs()]
        found = [g for g in graphs if g.name == name]
        assert len(found) == 1, f"expected one graph named {name!r}"
        return found[0]


def quantize(model: onnx.ModelProto, out: Path, config: StaticQuantConfig | None = None,
             feeds: list | None = None) -> Quantized:
    """Quantize, then check the output with the full ONNX checker and run it in onnxruntime.
    Bias correction is off: these tests check the graph against the float model's biases
    (``tests/test_corrections_static.py`` tests it)."""
    feeds = feeds if feeds is not None else zoo.random_feeds(model, CALIB_FEEDS, seed=1)
    config = dataclasses.replace(config or StaticQuantConfig(), bias_correction=False)
    result = quantize_static(model, out, feeds, config)
    assert result.output_files == [Path(out).absolute()] or result.output_files == [Path(out)]
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    for outputs in zoo.run(proto, zoo.random_feeds(model, 2, seed=2)):
        for array in outputs:
            assert np.all(np.isfinite(array))
    return Quantized(proto, ir.serde.deserialize_model(proto), result, Path(out))


@pytest.fixture(scope="module")
def qcache(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Quantized]:
    """``qcache(builder_name, **config_fields)``: quantized zoo model, computed once per module."""
    cache: dict[tuple, Quantized] = {}
    folder = tmp_path_factory.mktemp("quantized")

    def get(name: str, **fields: object) -> Quantized:
        key = (name, tuple(sorted((k, repr(v)) for k, v in fields.items())))
        if key not in cache:
            out = folder / f"{name}_{len(cache)}.onnx"
            cache[key] = quantize(getattr(zoo, name)(), out, StaticQuantConfig(**fields))
        return cache[key]

    return get


def const(value: ir.Value | None) -> np.ndarray:
    assert value is not None and value.const_value is not None, f"{value} is not a constant"
    return value.const_value.numpy()


def dequantizer(value: ir.Value | None) -> ir.Node:
    """The DequantizeLinear that produces ``value`` (fails when there is none)."""
    assert value is not None
    producer = value.producer()
    assert producer is not None and producer.op_type == DQ, (
        f"{value.name} is produced by {producer and producer.op_type}, not DequantizeLinear")
    return producer


def axis_of(node: ir.Node) -> int | None:
    attr = node.attributes.get("axis")
    return attr.as_int() if attr is not None else None


def stored_initializer(dq: ir.Node) -> ir.Value:
    """Input 0 of a DequantizeLinear, checked to be an initializer of the DQ's own graph."""
    x = dq.inputs[0]
    assert x is not None and x.const_value is not None
    assert dq.graph is not None and dq.graph.initializers.get(x.name or "") is x, (
        f"{x.name} is not an initializer of graph {dq.graph and dq.graph.name}")
    return x


def qdq_counts(q: Quantized) -> dict[str, tuple[int, int]]:
    """``{graph name: (#QuantizeLinear, #DequantizeLinear)}`` over all graphs with any."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for node in q.nodes():
        if node.op_type in (Q, DQ):
            assert node.graph is not None
            counts[node.graph.name or ""][node.op_type == DQ] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


def activation_qs(q: Quantized) -> list[ir.Node]:
    return [n for n in q.nodes() if n.op_type == Q]


def float_initializers(graph: ir.Graph) -> dict[str, ir.Value]:
    return {k: v for k, v in graph.initializers.items() if v.dtype == FLOAT}


def check_weight(node: ir.Node, index: int, dtype: ir.DataType, float_weight: np.ndarray,
                 axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Input ``index`` of ``node`` is DQ(stored ``dtype`` initializer) that reproduces the weight
    within half a step everywhere. Returns (scale, zero point)."""
    dq = dequantizer(node.inputs[index])
    stored = stored_initializer(dq)
    assert stored.dtype == dtype
    assert axis_of(dq) == axis
    scale, zero_point = const(dq.inputs[1]), const(dq.inputs[2])
    assert scale.dtype == np.float32 and zero_point.dtype == stored.const_value.numpy().dtype
    shape = [1] * float_weight.ndim
    if axis is not None:
        assert scale.shape == (float_weight.shape[axis],)
        shape[axis] = -1
    else:
        assert scale.size == 1
    s, z = scale.reshape(shape), zero_point.astype(np.float64).reshape(shape)
    restored = (const(stored).astype(np.float64) - z) * s
    assert np.all(np.abs(restored - float_weight) <= s / 2 * (1 + 1e-6) + 1e-12)
    return scale, zero_point


def check_bias(node: ir.Node, float_bias: np.ndarray | None) -> None:
    """Input 2 is DQ(int32 initializer) with scale float32(x_scale) * float32(w_scale), exactly."""
    x_dq, w_dq, b_dq = (dequantizer(node.inputs[i]) for i in range(3))
    stored = stored_initializer(b_dq)
    assert stored.dtype == INT32
    assert len(b_dq.inputs) == 2 or not np.any(const(b_dq.inputs[2]))
    x_scale, w_scale, b_scale = (const(dq.inputs[1]) for dq in (x_dq, w_dq, b_dq))
    assert x_scale.size == 1 and b_scale.dtype == np.float32
    expected = np.float32(x_scale.reshape(())) * w_scale.astype(np.float32)
    np.testing.assert_array_equal(b_scale, expected)
    if w_scale.size > 1:
        assert axis_of(b_dq) == 0
    if float_bias is not None:
        restored = const(stored).astype(np.float64) * b_scale.astype(np.float64)
        assert np.all(np.abs(restored - float_bias) <= b_scale / 2 * (1 + 1e-6) + 1e-12)


zoo_tensors = zoo.zoo_tensors


def one_input_model(nodes: list, inits: dict, shape: list, outputs: list[str]) -> onnx.ModelProto:
    """A model of ``nodes`` reading one float input ``x`` of ``shape``, with ``inits`` as
    initializers and shape-inferred ``outputs`` (their types left to inference)."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [onnx.ValueInfoProto(name=n) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=zoo.IR_VERSION)
    return onnx.shape_inference.infer_shapes(model)
