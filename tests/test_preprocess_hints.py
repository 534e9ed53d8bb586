"""The quantizers say when pre-processing would help, and stop saying it once the model is
pre-processed (its computed weights are then quantized)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxquant

H = 8


def _computed_weight() -> onnx.ModelProto:
    """MatMul(x, Transpose(W)): the weight is computed at run time from a constant."""
    w = np.random.default_rng(0).normal(0, 0.3, (H, H)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["w_t"], name="transpose_w", perm=[1, 0]),
         helper.make_node("MatMul", ["x", "w_t"], ["y"], name="mm")],
        "computed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_summary_suggests_preprocessing_until_it_is_done(tmp_path):
    before = onnxquant.quantize_dynamic(_computed_weight(), tmp_path / "a.onnx")
    assert len(before.hints) == 1 and "'transpose_w', Transpose" in before.hints[0]
    assert "pre-process:  1 nodes compute float constants" in before.summary()
    assert [d.action for d in before.decisions if d.name == "mm"] == ["float"]
    onnxquant.preprocess(_computed_weight(), tmp_path / "pre.onnx")
    after = onnxquant.quantize_dynamic(tmp_path / "pre.onnx", tmp_path / "b.onnx")
    assert after.hints == [] and "pre-process:" not in after.summary()
    assert [d.action for d in after.decisions if d.op_type == "MatMul"] == ["quantized"]


def test_static_summary_suggests_preprocessing(tmp_path):
    feeds = [{"x": np.random.default_rng(i).normal(size=(2, H)).astype(np.float32)}
             for i in range(4)]
    result = onnxquant.quantize_static(_computed_weight(), tmp_path / "q.onnx", feeds,
                                       onnxquant.StaticQuantConfig(evaluate=False))
    assert "pre-process:  1 nodes compute float constants" in result.summary()
