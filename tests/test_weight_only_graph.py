"""Weight-only quantization end to end: graph structure, onnxruntime outputs against
``x @ dequantized W`` (tight) and the float model (4-bit error), opset conversion, selection,
subgraphs, GPTQ, external data, the ORT-compatible API, the CLI piece and errors."""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.core.errors import (
    CalibrationError,
    ModelLoadError,
    OutputPathError,
    QuantizationError,
)
from onnxquant.core.qtypes import QuantFormat
from onnxquant.weight_only import _weights
from onnxquant.weight_only.api import quantize_model_weights, quantize_weights
from onnxquant.weight_only.config import WeightOnlyConfig, WeightOnlyConfigError
from onnxquant.weight_only.hqq import quantize_hqq
from onnxquant.weight_only.rtn import quantize_rtn

F = TensorProto.FLOAT
QDQ, QOP = QuantFormat.QDQ, QuantFormat.QOPERATOR


# --------------------------------------------------------------------------- helpers
def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def _run(model, feeds, optimize=False):
    """Run in onnxruntime; optimisations off by default (ORT would fuse DQ->MatMul into
    MatMulNBits with accuracy level 4, i.e. int8 activations)."""
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight(k, n, seed=0):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _matmul_model(w, opset=17, m=6):
    k, n = w.shape[-2:]
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                  [_vi("x", [m, k])], [_vi("y", [*w.shape[:-2], m, n])], {"w": w}, opset)


def _quantize(tmp_path, model, config, data=None, name="q.onnx"):
    src = tmp_path / "float.onnx"
    onnx.save(model, src)
    out = tmp_path / name
    result = quantize_weights(src, out, config, data)
    return onnx.load(out), result


def _cos(a, b):
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- MatMulNBits / DQ
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_matches_dequantized_weight(tmp_path, bits, symmetric):
    w = _weight(45, 24)  # odd K: the last block is padded
    x = np.random.default_rng(1).standard_normal((6, 45)).astype(np.float32)
    cfg = WeightOnlyConfig(bits=bits, block_size=16, symmetric=symmetric)
    q, result = _quantize(tmp_path, _matmul_model(w), cfg)
    assert _ops(q) == ["MatMulNBits"]
    node = q.graph.node[0]
    assert node.domain == "com.microsoft" and node.name == "mm"
    assert _attrs(node) == {"K": 45, "N": 24, "bits": bits, "block_size": 16}
    assert len(node.input) == (3 if symmetric else 4)
    assert "w" not in {i.name for i in q.graph.initializer}  # the float weight is gone
    (y,) = _run(q, {"x": x})
    deq = quantize_rtn(w, bits, 16, symmetric).dequantize()
    np.testing.assert_allclose(y, x @ deq, rtol=1e-5, atol=1e-4)
    cos = _cos(y, x @ w)
    assert cos > {2: 0.85, 4: 0.99, 8: 0.9999}[bits]
    assert result.quantized[0].emitted == "MatMulNBits" and result.quantized[0].bits == bits


@pytest.mark.parametrize(("bits", "symmetric", "dtype"),
                         [(4, True, TensorProto.INT4), (4, False, TensorProto.UINT4),
                          (8, True, TensorProto.INT8), (8, False, TensorProto.UINT8)])
def test_qdq_blocked_dequantize_linear(tmp_path, bits, symmetric, dtype):
    w = _weight(40, 12)
    x = np.random.default_rng(2).standard_normal((6, 40)).astype(np.float32)
    cfg = WeightOnlyConfig(bits=bits, block_size=16, symmetric=symmetric, format=QDQ)
    q, _ = _quantize(tmp_path, _matmul_model(w), cfg)
    onnx.checker.check_model(q, full_check=True)
    assert _ops(q) == ["DequantizeLinear", "MatMul"]
    dq = q.graph.node[0]
    assert _attrs(dq) == {"axis": 0, "block_size": 16}
    inits = {i.name: i for i in q.graph.initializer}
    assert inits[dq.input[0]].data_type == dtype and list(inits[dq.input[0]].dims) == [40, 12]
    assert list(inits[dq.input[1]].dims) == [3, 12]
    assert (len(dq.input) == 3) != symmetric
    assert {o.version for o in q.opset_import if o.domain == ""} == {21}
    (y,) = _run(q, {"x": x})
    np.testing.assert_allclose(y, x @ quantize_rtn(w, bits, 16, symmetric).dequantize(),
                               rtol=1e-5, atol=1e-4)


