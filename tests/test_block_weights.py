"""Block-wise QDQ weights (``StaticQuantConfig.weight_block_size``, onnxruntime's ``BlockSize``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxquant
import onnxquant.ort as oqq
from onnxquant.core.blocks import block_params, quantize_blocked
from onnxquant.core.qtypes import INT8, UINT8


def _reference_symmetric_scales(w: np.ndarray, axis: int, block: int, qmax: int):
    """Per-block symmetric scales (absmax / qmax), written out with plain loops."""
    moved = np.moveaxis(w, axis, 0).astype(np.float64)
    k, n = moved.shape
    blocks = -(-k // block)
    scale = np.zeros((blocks, n))
    for b in range(blocks):
        for j in range(n):
            scale[b, j] = np.abs(moved[b * block:(b + 1) * block, j]).max() / qmax
    return scale if axis == 0 else scale.T


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 7), st.sampled_from([2, 4, 8]), st.sampled_from([0, 1]),
       st.integers(0, 2**31 - 1))
def test_block_scales_match_a_loop_reference(k, n, block, axis, seed):
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    scale, zp = block_params(w, axis, block, INT8, symmetric=True)
    want = _reference_symmetric_scales(w, axis, block, 127)
    np.testing.assert_allclose(scale, np.where(want > 0, want, 1.0), rtol=1e-6)
    assert not np.any(zp)
    q = quantize_blocked(w, scale, zp, INT8, axis, block)
    step = np.repeat(scale, block, axis=axis)[:k, :n]
    # every element is within half a step of its own block's grid
    assert np.all(np.abs(q.astype(np.float32) * step - w) <= step / 2 + 1e-6)


def test_asymmetric_uint8_blocks_hold_their_own_range():
    w = np.array([[0.0, 1.0], [2.0, -1.0], [10.0, 3.0], [20.0, -5.0]], np.float32)
    scale, zp = block_params(w, 0, 2, UINT8, symmetric=False)
    assert scale.shape == zp.shape == (2, 2)
    np.testing.assert_allclose(scale[:, 0], [2.0 / 255, 20.0 / 255], rtol=1e-6)
    assert zp[0, 0] == 0 and zp[1, 1] > 0  # the second column's blocks hold negatives


def _matmul_gemm_model():
    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.normal(size=(64, 32)).astype(np.float32), "B")
    c = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "C")
    bias = numpy_helper.from_array(rng.normal(size=(16,)).astype(np.float32), "bias")
    nodes = [helper.make_node("MatMul", ["x", "B"], ["h"], name="mm"),
             helper.make_node("Gemm", ["h", "C", "bias"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [4, 64])],
                              [helper.make_tensor_value_info("y", 1, [4, 16])], [b, c, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return onnx.shape_inference.infer_shapes(model)


def test_block_weights_end_to_end(tmp_path):
    model = _matmul_gemm_model()
    feeds = [{"x": np.random.default_rng(i).normal(size=(4, 64)).astype(np.float32)}
             for i in range(4)]
    out = tmp_path / "q.onnx"
    onnxquant.quantize_static(model, out, feeds, onnxquant.StaticQuantConfig(
        weight_block_size=16, evaluate=False))
    q = onnx.load(out)
    assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 21
    dqs = {n.input[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    attrs = {a.name: a.i for a in dqs["B_quantized"].attribute}
    assert attrs == {"axis": 0, "block_size": 16}
    assert inits["B_scale"].shape == (4, 32)  # 64 / 16 blocks along K
    gemm_attrs = {a.name: a.i for a in dqs["C_quantized"].attribute}
    assert gemm_attrs == {"axis": 1, "block_size": 16}  # transB: K is axis 1
    assert inits["C_scale"].shape == (16, 2)
    assert "bias" in inits and "bias_quantized" not in inits  # the bias stays float
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got, want = sess.run(None, feeds[0])[0], ref.run(None, feeds[0])[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_block_weights_need_rank_2(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", 1, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", 1, [1, 4, 3, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    feeds = [{"x": np.ones((1, 2, 5, 5), np.float32)}]
    with pytest.raises(NotImplementedError, match="rank-2 weight.*'W' has rank 4") as info:
        oqq.quantize_static(model, tmp_path / "q.onnx", iter(feeds),
                            op_types_to_quantize=["Conv"], extra_options={"BlockSize": 4})
    assert isinstance(info.value, onnxquant.QuantizationError)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("value", [-1, 2.5, "32", True])
def test_block_size_option_is_checked(value):
    from onnxquant.ort._options import _to_native_config

    with pytest.raises(ValueError, match="BlockSize"):
        _to_native_config(extra_options={"BlockSize": value})
    assert _to_native_config(extra_options={"BlockSize": 0}).weight_block_size is None
