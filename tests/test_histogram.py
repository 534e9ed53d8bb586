"""HistogramObserver (exact, mergeable binning) and the range methods built on it."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxquant.calibration import histogram as histogram_module
from onnxquant.calibration import methods
from onnxquant.calibration.histogram import HistogramObserver
from onnxquant.calibration.methods import (
    distribution_stats,
    entropy_range,
    kl_divergences,
    minmax_range,
    mse_range,
    percentile_range,
)


def observe(values: np.ndarray, max_bins: int = 2048) -> HistogramObserver:
    h = HistogramObserver(max_bins=max_bins)
    h.update(values)
    return h


def state(h: HistogramObserver) -> tuple:
    return (h.exponent, h.origin, h.counts.tolist(), h.low, h.high, h.count, h.nonfinite)


def qdq_mse(x: np.ndarray, low: float, high: float, levels: int = 256) -> float:
    """Mean squared error of asymmetric quantization to ``levels`` levels (zero on the grid)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (levels - 1)
    zero_point = np.round(-low / scale)
    q = np.clip(np.round(x / scale) + zero_point, 0, levels - 1)
    return float(np.mean((x - (q - zero_point) * scale) ** 2))


# --- exact binning and merging ------------------------------------------------------------------

finite = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, width=64)
scaled = st.tuples(st.floats(-1, 1, allow_nan=False), st.integers(-60, 60)).map(
    lambda t: math.ldexp(t[0], t[1])
)
special = st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1.0, -1.0, math.nan, math.inf, -math.inf])
values = st.one_of(finite, scaled, special)


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(values, min_size=0, max_size=60),
    dtype=st.sampled_from([np.float64, np.float32, np.float16]),
    max_bins=st.sampled_from([2, 3, 8, 33, 2048]),
    cuts=st.lists(st.integers(0, 60), max_size=5),
    rng_seed=st.integers(0, 2**32 - 1),
)
def test_merge_and_any_split_give_identical_state(data, dtype, max_bins, cuts, rng_seed):
    with np.errstate(over="ignore"):  # large float64 values become ±inf in float32/16
        x = np.array(data, dtype=np.float64).astype(dtype)
    whole = observe(x, max_bins)
    pieces = np.split(x, sorted(c for c in cuts if c <= x.size))
    order = np.random.default_rng(rng_seed).permutation(len(pieces))

    streamed = HistogramObserver(max_bins=max_bins)
    for k in order:
        streamed.update(pieces[k])
    shards = [observe(pieces[k], max_bins) for k in order]
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge(shard)

    for h in (streamed, merged):
        assert state(h) == state(whole)
        assert h.total == pytest.approx(whole.total, rel=1e-9, abs=1e-300)
    finite_x = x[np.isfinite(x)].astype(np.float64)
    assert whole.count == finite_x.size == int(whole.counts.sum())
    assert whole.nonfinite == x.size - finite_x.size
    if finite_x.size:
        assert whole.counts.size <= max_bins
        assert whole.counts[0] > 0 and whole.counts[-1] > 0  # origin/size are the tight cover
        assert (whole.low, whole.high) == (finite_x.min(), finite_x.max())
        # minimal exponent: one finer would need more than max_bins bins
        magnitude = max(abs(whole.low), abs(whole.high))
        floor = max(-1074, math.frexp(magnitude)[1] - 52) if magnitude else -1074
        assert whole.exponent >= floor
        if whole.exponent > floor:
            w = Fraction(2) ** (whole.exponent - 1)
            finer = math.floor(Fraction(whole.high) / w) - math.floor(Fraction(whole.low) / w) + 1
            assert finer > max_bins
        if np.abs(finite_x).max() < 1e300:
            ref, _ = np.histogram(finite_x, bins=whole.edges())
            assert ref.tolist() == whole.counts.tolist()


def test_rebinning_over_growing_batches_matches_np_histogram():
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, 10.0**k, size=2000) + 3 * k for k in range(-3, 4)]
    h = HistogramObserver(max_bins=256)
    for batch in batches:
        h.update(batch.astype(np.float32))
    data = np.concatenate(batches).astype(np.float32).astype(np.float64)
    ref, _ = np.histogram(data, bins=h.edges())
    assert h.counts.tolist() == ref.tolist()
    assert h.counts.sum() == data.size == h.count
    assert 128 < h.counts.size <= 256


def test_large_update_uses_several_chunks_and_stays_exact(monkeypatch):
    monkeypatch.setattr(histogram_module, "_CHUNK", 1000)
    x = np.random.default_rng(2).standard_normal(10_501).astype(np.float32)
    h = observe(x)
    ref, _ = np.histogram(x.astype(np.float64), bins=h.edges())
    assert h.counts.tolist() == ref.tolist()
    assert h.total == pytest.approx(float(x.astype(np.float64).sum()), abs=1e-9)