def test_qdq_two_bits_is_refused():
    with pytest.raises(WeightOnlyConfigError, match="QDQ format stores 4 or 8 bits"):
        WeightOnlyConfig(bits=2, format=QDQ)


def test_qdq_converts_the_opset_properly(tmp_path):
    """ReduceSum's axes moved from attribute to input at opset 13: a relabelled opset-11 model
    would be invalid; the converted one passes the full checker and computes the same."""
    w = _weight(32, 8)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["h"], ["y"], axes=[1], keepdims=1, name="sum")]
    model = _model(nodes, [_vi("x", [4, 32])], [_vi("y", [4, 1])], {"w": w}, opset=11)
    q, _ = _quantize(tmp_path, model, WeightOnlyConfig(format=QDQ, block_size=16))
    onnx.checker.check_model(q, full_check=True)
    reduce = next(n for n in q.graph.node if n.op_type == "ReduceSum")
    assert len(reduce.input) == 2 and not any(a.name == "axes" for a in reduce.attribute)
    x = np.random.default_rng(3).standard_normal((4, 32)).astype(np.float32)
    deq = quantize_rtn(w, 4, 16, False).dequantize()
    np.testing.assert_allclose(_run(q, {"x": x})[0], (x @ deq).sum(1, keepdims=True),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", [QOP, QDQ])
@pytest.mark.parametrize("a_shape", [[6, 32], None])
def test_unit_leading_dims_keep_the_output_shape(tmp_path, fmt, a_shape):
    w = _weight(32, 8).reshape(1, 1, 32, 8)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_vi("x", a_shape)], [_vi("y", None)], {"w": w})
    x = np.random.default_rng(4).standard_normal((6, 32)).astype(np.float32)
    (ref,) = _run(model, {"x": x})
    assert ref.shape == (1, 1, 6, 8)
    q, _ = _quantize(tmp_path, model, WeightOnlyConfig(block_size=16, format=fmt))
    (y,) = _run(q, {"x": x})
    assert y.shape == ref.shape
    deq = quantize_rtn(w.reshape(32, 8), 4, 16, False).dequantize()
    np.testing.assert_allclose(y.reshape(6, 8), x @ deq, rtol=1e-5, atol=1e-4)
    if fmt is QOP:
        assert _ops(q)[0] == "MatMulNBits"
        assert _ops(q)[1] == ("Unsqueeze" if a_shape else "Add")


_SHAPE_CHAIN = {"Shape": 2, "Gather": 1, "Max": 2, "Sub": 2, "Reshape": 3,
                "ConstantOfShape": 1, "Slice": 1, "Concat": 1}


@pytest.mark.parametrize("fmt", [QOP, QDQ])
@pytest.mark.parametrize(("a_shape", "w_lead", "chain"), [
    ([6, 32], (1,), True), ([32], (1, 1), True), (None, (1,), True), ([2, 6, 32], (1,), False)])
def test_reshape_unit_dims_stores_2d_weights(tmp_path, fmt, a_shape, w_lead, chain):
    """onnxruntime's layout: the weight is stored 2-D, MatMul's broadcast output shape comes
    from a Shape/.../Reshape chain (none when A's rank covers B's); 1-D A is quantized too."""
    w = _weight(32, 8).reshape(*w_lead, 32, 8)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_vi("x", a_shape)], [_vi("y", None)], {"w": w})
    x = np.random.default_rng(4).standard_normal(a_shape or [6, 32]).astype(np.float32)
    (ref,) = _run(model, {"x": x})
    q, result = _quantize(tmp_path, model, WeightOnlyConfig(block_size=16, format=fmt,
                                                            reshape_unit_dims=True))
    assert result.quantized[0].name == "mm"
    ops = _ops(q)
    assert ops.count("MatMulNBits" if fmt is QOP else "DequantizeLinear") == 1
    assert {op: ops.count(op) for op in _SHAPE_CHAIN} == (
        _SHAPE_CHAIN if chain else dict.fromkeys(_SHAPE_CHAIN, 0))
    if fmt is QDQ:  # MatMulNBits' B is [N, blocks, bytes] either way
        dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
        data = next(t for t in q.graph.initializer if t.name == dq.input[0])
        assert list(data.dims) == [32, 8] and _attrs(dq)["axis"] == 0
    (y,) = _run(q, {"x": x})
    assert y.shape == ref.shape
    deq = quantize_rtn(w.reshape(32, 8), 4, 16, False).dequantize()
    np.testing.assert_allclose(y, (x @ deq).reshape(ref.shape), rtol=1e-5, atol=1e-4)


