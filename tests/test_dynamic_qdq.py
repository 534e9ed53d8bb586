"""Dynamic quantization, QDQ form: the model-local ComputeQuantizationParameters function.

What is checked: the function is in ``model.functions`` (domain ``onnxquant``, imported at
version 1) and computes exactly what DynamicQuantizeLinear computes (edge inputs: all zeros,
one-signed, constant, huge and tiny ranges); every MatMul/Gemm/Conv reads its activation through
QuantizeLinear/DequantizeLinear fed by one function call per tensor and its weight as a stored
int8 tensor behind a DequantizeLinear (per-channel axes per op); the float ops stay; If bodies;
and that the outputs agree with the QOperator form and the float model.
"""

from __future__ import annotations

import collections

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from test_dynamic import const, conv_model, dtypes, gemm_model

from onnxquant.core.qtypes import QuantFormat
from onnxquant.dynamic.api import quantize_dynamic
from onnxquant.dynamic.config import DynamicQuantConfig
from onnxquant.dynamic.qdq import FUNCTION_DOMAIN, FUNCTION_NAME, compute_parameters_function

U8, I8, F32 = ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.FLOAT
Q, DQ = "QuantizeLinear", "DequantizeLinear"


def quantize(model: onnx.ModelProto, tmp_path, name: str = "qdq.onnx", **config):
    path = tmp_path / name
    config.setdefault("format", QuantFormat.QDQ)
    result = quantize_dynamic(model, path, DynamicQuantConfig(**config))
    onnx.checker.check_model(onnx.load(path), full_check=True)
    return path, ir.load(path), result


def nodes(model: ir.Model) -> list[ir.Node]:
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


def check_activation(value: ir.Value) -> ir.Node:
    """``value`` = DQ(Q(x, s, zp), s, zp) with (s, zp) from the function; returns the call."""
    dq = value.producer()
    assert dq.op_type == DQ and dtypes(dq) == [U8, F32, U8]
    q = dq.inputs[0].producer()
    assert q.op_type == Q and dtypes(q) == [F32, F32, U8]
    call = q.inputs[1].producer()
    assert (call.domain, call.op_type) == (FUNCTION_DOMAIN, FUNCTION_NAME)
    assert q.inputs[2] is call.outputs[1] and dq.inputs[1:] == q.inputs[1:]
    assert call.inputs[0] is q.inputs[0]
    return call


def check_weight(value: ir.Value, axis: int | None) -> np.ndarray:
    dq = value.producer()
    assert dq.op_type == DQ and dtypes(dq) == [I8, F32, I8]
    attr = dq.attributes.get("axis")
    assert (attr.value if attr is not None else None) == axis
    return const(dq.inputs[0])