def test_merge_across_huge_exponent_gap():
    zeros = observe(np.zeros(10))
    assert (zeros.exponent, zeros.origin, zeros.counts.tolist()) == (-1074, 0, [10])
    big = observe(np.array([-3.0e6, 5.0e6]))
    zeros.merge(big)
    assert state(zeros) == state(observe(np.r_[np.zeros(10), -3.0e6, 5.0e6]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_tiny_negative_values_stay_below_zero_on_a_coarse_grid(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([-tiny, tiny, 0.0, 3.0e4], dtype=dtype)
    h = observe(x)
    assert h.exponent >= 1 and h.origin == -1  # -tiny / w underflows, but its bin is -1
    assert h.counts[0] == 1 and h.counts[1] == 2
    ref, _ = np.histogram(x.astype(np.float64), bins=h.edges())
    assert h.counts.tolist() == ref.tolist()


def test_merge_rejects_different_bin_counts():
    with pytest.raises(ValueError, match="max_bins 2048 and 64"):
        observe(np.ones(3)).merge(observe(np.ones(3), max_bins=64))


def test_nan_and_inf_are_counted_and_ignored():
    x = np.array([1.0, np.nan, -2.0, np.inf, 3.0, -np.inf], dtype=np.float32)
    h = observe(x)
    clean = observe(np.array([1.0, -2.0, 3.0], dtype=np.float32))
    assert h.nonfinite == 3 and h.count == 3
    assert state(h)[:-1] == state(clean)[:-1]
    assert (h.total, h.total_sq) == (2.0, 14.0)
    only_nan = observe(np.full(4, np.nan))
    assert not only_nan.observed and only_nan.nonfinite == 4 and only_nan.counts.size == 0
    with pytest.raises(ValueError, match="no finite values"):
        minmax_range(only_nan)


def test_empty_update_is_a_no_op():
    h = observe(np.array([1.0, 2.0]))
    before = state(h)
    h.update(np.zeros((0, 3), dtype=np.float16))
    assert state(h) == before


@pytest.mark.parametrize("value", [0.0, 7.0, -3.5e-20, 6.0e30])
def test_constant_tensor_is_one_bin(value):
    h = observe(np.full((5, 20), value, dtype=np.float64))
    assert h.counts.tolist() == [100]
    assert h.low == h.high == value
    assert h.edges()[0] <= value < h.edges()[1]
    for method in (minmax_range, percentile_range, entropy_range, mse_range):
        assert method(h) == (value, value)
    assert percentile_range(h, symmetric=True) == (value, value)
    assert distribution_stats(h)[0] == pytest.approx(value)


def test_float16_input():
    x = (np.random.default_rng(3).standard_normal(5000) * 8).astype(np.float16)
    h = observe(x)
    ref, _ = np.histogram(x.astype(np.float64), bins=h.edges())
    assert h.counts.tolist() == ref.tolist()
    assert (h.low, h.high) == (float(x.min()), float(x.max()))
    assert h.total == float(x.astype(np.float64).sum())


def test_abs_histogram_folds_exactly_at_zero():
    x = np.random.default_rng(4).normal(0.7, 1.0, 20_000)
    h = observe(x)
    counts, width = h.abs_histogram()
    assert width == h.width
    ref, _ = np.histogram(np.abs(x), bins=np.arange(counts.size + 1) * width)
    assert counts.tolist() == ref.tolist()
    positive, _ = h.abs_histogram(side="positive")
    negative, _ = h.abs_histogram(side="negative")
    assert positive.sum() == (x >= 0).sum() and negative.sum() == (x < 0).sum()
    assert negative.size == math.floor(-x.min() / width) + 1


def test_abs_histogram_of_values_far_from_zero_is_coarsened():
    h = observe(np.array([1000.0, 1000.5, 1001.0]))
    counts, width = h.abs_histogram()
    assert counts.size <= 2048 and counts.sum() == 3
    assert (counts.size - 1) * width <= 1001.0 < counts.size * width
    nonzero = np.flatnonzero(counts)
    assert nonzero.tolist() == [round(1000.0 / width), round(1000.5 / width), round(1001 / width)]


def test_to_dict_round_trip():
    h = observe(np.array([0.25, -3.0, np.nan, 8.5, 1e-3], dtype=np.float32), max_bins=64)
    text = json.dumps(h.to_dict(), allow_nan=False)
    back = HistogramObserver.from_dict(json.loads(text))
    assert state(back) == state(h) and back.max_bins == 64
    assert (back.total, back.total_sq) == (h.total, h.total_sq)
    back.update(np.array([100.0]))
    h.update(np.array([100.0]))
    assert state(back) == state(h)
    empty = HistogramObserver.from_dict(json.loads(json.dumps(HistogramObserver().to_dict())))
    assert not empty.observed and empty.low == math.inf
    bad = h.to_dict() | {"count": 99}
    with pytest.raises(ValueError, match="inconsistent"):
        HistogramObserver.from_dict(bad)


# --- range methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [99.999, 99.9, 95.0])
def test_percentile_matches_numpy_within_a_bin(percentile):
    x = np.random.default_rng(5).standard_t(4, size=100_003)
    h = observe(x)
    low, high = percentile_range(h, percentile)
    cut = (100 - percentile) / 2
    ref_low, ref_high = np.percentile(x, [cut, 100 - cut], method="inverted_cdf")
    assert abs(low - ref_low) <= h.width and abs(high - ref_high) <= h.width
    assert x.min() <= low < high <= x.max()


def test_symmetric_percentile_is_on_abs_values():
    x = np.random.default_rng(6).normal(1.0, 1.0, 100_003)
    h = observe(x)
    low, high = percentile_range(h, 99.9, symmetric=True)
    _, width = h.abs_histogram()
    t = np.percentile(np.abs(x), 99.9, method="inverted_cdf")
    assert abs(high - t) <= width and low == max(-high, x.min())
    positive = observe(np.abs(x))
    low, high = percentile_range(positive, 99.9, symmetric=True)
    assert low == np.abs(x).min() and abs(high - t) <= width


def test_outliers_are_clipped_by_percentile_and_entropy_not_minmax():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(1_000_000), [1000.0, 900.0, -1000.0, -950.0]])
    h = observe(x, max_bins=1 << 15)
    assert minmax_range(h) == (-1000.0, 1000.0)
    for low, high in (percentile_range(h), entropy_range(h)):
        assert 3.0 < high < 10.0 and -10.0 < low < -3.0
    default_bins = observe(np.concatenate([rng.standard_normal(200_000), [30.0, -30.0]]))
    low, high = entropy_range(default_bins)
    assert -15.0 < low and high < 15.0


def test_entropy_keeps_a_uniform_distribution():
    x = np.random.default_rng(8).uniform(-1.0, 1.0, 500_000)
    low, high = entropy_range(observe(x))
    assert low < -0.97 and high > 0.97


def reference_kl(counts: np.ndarray, nq: int) -> np.ndarray:
    """Plain-loop TensorRT KL search (q zero where p is zero; proportional groups)."""
    counts = counts.astype(np.float64)
    out = []
    for i in range(nq, counts.size + 1):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        q = np.zeros(i)
        for j in range(nq):
            start, stop = j * i // nq, (j + 1) * i // nq
            nonzero = [k for k in range(start, stop) if p[k] > 0]
            for k in nonzero:
                q[k] = counts[start:stop].sum() / len(nonzero)
        if p[-1] > 0 and q[-1] == 0:
            q[-1] = 1e-4
        p, q = p / p.sum(), q / q.sum()
        out.append(sum(p[k] * math.log(p[k] / q[k]) for k in range(i) if p[k] > 0))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_a_plain_loop_reference(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.laplace(0, 1, 20_000), rng.normal(0, 6, 50)])
    h = observe(np.abs(x), max_bins=300)
    counts, width = h.abs_histogram()
    assert 150 < counts.size <= 300
    ref = reference_kl(counts, 32)
    ours = kl_divergences(counts, 32)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    best = int(np.argmin(ref))
    assert np.sort(ref)[1] - ref[best] > 1e-9  # no near-tie, so the threshold is determined
    expected = min((32 + best) * width, float(np.abs(x).max()))
    assert entropy_range(h, 32) == (float(np.abs(x).min()), expected)