def test_channel_wise_blocks(tmp_path):
    w = _weight(40, 8)
    x = np.random.default_rng(5).standard_normal((6, 40)).astype(np.float32)
    q, result = _quantize(tmp_path, _matmul_model(w), WeightOnlyConfig(block_size=None))
    assert _attrs(q.graph.node[0])["block_size"] == 64  # next power of two >= K
    assert result.quantized[0].block_size == 64
    np.testing.assert_allclose(_run(q, {"x": x})[0],
                               x @ quantize_rtn(w, 4, 40, False).dequantize(), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("fmt", [QOP, QDQ])
def test_hqq(tmp_path, fmt):
    w = _weight(64, 16)
    x = np.random.default_rng(6).standard_normal((6, 64)).astype(np.float32)
    q, _ = _quantize(tmp_path, _matmul_model(w),
                     WeightOnlyConfig(block_size=32, algorithm="hqq", format=fmt))
    inits = {i.name: i for i in q.graph.initializer}
    zp = inits[q.graph.node[0].input[-1]]
    float_zp = fmt is QOP
    assert (zp.data_type == TensorProto.FLOAT) == float_zp
    deq = quantize_hqq(w, 4, 32, integer_zero_point=not float_zp).dequantize()
    np.testing.assert_allclose(_run(q, {"x": x})[0], x @ deq, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- Gather
@pytest.mark.parametrize(("bits", "symmetric", "axis"),
                         [(4, True, 1), (4, False, 1), (4, False, 0), (8, True, 1),
                          (8, False, 1), (2, False, 1)])
def test_gather_block_quantized(tmp_path, bits, symmetric, axis):
    table = _weight(50, 64, seed=7)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["y"], name="embed")]
    model = _model(nodes, [_vi("ids", [2, 3], TensorProto.INT64)], [_vi("y", [2, 3, 64])],
                   {"emb": table})
    cfg = WeightOnlyConfig(bits=bits, block_size=16, symmetric=symmetric,
                           op_types=("Gather",), quant_axes={"Gather": axis})
    q, _ = _quantize(tmp_path, model, cfg)
    onnx.checker.check_model(q, full_check=True)
    (node,) = q.graph.node
    assert node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft"
    attrs = _attrs(node)
    assert attrs["quantize_axis"] == axis and attrs["gather_axis"] == 0
    assert attrs["block_size"] == 16 and attrs.get("bits", 4) == bits
    ids = np.array([[0, 4, 49], [7, 7, 1]], np.int64)
    (y,) = _run(q, {"ids": ids})
    matrix = table if axis == 0 else table.T
    deq = quantize_rtn(matrix, bits, 16, symmetric).dequantize()
    deq = deq if axis == 0 else deq.T
    np.testing.assert_array_equal(y, deq[ids])


def test_gather_two_bits_on_a_non_last_axis_stays_float(tmp_path):
    table = _weight(48, 32)
    model = _model([helper.make_node("Gather", ["emb", "ids"], ["y"], name="embed")],
                   [_vi("ids", [3], TensorProto.INT64)], [_vi("y", [3, 32])], {"emb": table})
    cfg = WeightOnlyConfig(bits=2, op_types=("Gather",), quant_axes={"Gather": 0})
    q, result = _quantize(tmp_path, model, cfg)
    assert _ops(q) == ["Gather"]
    assert "quantize axis last" in result.decisions[0].reason


# --------------------------------------------------------------------------- selection
def _three_matmuls():
    ws = {f"w{i}": _weight(32, 32, seed=i) for i in range(3)}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="a"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="b"),
             helper.make_node("MatMul", ["h1", "w2"], ["y"], name="lm_head")]
    return _model(nodes, [_vi("x", [2, 32])], [_vi("y", [2, 32])], ws)


