"""onnxruntime's JSON calibration cache and its KL helpers, in onnxquant.ort.calibrate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from onnxquant.ort.calibrate import (
    CalibrationMethod,
    TensorData,
    TensorsData,
    entropy,
    load_tensors_data,
    rel_entr,
    save_tensors_data,
)


def test_the_cache_round_trips_in_onnxruntimes_format(tmp_path):
    data = TensorsData(CalibrationMethod.Entropy, {
        "x": TensorData(lowest=np.array([-1.5], np.float32), highest=np.array([2.0], np.float32),
                        hist=np.array([1, 4, 2], np.int64),
                        hist_edges=np.array([-1.5, 0.0, 1.0, 2.0], np.float32))})
    path = tmp_path / "cache.json"
    save_tensors_data(data, path, smooth_quant=True)
    raw = json.loads(path.read_text())
    assert raw["CLS"] == "TensorsData" and raw["smooth_quant"] is True
    assert raw["calibration_method"] == {"CLS": "CalibrationMethod",
                                         "value": "CalibrationMethod.Entropy"}
    assert raw["data"]["x"]["lowest"] == {"data": [-1.5], "dtype": "float32",
                                          "CLS": "numpy.array"}
    back = load_tensors_data(path)
    assert back.calibration_method is CalibrationMethod.Entropy
    np.testing.assert_array_equal(back["x"].hist, [1, 4, 2])
    assert back["x"].hist.dtype == np.int64 and back["x"].lowest.dtype == np.float32
    assert back["x"].range_value == (-1.5, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_a_file_without_tensors_data_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a calibration cache"):
        load_tensors_data(path)


def test_entropy_and_rel_entr_against_closed_forms():
    p, q = np.array([1.0, 2.0, 1.0]), np.array([2.0, 1.0, 1.0])
    pn, qn = p / p.sum(), q / q.sum()
    assert entropy(p) == pytest.approx(-sum(x * math.log(x) for x in pn))
    assert entropy(p, q) == pytest.approx(sum(a * math.log(a / b) for a, b in zip(pn, qn,
                                                                                 strict=True)))
    assert entropy(p, q, base=2) == pytest.approx(entropy(p, q) / math.log(2))
    np.testing.assert_array_equal(rel_entr([0.0, 1.0, 1.0], [0.0, 0.0, -1.0]),
                                  [0.0, np.inf, np.inf])
    assert entropy([0.0, 1.0]) == 0.0
