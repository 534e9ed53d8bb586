"""The int32 bias of a Conv whose input or weight the model already dequantizes: its scale is
that DequantizeLinear's scale × the other operand's scale (as onnxruntime writes it)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxquant

IN_SCALE = np.float32(3 / 255)
W_SCALE = np.float32(2 / 254)


def _model(prequantized: str) -> onnx.ModelProto:
    """Conv(input, weight, bias) with ``prequantized`` ("input" or "weight") behind a DQ."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-1.5, 1.5, (1, 2, 12, 12)).astype(np.float32)
    w = rng.uniform(-1, 1, (2, 2, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array([-1.0, 1.0], np.float32), "bias")]
    if prequantized == "input":
        q = np.clip(np.rint(x / IN_SCALE) + 127, 0, 255).astype(np.uint8)
        inits += [numpy_helper.from_array(q, "xq"), numpy_helper.from_array(IN_SCALE, "xs"),
                  numpy_helper.from_array(np.array(127, np.uint8), "xz")]
        dq = helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"], name="DQ0")
        graph_input = helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape))
    else:
        q = np.clip(np.rint(w / W_SCALE), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(W_SCALE, "ws"),
                  numpy_helper.from_array(np.array(0, np.int8), "wz")]
        dq = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="DQ0")
        graph_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    graph = helper.make_graph(
        [dq, helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="conv")], "pre",
        [graph_input], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _feeds(prequantized: str) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(6)
    if prequantized == "input":
        return [{"w": rng.uniform(-1, 1, (2, 2, 3, 3)).astype(np.float32)} for _ in range(4)]
    return [{"x": rng.uniform(-1.5, 1.5, (1, 2, 12, 12)).astype(np.float32)} for _ in range(4)]


def _bias_scale(model: onnx.ModelProto) -> float:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["bias_quantized"].dtype == np.int32
    return float(inits["bias_quantized_scale"])


def _quantize(tmp_path, prequantized: str):
    out = tmp_path / "q.onnx"
    result = onnxquant.quantize_static(_model(prequantized), out, _feeds(prequantized),
                                       onnxquant.StaticQuantConfig(evaluate=False))
    model = onnx.load(out)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, _feeds(prequantized)[0])
    return model, result


def test_bias_takes_the_scale_of_a_prequantized_input(tmp_path):
    model, result = _quantize(tmp_path, "input")
    weight = result.plan.tensors["w"]  # a dynamic weight: quantized as an activation
    assert _bias_scale(model) == np.float32(np.float64(IN_SCALE) * weight.scale[0])
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 4 and ops.count("QuantizeLinear") == 2


def test_bias_takes_the_scale_of_a_prequantized_weight(tmp_path):
    model, result = _quantize(tmp_path, "weight")
    act = result.plan.tensors["x"]
    assert _bias_scale(model) == np.float32(act.scale[0] * np.float64(W_SCALE))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["ws"] == W_SCALE  # the pre-quantized weight keeps its grid
