"""Calibration methods end to end: ranges on known distributions, sharding across worker
processes, the statistics cache, bad data, and the ORT-compatible spelling."""

from __future__ import annotations

import json

import model_zoo as zoo
import numpy as np
import onnx
import pytest

import onnxquant
from onnxquant import CalibrationMethod, StaticQuantConfig

METHODS = list(CalibrationMethod)


def _gaussian_with_outliers(n: int = 24, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds for matmul_chain's input 'x' [B, 16]: N(0, 1) plus a few values of ±60."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        x = rng.normal(size=(64, 16)).astype(np.float32)
        if i % 4 == 0:
            x[0, i % 16] = 60.0 if i % 8 == 0 else -60.0
        feeds.append({"x": x})
    return feeds


@pytest.fixture(scope="module")
def chain() -> onnx.ModelProto:
    return zoo.matmul_chain(n=2, dim=16)


def _x_range(model, method, **kwargs) -> tuple[float, float]:
    config = StaticQuantConfig(calibration_method=method, **kwargs)
    return onnxquant.calibrate(model, _gaussian_with_outliers(), config).ranges["x"]


def test_minmax_keeps_outliers_percentile_and_entropy_clip_them(chain):
    low, high = _x_range(chain, CalibrationMethod.MINMAX)
    assert (low, high) == (-60.0, 60.0)
    # 24576 values with 3 outliers per tail: 99.9 cuts 12 values from each tail. (MSE keeps
    # them, rightly: clipping six values by 56 costs more than coarser rounding of the rest.)
    for method in (CalibrationMethod.PERCENTILE, CalibrationMethod.ENTROPY):
        low, high = _x_range(chain, method, percentile=99.9)
        assert 2.0 < high < 15.0 and -15.0 < low < -2.0, (method, low, high)


def test_percentile_parameter_moves_the_range(chain):
    _, wide = _x_range(chain, CalibrationMethod.PERCENTILE, percentile=99.999)
    _, narrow = _x_range(chain, CalibrationMethod.PERCENTILE, percentile=99.0)
    assert 2.0 < narrow < 3.2 < wide  # 99 % of N(0,1) within ±2.58


def test_symmetric_ranges(chain):
    low, high = _x_range(chain, CalibrationMethod.PERCENTILE, symmetric_ranges=True)
    assert low == -high


def test_distribution_uses_observed_extremes_for_integer_types(chain):
    assert _x_range(chain, CalibrationMethod.DISTRIBUTION) == (-60.0, 60.0)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_every_method_quantizes_a_transformer(tmp_path, method):
    model = zoo.transformer_block()
    feeds = zoo.random_feeds(model, 6, seed=1, dims={"B": 2, "S": 5})
    feeds += zoo.random_feeds(model, 6, seed=3, dims={"B": 1, "S": 11})  # dynamic axes vary
    out = tmp_path / "q.onnx"
    result = onnxquant.quantize_static(model, out, feeds,
                                       StaticQuantConfig(calibration_method=method))
    assert result.calibration_samples == 11  # the 10th feed is held back for the accuracy
    assert result.fidelity is not None and result.fidelity.samples == 1
    onnx.checker.check_model(str(out), full_check=True)
    evaluation = zoo.random_feeds(model, 4, seed=2, dims={"B": 2, "S": 7})
    ref, got = zoo.run(model, evaluation), zoo.run(str(out), evaluation)
    assert min(zoo.sqnr_db(r[0], g[0]) for r, g in zip(ref, got, strict=True)) > 15


@pytest.mark.parametrize("method", [CalibrationMethod.MINMAX, CalibrationMethod.ENTROPY,
                                    CalibrationMethod.PERCENTILE], ids=lambda m: m.value)
def test_two_workers_give_the_same_ranges_as_one(method):
    model = zoo.if_subgraph_model()  # includes tensors inside If branches
    feeds = zoo.random_feeds(model, 10, seed=4)
    one = onnxquant.calibrate(model, feeds, StaticQuantConfig(calibration_method=method))
    two = onnxquant.calibrate(model, feeds, StaticQuantConfig(calibration_method=method,
                                                             calibration_workers=2))
    assert two.samples == one.samples == 10
    assert two.ranges == one.ranges


def test_cache_round_trip_and_reuse_across_quantization_settings(tmp_path, chain):
    cache = tmp_path / "calib.json"
    config = StaticQuantConfig(calibration_method=CalibrationMethod.ENTROPY,
                               calibration_cache=cache)
    first = onnxquant.calibrate(chain, _gaussian_with_outliers(), config)
    document = json.loads(cache.read_text())
    assert document["settings"]["method"] == "entropy"
    assert set(document["tensors"]) == set(first.ranges)
    again = onnxquant.calibrate(chain, None, config)  # no data: the cache answers
    assert again.ranges == first.ranges and again.samples == first.samples
    other = StaticQuantConfig(calibration_method=CalibrationMethod.ENTROPY,
                              calibration_cache=cache, per_channel=True,
                              activation_type=onnxquant.UINT8)
    result = onnxquant.quantize_static(chain, tmp_path / "q.onnx", None, other)
    assert result.calibration_samples == first.samples


def test_cache_made_with_other_settings_is_refused(tmp_path, chain):
    cache = tmp_path / "calib.json"
    onnxquant.calibrate(chain, _gaussian_with_outliers(),
                        StaticQuantConfig(calibration_method=CalibrationMethod.PERCENTILE,
                                          calibration_cache=cache))
    before = cache.read_bytes()
    with pytest.raises(onnxquant.CalibrationError, match=r"percentile: cache 99\.999, now 99\.9"):
        onnxquant.calibrate(chain, _gaussian_with_outliers(),
                            StaticQuantConfig(calibration_method=CalibrationMethod.PERCENTILE,
                                              percentile=99.9, calibration_cache=cache))
    with pytest.raises(onnxquant.CalibrationError, match="method: cache 'percentile'"):
        onnxquant.calibrate(chain, None, StaticQuantConfig(calibration_cache=cache))
    assert cache.read_bytes() == before


def test_cache_for_another_model_is_refused(tmp_path, chain):
    cache = tmp_path / "calib.json"
    onnxquant.calibrate(chain, _gaussian_with_outliers(),
                        StaticQuantConfig(calibration_cache=cache))
    cnn = zoo.cnn()
    with pytest.raises(onnxquant.CalibrationError, match="has no statistics for"):
        onnxquant.calibrate(cnn, None, StaticQuantConfig(calibration_cache=cache))


def test_no_data_and_no_cache_is_an_error(chain):
    with pytest.raises(onnxquant.CalibrationError, match="no calibration data"):
        onnxquant.calibrate(chain, None)


def test_histogram_methods_ignore_nan_values_and_report_them(chain, caplog):
    feeds = _gaussian_with_outliers(8)
    feeds[1]["x"][3, 3] = np.nan
    result = onnxquant.calibrate(chain, feeds,
                                 StaticQuantConfig(calibration_method=CalibrationMethod.PERCENTILE))
    assert result.nonfinite["x"] == 1  # one value, left out
    assert np.isfinite(result.ranges["x"]).all()
    assert "NaN/Inf" in caplog.text


def test_empty_reader_is_an_error(chain):
    class Empty:
        def get_next(self):
            return None

    with pytest.raises(onnxquant.CalibrationError, match="no feeds"):
        onnxquant.calibrate(chain, Empty(),
                            StaticQuantConfig(calibration_method=CalibrationMethod.ENTROPY))


def test_ort_spelling_selects_the_methods(tmp_path, chain):
    from onnxquant.ort import CalibrationMethod as OrtMethod
    from onnxquant.ort import quantize_static
    from onnxquant.ort.calibrate import load_tensors_data

    native = {OrtMethod.Entropy: CalibrationMethod.ENTROPY,
              OrtMethod.Percentile: CalibrationMethod.PERCENTILE,
              OrtMethod.Distribution: CalibrationMethod.DISTRIBUTION}
    for method, native_method in native.items():
        cache = tmp_path / f"{method.name}.json"
        quantize_static(chain, tmp_path / "q.onnx", iter(_gaussian_with_outliers(8)),
                        calibrate_method=method, calibration_cache_path=cache,
                        extra_options={"CalibPercentile": 99.9})
        cached = load_tensors_data(cache)  # onnxruntime's cache: the ranges and the method
        assert cached.calibration_method is method
        if method is OrtMethod.Percentile:  # 99.9 % cuts the outliers, symmetrically
            assert 3 < cached["x"].highest == -cached["x"].lowest < 4
        # onnxruntime's Percentile calibrator is symmetric unless told otherwise
        config = StaticQuantConfig(calibration_method=native_method, percentile=99.9,
                                   symmetric_ranges=method is OrtMethod.Percentile)
        expected = onnxquant.calibrate(chain, _gaussian_with_outliers(8), config).ranges["x"]
        np.testing.assert_allclose(cached["x"].range_value, expected, rtol=1e-6)
