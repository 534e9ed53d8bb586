"""onnxquant.ort's quantizer classes (QDQQuantizer, ONNXQuantizer, MatMulBnb4Quantizer),
get_qdq_config and the extra quant_utils helpers, against independent numpy references."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxquant.ort import QDQQuantizer, QuantType, get_qdq_config
from onnxquant.ort import quant_utils as qu
from onnxquant.ort.calibrate import TensorData
from onnxquant.ort.matmul_bnb4_quantizer import MatMulBnb4Quantizer
from onnxquant.ort.onnx_quantizer import ONNXQuantizer
from onnxquant.ort.quant_utils import QuantizationMode
from onnxquant.weight_only.bnb4 import BNB4_TABLES, dequantize_bnb4, quantize_bnb4

# -- block-wise parameters and initializers ----------------------------------------------------


def _blocked_reference(w: np.ndarray, axis: int, bs: int, qmin: int, qmax: int, sym: bool):
    """Loop-per-block reference of onnxruntime's documented block-wise rule."""
    w = np.moveaxis(w, axis, 0)
    nb = -(-w.shape[0] // bs)
    scales = np.zeros((nb, w.shape[1]))
    zps = np.zeros((nb, w.shape[1]))
    for b in range(nb):
        for c in range(w.shape[1]):
            block = w[b * bs:(b + 1) * bs, c]
            lo, hi = min(block.min(), 0.0), max(block.max(), 0.0)
            if sym:
                hi = max(-lo, hi)
                lo = -hi
            s = (hi - lo) / (qmax - qmin)
            zp = round((qmin + qmax) / 2) if sym else np.round(qmin - lo / s) if s else 0
            scales[b, c], zps[b, c] = (s, zp) if s >= np.finfo(np.float32).tiny else (1.0, 0)
    return np.moveaxis(zps, 0, axis), np.moveaxis(scales, 0, axis)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("sym, qtype, qmin, qmax", [(True, TP.INT8, -127, 127),
                                                    (False, TP.UINT8, 0, 255)])
def test_compute_scale_zp_blocked_matches_reference(axis, sym, qtype, qmin, qmax):
    rng = np.random.default_rng(3)
    w = rng.uniform(-1, 2, (10, 6)).astype(np.float32)
    w[:4, 0] = 0.0  # an all-zero block (axis 0)
    zps, scales = qu.compute_scale_zp_blocked(w, qtype, axis=axis, block_size=4, symmetric=sym)
    ref_zp, ref_scale = _blocked_reference(w.astype(np.float64), axis, 4, qmin, qmax, sym)
    expected_shape = (3, 6) if axis == 0 else (10, 2)
    assert scales.shape == zps.shape == expected_shape
    assert scales.dtype == np.float32 and zps.dtype == (np.int8 if sym else np.uint8)
    np.testing.assert_allclose(scales, ref_scale.astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(zps, ref_zp)
    if axis == 0:
        assert scales[0, 0] == 1.0 and zps[0, 0] == (0 if sym else 0)


def test_quantize_onnx_initializer_blocked_round_trip():
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, (4, 10)).astype(np.float32)
    zps, scales = qu.compute_scale_zp_blocked(w, TP.INT8, axis=1, block_size=4, symmetric=True)
    q = numpy_helper.to_array(qu.quantize_onnx_initializer(
        numpy_helper.from_array(w, "W"), TP.INT8, zps, scales, axis=1, block_size=4))
    full = np.repeat(scales, 4, axis=1)[:, :10]
    expected = np.clip(np.rint(w / full), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(q, expected)
    assert np.abs(q * full - w).max() <= 0.5 * scales.max() + 1e-7


def test_quantize_onnx_initializer_per_channel_and_int4_packing():
    w = np.array([[-1.0, 0.5, 1.0], [2.0, -2.0, 0.0]], dtype=np.float32)
    scale = np.array([1 / 7, 2 / 7], dtype=np.float32)
    tensor = qu.quantize_onnx_initializer(numpy_helper.from_array(w, "W"), TP.INT4,
                                          np.zeros(2, np.int8), scale, axis=0)
    assert tensor.name == "W_quantized" and tensor.data_type == TP.INT4
    expected = np.clip(np.rint(w / scale[:, None]), -8, 7).astype(np.int8).ravel()  # -7 4 7 7 -7 0
    nibbles = [b & 0xF for b in tensor.raw_data for b in (b, b >> 4)][:6]
    np.testing.assert_array_equal(np.array(nibbles, np.uint8), expected.astype(np.uint8) & 0xF)


# -- snapping, opsets, metadata ----------------------------------------------------------------


@pytest.mark.parametrize("rmin, rmax, qmax, mrr, zp, scale", [
    (0.0, 2.0, 255, None, 0, 2.0 / 255),
    (-1.0, 2.0, 255, None, 128, max(1 / 128, 2 / 127)),
    (-1.0, 2.0, 127, None, 64, max(1 / 64, 2 / 63)),
    (0.0, 0.0, 255, None, 0, 1.0),
    (-1e-9, 1e-9, 255, 1e-4, 128, 1e-4 / 255),
])
def test_snap_zero_point_to_uint8(rmin, rmax, qmax, mrr, zp, scale):
    got_zp, got_scale = qu.snap_zero_point_to_uint8(rmin, rmax, 0, qmax, min_real_range=mrr)
    assert int(got_zp) == zp
    assert got_scale == np.float32(scale)


def _empty(opset: int) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph([], "g", [], []),
                             opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("weight, act, overrides, expected", [
    (QuantType.QInt16, None, None, 21), (QuantType.QInt8, QuantType.QUInt16, None, 21),
    (QuantType.QInt8, QuantType.QUInt8, None, 20),
    (QuantType.QInt8, QuantType.QUInt8, {"w": [{"quant_type": QuantType.QUInt16}]}, 21),
])
def test_update_opset_version(weight, act, overrides, expected):
    model = qu.update_opset_version(_empty(20), weight, act, overrides)
    assert qu.get_opset_version(model) == expected


def test_load_model_with_shape_infer_marks_metadata(tmp_path):
    model = _add_model(opset=13)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert not qu.model_has_infer_metadata(model)
    assert qu.model_has_infer_metadata(qu.load_model_with_shape_infer(path))


# -- get_qdq_config ----------------------------------------------------------------------------


def _add_model(opset: int = 21, weight: np.ndarray | None = None) -> onnx.ModelProto:
    w = np.ones((2, 3), np.float32) if weight is None else weight
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add0"),
         helper.make_node("Relu", ["y"], ["z"], name="relu0")], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", TP.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_get_qdq_config_options_and_op_types():
    config = get_qdq_config(_add_model(), None, calibrate_args={"percentile": 99.9},
                            min_real_range=0.01, nodes_to_exclude=lambda m, n: n.name == "relu0",
                            extra_options={"ActivationSymmetric": True})
    assert config.op_types_to_quantize == ["Add"] and config.nodes_to_exclude == ["relu0"]
    assert config.activation_type is QuantType.QUInt8
    assert config.extra_options["CalibPercentile"] == 99.9
    assert config.extra_options["MinimumRealRange"] == 0.01
    assert config.extra_options["ForceQuantizeNoInputCheck"] is True
    assert config.extra_options["ActivationSymmetric"] is True
    assert not config.use_external_data_format


@pytest.mark.parametrize("opset, act, overrides, contrib", [
    (19, QuantType.QUInt8, {"w": [{"quant_type": QuantType.QInt4}]}, True),
    (19, QuantType.QUInt16, {"w": [{"quant_type": QuantType.QInt4}]}, False),
    (21, QuantType.QUInt8, {"w": [{"quant_type": QuantType.QInt4}]}, False),
    (19, QuantType.QUInt16, None, False),
])
def test_get_qdq_config_contrib_ops_rule(opset, act, overrides, contrib):
    config = get_qdq_config(_add_model(opset), None, activation_type=act,
                            tensor_quant_overrides=overrides)
    assert config.extra_options.get("UseQDQContribOps", False) is contrib


# -- QDQQuantizer / ONNXQuantizer with given ranges --------------------------------------------


def _td(lo: float, hi: float) -> TensorData:
    return TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_qdq_quantizer_uses_the_given_ranges():
    w = np.array([[-0.5, 0.25, 1.0], [0.0, 0.75, -0.25]], np.float32)
    model = _add_model(13, w)
    before = model.SerializeToString()
    ranges = {"x": _td(-1.0, 3.0), "y": _td(-2.0, 6.0), "z": _td(0.0, 6.0)}
    quantizer = QDQQuantizer(model, False, False, QuantType.QInt8, QuantType.QUInt8, ranges,
                             [], [], ["Add"], {})
    quantized = quantizer.quantize_model()
    assert quantizer.model.model is quantized and model.SerializeToString() == before
    inits = _inits(quantized)
    assert inits["x_scale"] == np.float32(4 / 255) and inits["x_zero_point"] == 64
    assert inits["y_scale"] == np.float32(8 / 255) and inits["y_zero_point"] == 64
    # a constant input of Add takes the activation type (uint8, asymmetric) over [-0.5, 1]
    w_scale = np.float32(1.5 / 255)
    assert inits["w_scale"] == w_scale and inits["w_zero_point"] == 85
    expected = np.clip(np.rint(w / w_scale) + 85, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(inits["w_quantized"], expected)
    ops = [n.op_type for n in quantizer.model.nodes()]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 3


def test_qdq_quantizer_without_ranges_keeps_nodes_float():
    quantizer = QDQQuantizer(_add_model(13), False, False, QuantType.QInt8, QuantType.QUInt8,
                             {}, [], [], [], {})
    ops = {n.op_type for n in quantizer.quantize_model().graph.node}
    assert ops == {"Add", "Relu"}


def _matmul_model() -> onnx.ModelProto:
    w = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1, 2])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_onnx_quantizer_static_qoperator():
    quantizer = ONNXQuantizer(_matmul_model(), False, False, QuantizationMode.QLinearOps, True,
                              QuantType.QInt8, QuantType.QUInt8,
                              {"x": _td(0.0, 2.0), "y": _td(-4.0, 4.0)}, [], [], [], {})
    quantized = quantizer.quantize_model()
    assert "QLinearMatMul" in {n.op_type for n in quantized.graph.node}
    scales = {float(v) for k, v in _inits(quantized).items() if k.endswith("scale")}
    assert float(np.float32(2 / 255)) in scales and float(np.float32(8 / 255)) in scales


