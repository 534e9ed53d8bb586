"""onnxquant.ort: onnxruntime's calibration cache in quantize_static, and the MinMax
calibrator's ``<t>_ReduceMin``/``<t>_ReduceMax`` augmentation, on small models built here."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.core.errors import CalibrationError
from onnxquant.ort import calibrate as cal
from onnxquant.ort import quantize_static
from onnxquant.ort._static_cache import CalibrationCacheError

W = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)


def _model(opset: int = 13) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 2])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    graph = helper.make_graph(nodes, "g", [x], [z], [numpy_helper.from_array(W, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": (rng.normal(size=(3, 2)) * scale).astype(np.float32)} for _ in range(4)]


def _scale_of(path, tensor: str) -> float:
    """The scale of the QuantizeLinear of ``tensor`` in a quantized model."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(inits[node.input[1]])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    return path


def test_the_cache_holds_the_ranges_and_is_reused(model_path, tmp_path):
    cache = tmp_path / "sub" / "cache.json"
    feeds = _feeds()
    quantize_static(model_path, tmp_path / "a.onnx", iter(feeds), calibration_cache_path=cache)
    raw = json.loads(cache.read_text())
    assert raw["CLS"] == "TensorsData" and raw["smooth_quant"] is False
    cached = cal.load_tensors_data(cache)
    assert cached.calibration_method is cal.CalibrationMethod.MinMax
    x = np.stack([f["x"] for f in feeds])
    np.testing.assert_allclose(cached["x"].range_value, (x.min(), x.max()), rtol=1e-6)
    z = np.maximum(x @ W, 0)
    np.testing.assert_allclose(cached["z"].range_value, (z.min(), z.max()), rtol=1e-6)
    # A hit needs no reader and quantizes with exactly the cached ranges: widen one to see it.
    cached["x"] = cal.TensorData(lowest=np.array(-8.0, np.float32),
                                 highest=np.array(8.0, np.float32))
    cal.save_tensors_data(cached, cache)
    quantize_static(model_path, tmp_path / "b.onnx", None, calibration_cache_path=cache)
    assert _scale_of(tmp_path / "b.onnx", "x") == pytest.approx(16 / 255)  # int8 activations


def test_no_reader_and_no_cache_is_a_value_error(model_path, tmp_path):
    for cache in (None, tmp_path / "missing.json"):
        with pytest.raises(ValueError, match="calibration_data_reader") as info:
            quantize_static(model_path, tmp_path / "q.onnx", None, calibration_cache_path=cache)
        assert isinstance(info.value, CalibrationError)
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "missing.json").exists()


def test_a_cache_of_another_method_is_refused(model_path, tmp_path):
    cache = tmp_path / "cache.json"
    quantize_static(model_path, tmp_path / "a.onnx", iter(_feeds()), calibration_cache_path=cache)
    with pytest.raises(CalibrationCacheError, match="MinMax"):
        quantize_static(model_path, tmp_path / "b.onnx", iter(_feeds()),
                        calibrate_method=cal.CalibrationMethod.Entropy,
                        calibration_cache_path=cache)


def test_a_smooth_quant_mismatch_recalibrates(model_path, tmp_path, caplog):
    cache = tmp_path / "cache.json"
    stale = cal.TensorsData(cal.CalibrationMethod.MinMax, {
        "x": cal.TensorData(lowest=np.array(-9.0, np.float32), highest=np.array(9.0, np.float32))})
    cal.save_tensors_data(stale, cache, smooth_quant=True)
    with caplog.at_level(logging.WARNING):
        quantize_static(model_path, tmp_path / "q.onnx", iter(_feeds()),
                        calibration_cache_path=cache)
    assert any("smooth_quant" in r.getMessage() for r in caplog.records)
    assert json.loads(cache.read_text())["smooth_quant"] is False
    assert "z" in cal.load_tensors_data(cache)  # recalibrated on the model, not the stale file


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        cal.load_tensors_data(tmp_path / "none.json")
    with pytest.raises(ValueError, match="not a file"):
        cal.load_tensors_data(tmp_path)


def _conv_clip_matmul() -> onnx.ModelProto:
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Conv", ["A", "B"], ["C"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["C"], ["D"], name="clip"),
             helper.make_node("MatMul", ["D", "E"], ["F"], name="mm")]
    graph = helper.make_graph(
        nodes, "g", [vi("A", TensorProto.FLOAT, [1, 1, 5, 5]),
                     vi("B", TensorProto.FLOAT, [1, 1, 3, 3]),
                     vi("E", TensorProto.FLOAT, [1, 1, 5, 1])],
        [vi("F", TensorProto.FLOAT, [1, 1, 5, 1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("per_channel", [False, True])
def test_minmax_augmentation_has_onnxruntimes_names(tmp_path, per_channel):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_clip_matmul(), path)
    calib = cal.create_calibrator(path, ["Conv", "MatMul"], tmp_path / "aug.onnx",
                                  extra_options={"per_channel": per_channel})
    aug = calib.get_augment_model()
    added = aug.graph.node[3:]
    assert [n.op_type for n in added] == ["ReduceMin", "Reshape", "ReduceMax", "Reshape"] * 6
    for tensor in "ABCDEF":
        for op in ("ReduceMin", "ReduceMax"):
            reduce = next(n for n in added if n.name == f"{tensor}_{op}")
            reshape = next(n for n in added if n.name == f"{tensor}_{op}_Reshape")
            assert reduce.input[0] == tensor and reshape.input[0] == reduce.output[0]
            assert reshape.output[0] == f"{tensor}_{op}"
    assert [o.name for o in aug.graph.output][1:] == [
        f"{t}_{op}" for t in "ABCDEF" for op in ("ReduceMin", "ReduceMax")]
    # The reductions compute what numpy does, per channel or over the whole tensor.
    rng = np.random.default_rng(1)
    feed = {"A": rng.normal(size=(1, 1, 5, 5)).astype(np.float32),
            "B": rng.normal(size=(1, 1, 3, 3)).astype(np.float32),
            "E": rng.normal(size=(1, 1, 5, 1)).astype(np.float32)}
    session = ort.InferenceSession(str(tmp_path / "aug.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    axes = (0, 2, 3) if per_channel else None
    np.testing.assert_array_equal(got["A_ReduceMin"], np.min(feed["A"], axis=axes).reshape(-1))
    np.testing.assert_array_equal(got["E_ReduceMax"], np.max(feed["E"], axis=axes).reshape(-1))


def test_minmax_augmentation_at_opset_18_takes_axes_as_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(opset=18), path)
    calib = cal.create_calibrator(path, augmented_model_path=tmp_path / "aug.onnx",
                                  extra_options={"per_channel": True})
    reduces = [n for n in calib.get_augment_model().graph.node if n.op_type == "ReduceMin"]
    assert len(reduces) == 3 and all(len(n.input) == 2 and not n.attribute[1:] for n in reduces)
    feeds = _feeds()
    calib.collect_data(iter(feeds))
    x = np.concatenate([f["x"] for f in feeds])
    np.testing.assert_array_equal(calib.compute_data()["x"].range_value,
                                  (x.min(axis=0), x.max(axis=0)))