def test_include_exclude_and_overrides(tmp_path):
    cfg = WeightOnlyConfig(block_size=16, nodes_to_exclude=("a",),
                           overrides={"lm_head": {"bits": 8, "block_size": 32}})
    q, result = _quantize(tmp_path, _three_matmuls(), cfg)
    assert _ops(q) == ["MatMul", "MatMulNBits", "MatMulNBits"]
    bits = {n.name: (_attrs(n)["bits"], _attrs(n)["block_size"]) for n in q.graph.node
            if n.op_type == "MatMulNBits"}
    assert bits == {"b": (4, 16), "lm_head": (8, 32)}
    assert [(d.name, d.action) for d in result.decisions] == [
        ("a", "float"), ("b", "weights"), ("lm_head", "weights")]
    assert "excluded" in result.decisions[0].reason
    q2, _ = _quantize(tmp_path, _three_matmuls(), WeightOnlyConfig(nodes_to_include=("b",)),
                      name="q2.onnx")
    assert _ops(q2) == ["MatMul", "MatMulNBits", "MatMul"]


def test_shared_weight_is_stored_once(tmp_path):
    w = _weight(32, 32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    model = _model(nodes, [_vi("x", [2, 32])], [_vi("y", [2, 32])], {"w": w})
    q, _ = _quantize(tmp_path, model, WeightOnlyConfig(block_size=16))
    a, b = q.graph.node
    assert list(a.input[1:]) == list(b.input[1:])
    assert len(q.graph.initializer) == 3


def test_non_constant_and_batched_weights_stay_float(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "b"], ["h"], name="dynamic"),
             helper.make_node("MatMul", ["h", "w3"], ["y"], name="batched")]
    model = _model(nodes, [_vi("x", [2, 2, 8]), _vi("b", [2, 8, 8])], [_vi("y", [2, 2, 8])],
                   {"w3": np.ones((2, 8, 8), np.float32)})
    q, result = _quantize(tmp_path, model, WeightOnlyConfig())
    assert _ops(q) == ["MatMul", "MatMul"]
    reasons = [d.reason for d in result.decisions]
    assert "not a constant initializer" in reasons[0] and "batched" in reasons[1]


def test_subgraph_matmuls_are_quantized(tmp_path):
    w_out, w_in = _weight(32, 8, seed=1), _weight(32, 8, seed=2)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_out"], ["t"], name="then_mm")],
                               "then", [], [_vi("t", [2, 8])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_in"], ["e"], name="else_mm")],
                               "else", [], [_vi("e", [2, 8])],
                               [numpy_helper.from_array(w_in, "w_in")])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")
    model = _model([node], [_vi("c", [], TensorProto.BOOL), _vi("x", [2, 32])], [_vi("y", [2, 8])],
                   {"w_out": w_out})
    q, result = _quantize(tmp_path, model, WeightOnlyConfig(block_size=16))
    assert sorted(d.name for d in result.quantized) == ["else_mm", "then_mm"]
    x = np.random.default_rng(8).standard_normal((2, 32)).astype(np.float32)
    for cond, w in ((True, w_out), (False, w_in)):
        (y,) = _run(q, {"c": np.array(cond), "x": x})
        np.testing.assert_allclose(y, x @ quantize_rtn(w, 4, 16, False).dequantize(),
                                   rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- GPTQ
def _gptq_model():
    rng = np.random.default_rng(9)
    w1, w2 = rng.standard_normal((32, 48)).astype(np.float32), _weight(48, 16, seed=10)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return _model(nodes, [_vi("x", ["batch", 32])], [_vi("y", ["batch", 16])],
                  {"w1": w1, "w2": w2})


def _correlated_feeds(count, seed=11):
    """Inputs near one fixed 4-D subspace (where GPTQ's error feedback pays off)."""
    basis = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((16, 4)).astype(np.float32) @ basis
                   + 0.05 * rng.standard_normal((16, 32)).astype(np.float32))}
            for _ in range(count)]


class _Reader:
    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def test_gptq_end_to_end_beats_rtn_on_calibration_data(tmp_path):
    feeds = _correlated_feeds(8)
    model = _gptq_model()
    cfg = dict(bits=4, block_size=16, symmetric=True)
    gq, result = _quantize(tmp_path, model, WeightOnlyConfig(algorithm="gptq", **cfg),
                           _Reader(feeds), name="gptq.onnx")
    rq, _ = _quantize(tmp_path, model, WeightOnlyConfig(**cfg), name="rtn.onnx")
    assert result.calibration_samples == 8
    assert _ops(gq) == ["MatMulNBits", "Relu", "MatMulNBits"]
    assert [d.algorithm for d in result.quantized] == ["gptq", "gptq"]
    x = np.concatenate([f["x"] for f in _correlated_feeds(4, seed=12)])
    (ref,) = _run(model, {"x": x})
    err_g = np.mean((_run(gq, {"x": x})[0] - ref) ** 2)
    err_r = np.mean((_run(rq, {"x": x})[0] - ref) ** 2)
    assert err_g < 0.8 * err_r


