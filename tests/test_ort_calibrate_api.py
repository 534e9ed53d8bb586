"""onnxquant.ort.calibrate: onnxruntime's calibrator classes, TensorData/TensorsData and
create_calibrator, checked against numpy references on a small model built here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.core.errors import CalibrationError
from onnxquant.ort import calibrate as cal
from onnxquant.ort._errors import InvalidOptionError

SCALE = np.array([1.0, -2.0, 0.5], np.float32).reshape(1, 3, 1)


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 4])
    z = helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 3, 4])
    nodes = [helper.make_node("Mul", ["X", "C"], ["Y"], name="mul"),
             helper.make_node("Relu", ["Y"], ["Z"], name="relu")]
    graph = helper.make_graph(nodes, "g", [x], [z], [numpy_helper.from_array(SCALE, "C")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tensors(x: np.ndarray) -> dict[str, np.ndarray]:
    y = x * SCALE
    return {"X": x, "Y": y, "Z": np.maximum(y, 0)}


class Reader:
    def __init__(self, batches: list[np.ndarray]) -> None:
        self.it = iter(batches)

    def get_next(self):
        return next(({"X": b} for b in self.it), None)


@pytest.fixture
def batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(2, 3, 4)).astype(np.float32) * (i + 1) for i in range(5)]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    return path


def _create(model_path, tmp_path, method, **extra):
    return cal.create_calibrator(model_path, augmented_model_path=tmp_path / "aug.onnx",
                                 calibrate_method=method, extra_options=extra)


def test_select_tensors_skips_initializers(model_path, tmp_path):
    calib = cal.MinMaxCalibrater(model_path, augmented_model_path=tmp_path / "a.onnx")
    names, infos = calib.select_tensors_to_calibrate(calib.model)
    assert names == {"X", "Y", "Z"}
    assert "C" not in names and "X" in infos
    only_relu = cal.MinMaxCalibrater(model_path, ["Relu"], tmp_path / "a.onnx")
    assert only_relu.select_tensors_to_calibrate(only_relu.model)[0] == {"Y", "Z"}


def test_minmax_matches_numpy(model_path, tmp_path, batches):
    calib = _create(model_path, tmp_path, cal.CalibrationMethod.MinMax)
    assert (tmp_path / "aug.onnx").exists()
    calib.collect_data(Reader(batches))
    data = calib.compute_data()
    assert isinstance(data, cal.TensorsData)
    assert data.calibration_method is cal.CalibrationMethod.MinMax
    assert set(data.keys()) == {"X", "Y", "Z"}
    for name in data:
        values = np.concatenate([_tensors(b)[name].ravel() for b in batches])
        low, high = data[name].range_value
        assert low.dtype == np.float32 and low.shape == (1,)
        np.testing.assert_array_equal(low, [values.min()])
        np.testing.assert_array_equal(high, [values.max()])


def test_minmax_symmetric_and_moving_average(model_path, tmp_path, batches):
    sym = _create(model_path, tmp_path, "MinMax", symmetric=True)
    sym.collect_data(Reader(batches))
    y = np.concatenate([_tensors(b)["Y"].ravel() for b in batches])
    m = np.abs(y).max()
    np.testing.assert_array_equal(sym.compute_data()["Y"].range_value, ([-m], [m]))

    avg = _create(model_path, tmp_path, cal.CalibrationMethod.MinMax, moving_average=True)
    avg.collect_data(Reader(batches))
    lows = [_tensors(b)["Y"].min() for b in batches]
    highs = [_tensors(b)["Y"].max() for b in batches]
    low, high = avg.compute_data()["Y"].range_value
    np.testing.assert_allclose(low, [np.mean(lows)], rtol=1e-6)
    np.testing.assert_allclose(high, [np.mean(highs)], rtol=1e-6)
    # A second collect_data call is merged as old + c * (new - old).
    avg.collect_data(Reader(batches[:1]))
    low2, _ = avg.compute_data()["Y"].range_value
    np.testing.assert_allclose(low2, low + 0.01 * (lows[0] - low), rtol=1e-6)


def test_minmax_strided_keeps_every_batch(model_path, tmp_path, batches):
    calib = _create(model_path, tmp_path, "MinMax", max_intermediate_outputs=2)
    calib.collect_data(Reader(batches))  # 5 batches: onnxruntime would keep only the last one
    x = np.concatenate([b.ravel() for b in batches])
    np.testing.assert_array_equal(calib.compute_data()["X"].range_value,
                                  ([x.min()], [x.max()]))


def test_minmax_per_channel(model_path, tmp_path, batches):
    calib = _create(model_path, tmp_path, "MinMax", per_channel=True)
    calib.collect_data(Reader(batches))
    y = np.concatenate([_tensors(b)["Y"] for b in batches])
    low, high = calib.compute_data()["Y"].range_value
    np.testing.assert_array_equal(low, y.min(axis=(0, 2)))
    np.testing.assert_array_equal(high, y.max(axis=(0, 2)))


def test_percentile_close_to_numpy(model_path, tmp_path, batches):
    calib = _create(model_path, tmp_path, cal.CalibrationMethod.Percentile, percentile=99.0)
    calib.collect_data(Reader(batches))
    data = calib.compute_data()
    y = np.concatenate([_tensors(b)["Y"].ravel() for b in batches])
    low, high = data["Y"].range_value
    width = float(data["Y"].bins[1] - data["Y"].bins[0])
    ours = max(-low, high)  # symmetric threshold, then clipped to the observed range
    # 99 % of |y| lie within the threshold, to within a bin.
    assert np.mean(np.abs(y) <= ours + width) >= 0.99
    assert np.mean(np.abs(y) < ours - width) <= 0.99
    assert low == max(-ours, np.float32(y.min())) and high == min(ours, np.float32(y.max()))
    assert int(data["Y"].hist.sum()) == y.size


def test_entropy_default_bins_is_clipped_absmax(model_path, tmp_path, batches):
    # With num_bins == num_quantized_bins == 128 onnxruntime's search has one candidate: the
    # whole histogram, i.e. (-max|x|, max|x|) clipped to the observed range.
    calib = _create(model_path, tmp_path, cal.CalibrationMethod.Entropy)
    calib.collect_data(Reader(batches))
    data = calib.compute_data()
    assert data.calibration_method is cal.CalibrationMethod.Entropy
    z = np.concatenate([_tensors(b)["Z"].ravel() for b in batches])
    low, high = data["Z"].range_value
    assert low == np.float32(z.min()) and high == np.float32(z.max())


def test_distribution_moments(model_path, tmp_path, batches):
    calib = _create(model_path, tmp_path, cal.CalibrationMethod.Distribution)
    calib.collect_data(Reader(batches))
    td = calib.compute_data()["Y"]
    y = np.concatenate([_tensors(b)["Y"].ravel() for b in batches]).astype(np.float64)
    avg, std = td.avg_std
    np.testing.assert_allclose([avg, std], [y.mean(), y.std()], rtol=1e-5)
    assert td.lowest <= y.min() and td.highest >= y.max()


def test_errors(model_path, tmp_path):
    with pytest.raises(InvalidOptionError, match="num_bins"):
        _create(model_path, tmp_path, "MinMax", num_bins=10)
    with pytest.raises(InvalidOptionError, match="calibrate_method"):
        _create(model_path, tmp_path, "Bogus")
    calib = _create(model_path, tmp_path, "MinMax")
    with pytest.raises(CalibrationError, match="No data"):
        calib.collect_data(Reader([]))


def test_tensor_data_validation_and_dict_behaviour():
    with pytest.raises(ValueError, match="Unexpected value"):
        cal.TensorData(foo=1)
    with pytest.raises(ValueError, match="dtype"):
        cal.TensorData(lowest=np.float64(1.0))
    with pytest.raises(ValueError, match="type"):
        cal.TensorData(lowest=1.0)
    lo, hi = np.float32(-1), np.float32(2)
    tds = cal.TensorsData(cal.CalibrationMethod.MinMax, {"a": (lo, hi)})
    assert tds["a"].range_value == (lo, hi) and "a" in tds and list(tds) == ["a"]
    tds["a"] = cal.TensorData(lowest=hi, highest=hi)
    assert tds["a"].lowest == hi
    with pytest.raises(RuntimeError, match="existing"):
        tds["b"] = cal.TensorData(lowest=lo, highest=hi)
    four = cal.TensorsData(cal.CalibrationMethod.Entropy, {"a": (lo, hi, [1], [0, 1])})
    assert four["a"].hist == [1] and four["a"].bins == [0, 1]
    with pytest.raises(TypeError):
        cal.TensorsData(cal.CalibrationMethod.Entropy, {"a": (lo, hi)})
    with pytest.raises(AttributeError):
        _ = four["a"].avg_std
    d = four["a"].to_dict()
    assert d["CLS"] == "TensorData" and cal.TensorData.from_dict(d) == four["a"]