# -- the function ------------------------------------------------------------------------------
EDGE_INPUTS = {
    "random": np.random.default_rng(0).standard_normal((4, 7)),
    "zeros": np.zeros((3, 3)),
    "positive": np.random.default_rng(1).uniform(0.5, 3.0, (5, 2)),
    "negative": -np.random.default_rng(2).uniform(0.5, 3.0, (5, 2)),
    "constant": np.full((2, 2), 0.37),
    "huge": np.array([[-3e30, 1e31]]),
    "tiny": np.array([[1e-30, -2e-31, 0.0]]),
    "halfway": np.array([[-1.0, 254.0]]),  # -min/scale = 1.0039..: rounding matters
}


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("case", list(EDGE_INPUTS))
def test_function_equals_dynamic_quantize_linear(opset, case):
    x = EDGE_INPUTS[case].astype(np.float32)
    function = ir.serde.serialize_function(compute_parameters_function(opset))
    graph = helper.make_graph(
        [helper.make_node(FUNCTION_NAME, ["x"], ["s", "zp"], domain=FUNCTION_DOMAIN),
         helper.make_node("DynamicQuantizeLinear", ["x"], ["q_ref", "s_ref", "zp_ref"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(n, t, []) for n, t in
         [("s", TensorProto.FLOAT), ("zp", TensorProto.UINT8), ("s_ref", TensorProto.FLOAT),
          ("zp_ref", TensorProto.UINT8)]])
    model = helper.make_model(
        graph, functions=[function], ir_version=zoo.IR_VERSION,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(FUNCTION_DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    ((s, zp, s_ref, zp_ref),) = zoo.run(model, [{"x": x}])
    assert s.shape == () and zp.shape == () and zp.dtype == np.uint8
    assert s.tobytes() == s_ref.tobytes() and zp == zp_ref


# -- models ------------------------------------------------------------------------------------
def test_matmul_structure(tmp_path):
    model = zoo.matmul_chain()
    path, q, result = quantize(model, tmp_path)
    assert list(q.functions) == [(FUNCTION_DOMAIN, FUNCTION_NAME, "")]
    assert q.opset_imports[FUNCTION_DOMAIN] == 1
    ops = collections.Counter(n.op_type for n in nodes(q))
    assert ops == {"MatMul": 3, "Add": 3, "Relu": 3, FUNCTION_NAME: 3, Q: 3, DQ: 6}
    for mm in [n for n in nodes(q) if n.op_type == "MatMul"]:
        check_activation(mm.inputs[0])
        w = check_weight(mm.inputs[1], None)
        assert w.shape == (16, 16) and np.abs(w).max() == 127
    assert all(d.action == "quantized" for d in result.decisions)
    assert zoo.sqnr_db(*(zoo.run(m, zoo.random_feeds(model, 1))[0][0]
                         for m in (model, str(path)))) > 30


def test_one_call_per_activation_and_per_channel_axes(tmp_path):
    model = zoo.transformer_block()
    path, q, _ = quantize(model, tmp_path, per_channel=True)
    qkv = [n for n in nodes(q) if n.op_type == "MatMul" and n.name[0] in "qkv"]
    assert len(qkv) == 3
    calls = {id(check_activation(n.inputs[0])) for n in qkv}
    assert len(calls) == 1  # q, k and v read the same quantized LayerNorm output
    for n in qkv:
        check_weight(n.inputs[1], 1)
    path_gemm, q_gemm, _ = quantize(gemm_model(trans_b=1), tmp_path, "gemm.onnx",
                                    per_channel=True)
    (gemm,) = [n for n in nodes(q_gemm) if n.op_type == "Gemm"]
    check_activation(gemm.inputs[0])
    assert check_weight(gemm.inputs[1], 0).shape == (8, 16)
    _, q_conv, _ = quantize(conv_model(bias=True), tmp_path, "conv.onnx", per_channel=True)
    (conv,) = [n for n in nodes(q_conv) if n.op_type == "Conv"]
    check_activation(conv.inputs[0])
    check_weight(conv.inputs[1], 0)
    assert conv.inputs[2].const_value is not None  # the bias stays float


@pytest.mark.parametrize("builder", [zoo.cnn, zoo.transformer_block, zoo.constant_weights_cnn,
                                     zoo.loop_model, lambda: gemm_model(trans_a=1, alpha=0.5)])
def test_agrees_with_qoperator_form(tmp_path, builder):
    model = builder()
    qdq, _, _ = quantize(model, tmp_path, weight_symmetric=True, subgraphs=True)
    qop, _, _ = quantize(model, tmp_path, "qop.onnx", format=QuantFormat.QOPERATOR,
                         weight_symmetric=True, subgraphs=True)
    feeds = zoo.random_feeds(model, 3)
    ref, a, b = zoo.run(model, feeds), zoo.run(str(qdq), feeds), zoo.run(str(qop), feeds)
    for r, x, y in zip(ref, a, b, strict=True):
        assert zoo.sqnr_db(r[0], x[0]) > 28
        assert zoo.sqnr_db(y[0], x[0]) > 40  # same grids: only summation order differs


def test_if_subgraphs(tmp_path):
    model = zoo.if_subgraph_model()
    path, q, result = quantize(model, tmp_path, subgraphs=True)
    convs = [n for n in nodes(q) if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        call = check_activation(conv.inputs[0])
        assert call.graph is conv.graph
        check_weight(conv.inputs[1], None)
    feeds = zoo.random_feeds(model, 2)
    for flag in (True, False):
        for feed in feeds:
            feed["flag"] = np.array(flag)
        for r, g in zip(zoo.run(model, feeds), zoo.run(str(path), feeds),
                        strict=True):
            assert zoo.sqnr_db(r[0], g[0]) > 30


def test_matmul_both_activations(tmp_path):
    model = zoo.transformer_block()
    _, q, result = quantize(model, tmp_path, matmul_const_b_only=False)
    (scores,) = [n for n in nodes(q) if n.name == "scores_matmul"]
    check_activation(scores.inputs[0])
    check_activation(scores.inputs[1])
    assert {d.name: d.action for d in result.decisions}["context_matmul"] == "quantized"


def test_per_channel_fallback_below_opset_13(tmp_path, monkeypatch):
    model = zoo.matmul_chain(opset=12, n=1, dim=64)
    weight = model.graph.initializer[0]
    w = onnx.numpy_helper.to_array(weight).copy()
    w[5, 0] *= 200.0  # per-tensor SQNR far below the fallback threshold
    weight.CopyFrom(onnx.numpy_helper.from_array(w, weight.name))
    path, q, result = quantize(model, tmp_path)  # converted to opset 13 for per-axis DQ
    assert q.opset_imports[""] == 13
    (mm,) = [n for n in nodes(q) if n.op_type == "MatMul"]
    check_weight(mm.inputs[1], 1)
    path, q, _ = quantize(model, tmp_path, "no_fallback.onnx", per_channel_fallback_db=None)
    assert q.opset_imports[""] == 12
    # When the converter cannot convert, the weights stay per tensor and a note says why.
    from onnxquant.core import model_io
    from onnxquant.core.errors import UnsupportedModelError

    def refuse(model, target):
        raise UnsupportedModelError("converter refused")

    monkeypatch.setattr(model_io, "convert_opset", refuse)
    path, q, result = quantize(model, tmp_path, "kept.onnx")
    assert q.opset_imports[""] == 12
    (mm,) = [n for n in nodes(q) if n.op_type == "MatMul"]
    check_weight(mm.inputs[1], None)
    assert any("needs opset 13" in note for note in result.runtime_notes)