def test_entropy_reference_smoothing_with_an_empty_last_group():
    counts = np.array([5, 0, 3, 1, 0, 0, 0, 0, 0, 0, 0, 7])
    np.testing.assert_allclose(kl_divergences(counts, 4), reference_kl(counts, 4), rtol=1e-12)


def test_entropy_with_few_bins_returns_the_observed_range():
    h = observe(np.array([-1.0, 0.5, 2.0]), max_bins=64)
    assert entropy_range(h) == (-1.0, 2.0)
    assert entropy_range(h, symmetric=False) == (-1.0, 2.0)


def test_asymmetric_entropy_thresholds_each_tail():
    rng = np.random.default_rng(9)
    x = np.concatenate([-rng.exponential(1.0, 300_000), rng.exponential(4.0, 300_000)])
    h = observe(x)
    sym_low, sym_high = entropy_range(h)
    low, high = entropy_range(h, symmetric=False)
    assert sym_low == max(-sym_high, x.min()) == x.min()
    assert x.min() < low and -0.5 * high < low < 0  # the short negative tail gets its own cut


def test_mse_on_a_gaussian_is_between_2_5_and_4_5_sigma():
    x = np.random.default_rng(10).standard_normal(400_000)
    h = observe(x)
    low, high = mse_range(h)
    assert 2.5 < high < 4.5 and 2.5 < -low < 4.5
    low, high = mse_range(h, symmetric=True)
    assert 2.5 < high < 4.5 and low == -high