def _contrib_chain() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W1"], ["T1"]),
         helper.make_node("FusedMatMul", ["T1", "W2"], ["T2"], domain="com.microsoft"),
         helper.make_node("MatMul", ["T2", "W3"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TP.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TP.FLOAT, [1, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"W{i}")
         for i in (1, 2, 3)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)])


def test_onnx_quantizer_dynamic_needs_a_default_type_for_untyped_tensors():
    args = (False, False, QuantizationMode.IntegerOps, False, QuantType.QInt8, QuantType.QUInt8,
            None, [], [], ["MatMul"])
    with pytest.raises(RuntimeError, match="T2"):
        ONNXQuantizer(_contrib_chain(), *args, {}).quantize_model()
    quantized = ONNXQuantizer(_contrib_chain(), *args, {"DefaultTensorType": 1}).quantize_model()
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops


# -- bnb4 --------------------------------------------------------------------------------------


def _nearest_codes(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Brute force: the code of the nearest table value (ties: the smaller value)."""
    codes = []
    for v in x:
        dist = np.abs(table.astype(np.float64) - v)
        best = np.flatnonzero(dist == dist.min())
        codes.append(best[np.argmin(table[best])] if len(best) > 1 else best[0])
    return np.array(codes)


@pytest.mark.parametrize("quant_type", [0, 1])
def test_quantize_bnb4_matches_brute_force(quant_type):
    rng = np.random.default_rng(quant_type)
    w = rng.standard_normal((5, 7)).astype(np.float32)  # 35 values: odd, 3 blocks of 16
    packed, absmax = quantize_bnb4(w, quant_type, 16)
    flat = w.T.ravel()
    ref_absmax = [np.abs(flat[i:i + 16]).max() for i in range(0, 35, 16)]
    np.testing.assert_array_equal(absmax, np.array(ref_absmax, np.float32))
    table = BNB4_TABLES[quant_type]
    scaled = flat * np.repeat(1 / np.array(ref_absmax, np.float32), 16)[:35]
    codes = _nearest_codes(np.append(scaled, 0.0), table)
    if quant_type == 0:  # FP4: +0 and -0 share the value 0; the sign comes from the value
        codes = np.where(np.append(scaled, 0.0) == 0, 0, codes)
    np.testing.assert_array_equal(packed, (codes[0::2] << 4) | codes[1::2])
    restored = dequantize_bnb4(packed, absmax, quant_type, 16, 5, 7)
    np.testing.assert_allclose(restored, table[codes[:35]].reshape(7, 5).T
                               * np.repeat(absmax, 16)[:35].reshape(7, 5).T)


def test_matmul_bnb4_quantizer_graph_and_run():
    table = BNB4_TABLES[1]
    w = np.resize(table, 32 * 8).reshape(8, 32).T.copy()  # exact NF4 values: lossless
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2, 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    quantizer = MatMulBnb4Quantizer(model, 1, 32)
    quantizer.process()
    out = quantizer.model.model
    (node,) = out.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain, node.name) == ("MatMulBnb4", "com.microsoft", "mm_Bnb4")
    assert attrs == {"K": 32, "N": 8, "block_size": 32, "quant_type": 1}
    assert sorted(_inits(out)) == ["w_Bnb4", "w_absmax"] and len(model.graph.node) == 1
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    session = onnxruntime.InferenceSession(out.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ w, rtol=1e-4, atol=1e-4)
