"""float8 E4M3FN (std-based scales, onnxruntime's rule) and float16 models (float16 scales)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant.core.float_scales import HALF_TINY, float_grid_std, half_params, std_range
from onnxquant.ort import CalibrationMethod, QuantFormat, QuantType
from onnxquant.ort import quantize_static as ort_quantize_static

RNG = np.random.default_rng(0)


def _gemm_model(dtype: int = TensorProto.FLOAT, opset: int = 13) -> onnx.ModelProto:
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    w = RNG.normal(0, 0.1, (16, 8)).astype(np_type)
    b = RNG.normal(0, 0.1, (16,)).astype(np_type)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="gemm")], "g",
        [helper.make_tensor_value_info("x", dtype, [4, 8])],
        [helper.make_tensor_value_info("y", dtype, [4, 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(dtype=np.float32, n: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.normal(0, 1, (4, 8)).astype(dtype)} for _ in range(n)]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _run(path, feed) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_float8_grid_std_is_std_of_all_finite_e4m3fn_values():
    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    finite = values[np.isfinite(values)]
    assert finite.size == 254
    assert float_grid_std(onnxquant.FLOAT8E4M3FN) == pytest.approx(np.std(finite), rel=1e-12)
    low, high = std_range(0.5, onnxquant.FLOAT8E4M3FN)
    scale, zp = onnxquant.core.numerics.compute_scale_zero_point(
        low, high, onnxquant.FLOAT8E4M3FN)
    assert float(scale) == pytest.approx(0.5 / np.std(finite), rel=1e-6)
    assert float(zp) == 0


def test_half_params_are_float16_values_that_keep_the_range_on_the_grid():
    scale, zp = half_params(-1.0, 3.0, onnxquant.UINT8)
    assert np.float32(np.float16(scale)) == scale  # exactly a float16 value
    assert scale >= np.float32(4.0 / 255)  # rounded up, never down
    q = np.rint(np.float32(-1.0) / scale) + zp
    assert q == 0 and np.rint(np.float32(3.0) / scale) + zp <= 255
    tiny, _ = half_params(0.0, 1e-9, onnxquant.UINT8)
    assert float(tiny) == 1.0  # below the smallest normal float16


def test_ort_float8_qdq_gemm_matches_onnxruntime_rules(tmp_path):
    src, out = tmp_path / "f.onnx", tmp_path / "q.onnx"
    float_model = _gemm_model()
    onnx.save(float_model, src)
    feeds = _feeds()
    ort_quantize_static(str(src), str(out), iter(feeds), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QFLOAT8E4M3FN,
                        weight_type=QuantType.QFLOAT8E4M3FN,
                        calibrate_method=CalibrationMethod.Distribution)
    model = onnx.load(out)
    assert model.opset_import[0].version >= 19
    inits = _inits(model)
    w = numpy_helper.to_array(float_model.graph.initializer[0])
    # weight: scale = std(w) / std(float8 grid), zero point float8 0, stored as raw float8
    grid_std = float_grid_std(onnxquant.FLOAT8E4M3FN)
    assert float(inits["w_scale"]) == pytest.approx(np.std(w.astype(np.float64)) / grid_std,
                                                    rel=1e-5)
    w_q = next(i for i in model.graph.initializer if i.name == "w_quantized")
    assert w_q.data_type == TensorProto.FLOAT8E4M3FN and w_q.raw_data
    expected = np.clip(w / inits["w_scale"], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(inits["w_quantized"].astype(np.float32),
                                  expected.astype(np.float32))
    assert all(float(inits[k]) == 0 for k in inits if k.endswith("zero_point"))
    # activation: from the calibration data's std
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    assert float(inits["x_scale"]) == pytest.approx(np.std(x) / grid_std, rel=1e-3)
    # bias kept float behind a Cast
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Cast") == 1 and inits["b_quantized"].dtype == np.float32
    y = _run(out, feeds[0])
    ref = _run(src, feeds[0])
    cos = float(np.dot(y.ravel(), ref.ravel()) / np.linalg.norm(y) / np.linalg.norm(ref))
    assert cos > 0.99


def test_ort_float8_needs_distribution_and_both_types(tmp_path):
    src = tmp_path / "f.onnx"
    onnx.save(_gemm_model(), src)
    with pytest.raises(ValueError, match="Distribution"):
        ort_quantize_static(str(src), str(tmp_path / "q.onnx"), iter(_feeds()),
                            activation_type=QuantType.QFLOAT8E4M3FN,
                            weight_type=QuantType.QFLOAT8E4M3FN)
    with pytest.raises(ValueError, match="both"):
        ort_quantize_static(str(src), str(tmp_path / "q.onnx"), iter(_feeds()),
                            activation_type=QuantType.QFLOAT8E4M3FN,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.Distribution)


def test_native_float8_with_minmax_uses_absmax_over_448(tmp_path):
    src, out = tmp_path / "f.onnx", tmp_path / "q.onnx"
    float_model = _gemm_model()
    onnx.save(float_model, src)
    cfg = onnxquant.StaticQuantConfig(activation_type=onnxquant.FLOAT8E4M3FN,
                                      weight_type=onnxquant.FLOAT8E4M3FN, evaluate=False)
    onnxquant.quantize_static(src, out, _feeds(), cfg)
    inits = _inits(onnx.load(out))
    w = numpy_helper.to_array(float_model.graph.initializer[0])
    assert float(inits["w_scale"]) == pytest.approx(np.abs(w).max() / 448, rel=1e-6)


@pytest.mark.parametrize("act", [onnxquant.UINT8, onnxquant.INT8])
def test_float16_model_gets_float16_scales_and_runs(tmp_path, act):
    src, out = tmp_path / "f16.onnx", tmp_path / "q.onnx"
    onnx.save(_gemm_model(TensorProto.FLOAT16, opset=13), src)
    feeds = _feeds(np.float16)
    cfg = onnxquant.StaticQuantConfig(activation_type=act, weight_type=onnxquant.INT8,
                                      evaluate=False)
    onnxquant.quantize_static(src, out, feeds, cfg)
    model = onnx.load(out)
    assert model.opset_import[0].version >= 19
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 3
    inits = _inits(model)
    for name in ("x_scale", "w_scale"):
        assert inits[name].dtype == np.float16
    # the bias scale is the product of the input and weight scales: float16 when that is a
    # normal float16 value, else float32 with a Cast to float16 after its DequantizeLinear
    product = float(inits["x_scale"]) * float(inits["w_scale"])
    bias_scale = inits["b_quantized_scale"]
    assert float(bias_scale) == pytest.approx(product, rel=1e-3)
    assert bias_scale.dtype == (np.float16 if product >= HALF_TINY else np.float32)
    assert ops.count("Cast") == (0 if product >= HALF_TINY else 1)
    # the DequantizeLinear outputs are float16, so the Gemm stays float16
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and not node.output[0].startswith("b_"):
            assert types.get(node.output[0], TensorProto.FLOAT16) == TensorProto.FLOAT16
    y = _run(out, feeds[0])
    assert y.dtype == np.float16
    ref = _run(src, feeds[0]).astype(np.float32)
    err = np.abs(y.astype(np.float32) - ref).max()
    assert err < 0.05 * np.abs(ref).max()


def test_float16_sums_that_overflow_do_not_look_non_finite(tmp_path):
    """Every activation is finite, but the sum of one exceeds float16's 65504: calibration
    must not take it for a NaN/Inf batch."""
    w = numpy_helper.from_array(np.full((64, 64), 2.0, np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [16, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    feeds = [{"x": np.full((16, 64), 1.0, np.float16)}] * 2  # h = 128 everywhere: sum 131072
    out = tmp_path / "q.onnx"
    onnxquant.quantize_static(model, out, feeds, onnxquant.StaticQuantConfig(evaluate=False))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds[0])[0]
    assert got.dtype == np.float16 and np.allclose(got.astype(np.float32), 128.0, rtol=0.02)


def test_float8_keeps_a_relu_it_cannot_fold(tmp_path):
    rng = np.random.default_rng(2)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    feeds = [{"x": rng.normal(size=(4, 8)).astype(np.float32)} for _ in range(4)]
    from onnxquant.ort import quantize_static

    quantize_static(str(src), str(out), iter(feeds), activation_type=QuantType.QFLOAT8E4M3FN,
                    weight_type=QuantType.QFLOAT8E4M3FN,
                    calibrate_method=CalibrationMethod.Distribution)
    q = onnx.load(out)
    ops = [n.op_type for n in q.graph.node]
    # kept (the symmetric float8 grid holds values < 0), as Max(x, 0): see the Clip test below
    assert "Max" in ops and "Relu" not in ops
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds[0])
    assert np.isfinite(got[0]).all()


def test_float8_clip_before_a_quantize_loads_in_onnxruntime(tmp_path):
    """onnxruntime's Clip+QuantizeLinear fusion throws on float8 zero points: the Clip is
    written as Max/Min with the same bounds."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w2")
    lo = numpy_helper.from_array(np.array(0.0, np.float32), "lo")
    hi = numpy_helper.from_array(np.array(1.5, np.float32), "hi")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Clip", ["h", "lo", "hi"], ["c"], name="clip"),
         helper.make_node("MatMul", ["c", "w2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [w1, w2, lo, hi])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    feeds = [{"x": rng.normal(size=(4, 8)).astype(np.float32)} for _ in range(4)]
    from onnxquant.ort import quantize_static

    quantize_static(str(src), str(out), iter(feeds), activation_type=QuantType.QFLOAT8E4M3FN,
                    weight_type=QuantType.QFLOAT8E4M3FN,
                    calibrate_method=CalibrationMethod.Distribution)
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "Clip" not in ops and "Max" in ops and "Min" in ops
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    got, want = sess.run(None, feeds[0])[0], ref.run(None, feeds[0])[0]
    assert np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9


def test_float16_concat_stays_float_so_onnxruntime_loads_the_model(tmp_path):
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.normal(size=(4, 2, 1, 1)).astype(np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="conv1"),
         helper.make_node("Conv", ["x", "w"], ["b"], name="conv2"),
         helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="concat"),
         helper.make_node("Conv", ["c", "w8"], ["y"], name="conv3")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 4, 4])],
        [w, numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float16), "w8")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    feeds = [{"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float16)} for _ in range(4)]
    out = tmp_path / "q.onnx"
    onnxquant.quantize_static(model, out, feeds, onnxquant.StaticQuantConfig(evaluate=False))
    concat = next(n for n in onnx.load(out).graph.node if n.op_type == "Concat")
    assert list(concat.input) == ["a", "b"]  # the float values, not DequantizeLinear outputs
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, feeds[0])[0].astype(np.float32)).all()


def test_dynamic_float16_layers_run_in_float32_between_casts(tmp_path):
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.normal(size=(32, 16)).astype(np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = tmp_path / "q.onnx"
    onnxquant.quantize_dynamic(model, out, onnxquant.DynamicQuantConfig(objective="size",
                                                                          evaluate=False))
    q = onnx.load(out)
    ops = [n.op_type for n in q.graph.node]
    assert "MatMulInteger" in ops and ops.count("Cast") >= 2
    assert q.graph.output[0].name == "y"
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = rng.normal(size=(4, 32)).astype(np.float16)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x.astype(np.float32) @ numpy_helper.to_array(w).astype(np.float32)
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - want).max() < 0.05 * np.abs(want).max()