def test_gptq_needs_calibration_data(tmp_path):
    with pytest.raises(CalibrationError, match="GPTQ needs calibration data"):
        _quantize(tmp_path, _gptq_model(), WeightOnlyConfig(algorithm="gptq"))


# --------------------------------------------------------------------------- big models
def _external_model(tmp_path, w, table):
    """A model whose weights live in external data (read lazily, in slabs)."""
    model = ir.serde.deserialize_model(_model(
        [helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")],
        [_vi("ids", [4], TensorProto.INT64)], [_vi("y", [4, w.shape[1]])],
        {"w": w, "emb": table}))
    path = tmp_path / "ext.onnx"
    ir.save(model, path, external_data="ext.onnx.data", size_threshold_bytes=0)
    return path


@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
def test_slabs_give_the_same_bytes_as_one_piece(tmp_path, monkeypatch, algorithm):
    w, table = _weight(128, 24, seed=13), _weight(40, 128, seed=14)
    src = _external_model(tmp_path, w, table)
    cfg = WeightOnlyConfig(block_size=16, algorithm=algorithm, op_types=("MatMul", "Gather"),
                           external_data=True)
    quantize_weights(src, tmp_path / "whole.onnx", cfg)
    monkeypatch.setattr(_weights, "SLAB_BYTES", 16 * 24 * 4)  # slabs: 8 x 16 rows, 14 x 3 rows
    result = quantize_weights(src, tmp_path / "slabs.onnx", cfg)
    assert [p.name for p in result.output_files] == ["slabs.onnx", "slabs.onnx.data"]
    whole, slabs = tmp_path / "whole.onnx.data", tmp_path / "slabs.onnx.data"
    assert whole.read_bytes() == slabs.read_bytes()
    q = onnx.load(tmp_path / "slabs.onnx")
    assert _ops(q) == ["GatherBlockQuantized", "MatMulNBits"]
    ids = np.array([0, 3, 39, 3])
    y = _run(str(tmp_path / "slabs.onnx"), {"ids": ids})[0]
    assert _cos(y, table[ids] @ w) > 0.99


def test_lazy_and_eager_write_the_same_tensors(tmp_path):
    model = _three_matmuls()
    lazy, _ = _quantize(tmp_path, model, WeightOnlyConfig(block_size=16))
    eager, _, _ = quantize_model_weights(ir.serde.deserialize_model(model),
                                         WeightOnlyConfig(block_size=16))
    proto = ir.serde.serialize_model(eager)
    a = {i.name: numpy_helper.to_array(i) for i in lazy.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_input_model_is_not_modified(tmp_path):
    model = _three_matmuls()
    before = model.SerializeToString()
    quantize_weights(model, tmp_path / "q.onnx", WeightOnlyConfig())
    assert model.SerializeToString() == before


# --------------------------------------------------------------------------- ORT-compatible API
def test_documented_ort_example_runs(tmp_path):
    from pathlib import Path

    from onnxquant.ort import matmul_4bits_quantizer, quant_utils

    table, w = _weight(50, 64, seed=15), _weight(64, 16, seed=16)
    model = _model([helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),
                    helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")],
                   [_vi("ids", [2, 3], TensorProto.INT64)], [_vi("y", [2, 3, 16])],
                   {"emb": table, "w": w})
    model_fp32_path = str(tmp_path / "fp32.onnx")
    model_int4_path = str(tmp_path / "int4.onnx")
    onnx.save(model, model_fp32_path)

    model = quant_utils.load_model_with_shape_infer(Path(model_fp32_path))
    quant_config = matmul_4bits_quantizer.DefaultWeightOnlyQuantConfig(
        block_size=128, is_symmetric=True, accuracy_level=4,
        quant_format=quant_utils.QuantFormat.QOperator,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    quant = matmul_4bits_quantizer.MatMul4BitsQuantizer(
        model, nodes_to_exclude=None, nodes_to_include=None, algo_config=quant_config)
    quant.process()
    quant.model.save_model_to_file(model_int4_path, True)

    assert os.path.exists(model_int4_path + ".data")
    q = onnx.load(model_int4_path)
    assert _ops(q) == ["GatherBlockQuantized", "MatMulNBits"]
    assert _attrs(q.graph.node[1])["accuracy_level"] == 4
    assert isinstance(quant.model.model, onnx.ModelProto)
    ids = np.array([[0, 1, 2], [3, 4, 49]])
    y = _run(model_int4_path, {"ids": ids}, optimize=True)[0]
    assert _cos(y, table[ids] @ w) > 0.98


def test_ort_quantize_dispatches_weight_only_configs(tmp_path):
    from onnxquant import ort as oqq
    from onnxquant.ort import matmul_nbits_quantizer as mnq

    onnx.save(_three_matmuls(), tmp_path / "f.onnx")
    cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=16, bits=8)
    result = oqq.quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", cfg)
    assert (tmp_path / "q.onnx.data").exists()  # always external data, as onnxruntime
    assert {d.bits for d in result.quantized} == {8}
    quant = mnq.MatMulNBitsQuantizer(str(tmp_path / "f.onnx"), bits=4, block_size=32,
                                     nodes_to_exclude=["a"],
                                     algo_config=mnq.RTNWeightOnlyQuantConfig(
                                         customized_weight_config={"b": {"bits": 8}}))
    quant.process()
    assert [n.op_type for n in quant.model.model.graph.node] == ["MatMul", "MatMulNBits",
                                                                "MatMulNBits"]
    assert _attrs(quant.model.model.graph.node[1])["bits"] == 8
    with pytest.raises(QuantizationError, match="clip ratios"):
        mnq.MatMulNBitsQuantizer(str(tmp_path / "f.onnx"), algo_config=mnq.RTNWeightOnlyQuantConfig(
            ratios={"w0": 0.9})).process()


# --------------------------------------------------------------------------- CLI piece
def test_cli_weights_command(tmp_path, capsys):
    from onnxquant.cli.weights import add_weights_parser

    parser = argparse.ArgumentParser()
    add_weights_parser(parser.add_subparsers())
    onnx.save(_three_matmuls(), tmp_path / "f.onnx")
    args = parser.parse_args(["weights", str(tmp_path / "f.onnx"), "-o", str(tmp_path / "q.onnx"),
                              "--bits", "4", "--block-size", "16", "--symmetric",
                              "--exclude", "a", "--override", "lm_head:bits=8",
                              "--external-data"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "quantized 2 of 3 candidate nodes (MatMulNBits 2)" in out
    assert "excluded by nodes_to_exclude [a]" in out
    q = onnx.load(tmp_path / "q.onnx")
    assert [_attrs(n).get("bits") for n in q.graph.node] == [None, 4, 8]
    assert (tmp_path / "q.onnx.data").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["weights", "m.onnx", "-o", "o.onnx", "--override", "lm_head"])


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("field", "value", "match"), [
    ("block_size", 24, "power of two"), ("block_size", 8, "power of two"),
    ("bits", 3, "bits must be 2, 4 or 8"), ("accuracy_level", 7, "accuracy_level"),
    ("op_types", ("Conv",), "not supported"), ("algorithm", "awq", "unknown algorithm"),
    ("overrides", {"x": {"group": 8}}, "unknown keys"),
])
def test_bad_config_values(field, value, match):
    with pytest.raises(WeightOnlyConfigError, match=match):
        WeightOnlyConfig(**{field: value})


def test_hqq_is_asymmetric_only():
    with pytest.raises(WeightOnlyConfigError, match="asymmetric only"):
        WeightOnlyConfig(algorithm="hqq", symmetric=True)


def test_missing_file_and_output_equal_to_input(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        quantize_weights(tmp_path / "missing.onnx", tmp_path / "q.onnx")
    onnx.save(_three_matmuls(), tmp_path / "f.onnx")
    with pytest.raises(OutputPathError, match="is the input model"):
        quantize_weights(tmp_path / "f.onnx", tmp_path / "f.onnx")


def test_nan_weight_names_the_node(tmp_path):
    w = _weight(32, 8)
    w[3, 2] = np.nan
    with pytest.raises(QuantizationError, match="node 'mm'"):
        _quantize(tmp_path, _matmul_model(w), WeightOnlyConfig(block_size=16))
    assert not (tmp_path / "q.onnx").exists()