@pytest.mark.parametrize("tails", ["student_t3", "laplace_with_outliers", "relu_student_t3"])
def test_mse_beats_minmax_and_percentile_on_heavy_tails(tails):
    rng = np.random.default_rng(11)
    x = {
        "student_t3": lambda: rng.standard_t(3, size=200_000),
        "laplace_with_outliers": lambda: np.r_[rng.laplace(0, 1, 200_000), 60.0, -45.0, 80.0],
        "relu_student_t3": lambda: np.maximum(rng.standard_t(3, size=200_000), 0),
    }[tails]()
    h = observe(x)
    error = {method: qdq_mse(x, *method(h)) for method in (mse_range, minmax_range)}
    error[percentile_range] = qdq_mse(x, *percentile_range(h, 99.999))
    assert error[mse_range] <= error[percentile_range]
    assert error[mse_range] < error[minmax_range]


def test_mse_searches_each_tail_of_a_two_signed_tensor():
    rng = np.random.default_rng(14)
    x = np.r_[-rng.exponential(0.5, 100_000), rng.exponential(3.0, 100_000)]
    h = observe(x)
    low, high = mse_range(h)
    sym_low, sym_high = mse_range(h, symmetric=True)
    assert sym_low == max(-sym_high, x.min())
    assert x.min() <= low and -low < 0.5 * high  # the short negative tail gets its own cut
    assert qdq_mse(x, low, high) < qdq_mse(x, sym_low, sym_high)


def test_mse_uses_a_one_sided_grid_for_nonnegative_tensors():
    x = np.abs(np.random.default_rng(12).standard_normal(400_000))
    h = observe(x)
    low, high = mse_range(h)
    sym_low, sym_high = mse_range(h, symmetric=True)
    assert low == sym_low == x.min()
    assert 2.5 < sym_high < high  # the finer step on [0, t] makes a wider range affordable


def test_distribution_stats_match_numpy():
    x = np.random.default_rng(13).normal(3.0, 2.0, 123_457).astype(np.float32)
    mean, std = distribution_stats(observe(x))
    x64 = x.astype(np.float64)
    assert mean == pytest.approx(x64.mean(), rel=1e-12)
    assert std == pytest.approx(x64.std(), rel=1e-9)


def test_public_api():
    assert sorted(methods.__all__) == [
        "distribution_stats",
        "entropy_range",
        "kl_divergences",
        "minmax_range",
        "mse_range",
        "percentile_range",
    ]
    assert histogram_module.__all__ == ["HistogramObserver"]


# -- entropy guards against over-clipping -----------------------------------------------------
def test_entropy_on_relu_outputs_is_not_driven_by_the_zero_spike():
    rng = np.random.default_rng(7)
    x = np.maximum(rng.normal(size=400_000), 0).astype(np.float32)  # half exact zeros
    h = HistogramObserver()
    h.update(x)
    _, t = entropy_range(h, 256, symmetric=False, min_kept=0)  # the KL search alone
    assert 2.5 < t < 5.0, t  # without flattening the zero bin: about 1.5 sigma


def test_entropy_never_collapses_a_tensor_away_from_zero():
    rng = np.random.default_rng(8)
    x = rng.uniform(0.118, 0.344, size=100_000).astype(np.float32)  # a hardsigmoid output
    h = HistogramObserver()
    h.update(x)
    low, high = entropy_range(h, 256, symmetric=False)
    assert low == pytest.approx(h.low) and high > np.quantile(x, 0.999) - h.width


def test_entropy_keeps_at_least_min_kept_percent():
    rng = np.random.default_rng(9)
    x = rng.standard_t(2, size=200_000).astype(np.float32)  # heavy tails
    h = HistogramObserver()
    h.update(x)
    low, high = entropy_range(h, 128, symmetric=False, min_kept=99.9)
    kept = np.mean((x >= low) & (x <= high)) * 100
    assert kept >= 99.9 - 0.01
