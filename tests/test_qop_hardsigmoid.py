"""QOperator: a HardSigmoid after an integer Conv is folded into it (bias + beta/alpha, output
scale / alpha), so no DequantizeLinear → HardSigmoid → QuantizeLinear island is left.

Checked: the structure (no HardSigmoid, one QuantizeLinear for the graph input), the Conv's
integer output against an independent reference (the float Conv on the dequantized inputs,
HardSigmoid, quantized onto the HardSigmoid output's grid: within one step), and the cases
that must not fold.
"""

from __future__ import annotations

import collections
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant import StaticQuantConfig, quantize_static
from onnxquant.core.qtypes import QuantFormat

_RNG = np.random.default_rng(3)
W = (_RNG.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32)
B = (_RNG.standard_normal(4) * 0.3).astype(np.float32)
G = (_RNG.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32)


def se_gate(alpha: float = 1 / 6, beta: float = 0.5, extra_reader: bool = False) -> onnx.ModelProto:
    """x -> Conv(W, B) -> HardSigmoid -> Mul with a second Conv (a squeeze-excite gate)."""
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="gate_conv"),
             helper.make_node("HardSigmoid", ["y"], ["h"], name="gate", alpha=alpha, beta=beta),
             helper.make_node("Conv", ["x", "G"], ["g"], name="branch"),
             helper.make_node("Mul", ["g", "h"], ["z"], name="scale")]
    outputs = ["z"]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["y"], ["r"], name="other"))
        outputs.append("r")
    graph = helper.make_graph(
        nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [onnx.ValueInfoProto(name=n) for n in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in (("W", W), ("B", B), ("G", G))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=zoo.IR_VERSION)
    return onnx.shape_inference.infer_shapes(model)


def quantize(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    out = tmp_path / "q.onnx"
    feeds = zoo.random_feeds(model, 8, seed=1)
    quantize_static(model, out, feeds, StaticQuantConfig(format=QuantFormat.QOPERATOR,
                                                         float_conv_depth=None))
    return onnx.load(out)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _run(model: onnx.ModelProto, names: list[str], feed: dict) -> list[np.ndarray]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feed)


@pytest.mark.parametrize("alpha, beta", [(1 / 6, 0.5), (0.2, 0.5), (0.5, 0.1)])
def test_folded_into_conv(tmp_path: Path, alpha: float, beta: float) -> None:
    q = quantize(se_gate(alpha, beta), tmp_path)
    ops = collections.Counter(n.op_type for n in q.graph.node)
    assert ops["HardSigmoid"] == 0
    assert ops["QLinearConv"] == 2 and ops["QLinearMul"] == 1
    assert ops["QuantizeLinear"] == 1  # the graph input only
    mul = next(n for n in q.graph.node if n.op_type == "QLinearMul")
    conv = next(n for n in q.graph.node if n.op_type == "QLinearConv" and n.output[0] in mul.input)
    x_q, x_s, x_zp, w_q, w_s, w_zp, h_s, h_zp, b_q = conv.input
    inits = _inits(q)
    assert inits[b_q].dtype == np.int32
    # The output grid is the HardSigmoid output's grid scaled by 1/alpha: [0, 1/alpha].
    assert inits[h_zp] == 0
    assert float(inits[h_s]) * 255 * alpha == pytest.approx(1.0, abs=0.02)

    feed = zoo.random_feeds(se_gate(), 1, seed=5)[0]
    feed["x"][0, 0, 0, 0] = 40.0  # pushes the gate past 1 (and another below 0)
    feed["x"][0, 1, 0, 1] = -40.0
    got, xq = _run(q, [conv.output[0], x_q], feed)
    x = (xq.astype(np.float64) - inits[x_zp]) * inits[x_s]
    w = (inits[w_q].astype(np.float64) - np.reshape(inits[w_zp], (-1, 1, 1, 1))) * \
        np.reshape(inits[w_s], (-1, 1, 1, 1))
    y = np.einsum("oi,bihw->bohw", w[:, :, 0, 0], x) + B.reshape(1, -1, 1, 1)
    h = np.clip(alpha * y + beta, 0.0, 1.0)
    h_scale = float(inits[h_s]) * alpha
    want = np.clip(np.rint(h / h_scale), 0, 255)
    assert np.abs(got.astype(np.int64) - want).max() <= 1
    assert got.max() == 255 and got.min() == 0  # the saturation is the clip


def test_not_folded_when_the_conv_output_has_other_readers(tmp_path: Path) -> None:
    q = quantize(se_gate(extra_reader=True), tmp_path)
    assert collections.Counter(n.op_type for n in q.graph.node)["HardSigmoid"] == 1


def test_not_folded_for_negative_alpha(tmp_path: Path) -> None:
    q = quantize(se_gate(alpha=-0.2), tmp_path)
    assert collections.Counter(n.op_type for n in q.graph.node)["HardSigmoid"] == 1
