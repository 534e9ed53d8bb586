"""Element types through onnxruntime's contrib ops: after a fused SkipLayerNormalization /
BiasGelu, the MatMuls behind them are seen as float32 and quantized (dynamic and static)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant.preprocess.contrib_types import infer_contrib_types

H = 16


def _fused_block() -> onnx.ModelProto:
    """SkipLayerNormalization -> MatMul -> BiasGelu -> MatMul, as onnxruntime's transformer
    optimizer leaves a BERT feed-forward block; no value_info for anything in between."""
    rng = np.random.default_rng(0)
    inits = {"gamma": np.ones(H, np.float32), "beta": np.zeros(H, np.float32),
             "w1": rng.normal(0, 0.2, (H, 2 * H)).astype(np.float32),
             "b1": rng.normal(0, 0.1, 2 * H).astype(np.float32),
             "w2": rng.normal(0, 0.2, (2 * H, H)).astype(np.float32)}
    nodes = [
        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["ln"],
                         domain="com.microsoft", name="skip_ln", epsilon=1e-5),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("BiasGelu", ["h", "b1"], ["g"], domain="com.microsoft", name="gelu"),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "fused",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", H]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", H])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{n: rng.normal(size=(2, 5, H)).astype(np.float32) for n in ("x", "skip")}
            for _ in range(count)]


def test_contrib_outputs_take_their_float_input_type():
    model = ir.serde.deserialize_model(_fused_block())
    assert infer_contrib_types(model) == 2  # BiasGelu's bias is typed, h is not
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert values["ln"].dtype == values["g"].dtype == ir.DataType.FLOAT
    assert values["h"].dtype is None  # a standard op: ONNX shape inference types it


def test_dynamic_quantization_sees_through_contrib_ops(tmp_path):
    result = onnxquant.quantize_dynamic(_fused_block(), tmp_path / "q.onnx")
    quantized = {d.name for d in result.decisions if d.action == "quantized"}
    assert {"fc1", "fc2"} <= quantized, [(d.name, d.reason) for d in result.decisions]
    ops = [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node]
    assert "MatMul" not in ops


def test_static_quantization_sees_through_contrib_ops(tmp_path):
    result = onnxquant.quantize_static(_fused_block(), tmp_path / "q.onnx", _feeds(8),
                                       onnxquant.StaticQuantConfig(evaluate=False))
    assert result.plan.nodes["fc1"].action == "quantize"
    assert result.plan.nodes["fc2"].action == "quantize"
