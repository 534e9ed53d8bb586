"""Model-level fidelity: SQNR of quantized outputs against the float model, on the test zoo.

Every model is calibrated with ``zoo.random_feeds(model, 16, seed=1)`` and evaluated on
``zoo.random_feeds(model, 16, seed=2)`` (different data), both run with onnxruntime on the CPU.
SQNR is taken over all outputs of all evaluation feeds together. Thresholds sit about 3 dB below
what the pipeline measured when they were set (values in the comments), so a real regression
fails while run-to-run noise of onnxruntime kernels does not.

Where the numbers come from: with 16 calibration feeds, models with small batches (the If and
the matmul chain) are limited by evaluation values outside the calibrated range (clipping);
with 256 calibration feeds they reach 36 dB and 31 dB. The residual CNN with int8 per-tensor
weights is limited by its weights (int16 activations add only 0.5 dB).
"""

from __future__ import annotations

import functools
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import pytest

import onnxquant
from onnxquant import StaticQuantConfig, quantize_static

CALIB_FEEDS = 16
EVAL_FEEDS = 16

CONFIGS = {
    "s8s8": {},
    "s8s8_per_channel": {"per_channel": True},
    "u8u8": {"activation_type": onnxquant.UINT8, "weight_type": onnxquant.UINT8},
    "u8s8": {"activation_type": onnxquant.UINT8},
    "a16w8": {"activation_type": onnxquant.INT16},
}

# (model, config) -> minimum SQNR in dB. Measured values in the comments.
THRESHOLDS = {
    ("cnn", "s8s8"): 31.5,  # 34.55
    ("cnn", "s8s8_per_channel"): 35.0,  # 38.07
    ("cnn", "u8u8"): 37.5,  # 40.75 (asymmetric uint8 weights use the whole grid)
    ("cnn", "u8s8"): 31.5,  # 34.55
    ("conv_transpose", "s8s8"): 38.5,  # 41.85
    ("conv_transpose", "s8s8_per_channel"): 38.5,  # 41.92
    ("transformer_block", "s8s8"): 28.5,  # 31.53
    ("transformer_block", "s8s8_per_channel"): 28.5,  # 31.71
    ("transformer_block", "u8u8"): 28.0,  # 31.32
    ("if_subgraph_model", "s8s8"): 19.5,  # 22.67
    ("if_subgraph_model", "s8s8_per_channel"): 19.5,  # 22.65
    ("loop_model", "s8s8"): 28.5,  # 31.50
    ("loop_model", "s8s8_per_channel"): 29.5,  # 32.55
    ("matmul_chain", "s8s8"): 23.0,  # 26.25
    ("matmul_chain", "s8s8_per_channel"): 23.0,  # 26.16
    ("matmul_chain", "u8u8"): 22.5,  # 25.84
    ("constant_weights_cnn", "s8s8"): 33.5,  # 36.92
    ("constant_weights_cnn", "s8s8_per_channel"): 37.5,  # 40.78
    ("model_with_shared_weight", "s8s8"): 28.0,  # 31.31
}


@functools.cache
def _float_model(name: str) -> onnx.ModelProto:
    return getattr(zoo, name)()


@functools.cache
def _eval_feeds(name: str) -> tuple[dict[str, np.ndarray], ...]:
    return tuple(zoo.random_feeds(_float_model(name), EVAL_FEEDS, seed=2))


def _outputs(model: onnx.ModelProto | str, feeds) -> np.ndarray:
    return np.concatenate([out.ravel() for outs in zoo.run(model, list(feeds)) for out in outs])


@functools.cache
def _float_outputs(name: str, flag: bool | None = None) -> np.ndarray:
    return _outputs(_float_model(name), _select(name, flag))


def _select(name: str, flag: bool | None) -> list[dict[str, np.ndarray]]:
    feeds = list(_eval_feeds(name))
    return feeds if flag is None else [f for f in feeds if bool(f["flag"]) == flag]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory):
    """``quantized(model_name, config_name)`` -> path of the quantized model (cached)."""
    folder = tmp_path_factory.mktemp("fidelity")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, config: str) -> Path:
        if (name, config) not in cache:
            model = _float_model(name)
            path = folder / f"{name}_{config}.onnx"
            # eval_data: calibrate on all 16 feeds (none held back for the accuracy)
            quantize_static(model, path, zoo.random_feeds(model, CALIB_FEEDS, seed=1),
                            StaticQuantConfig(bias_correction=False, **CONFIGS[config]),
                            eval_data=_eval_feeds(name))
            cache[name, config] = path
        return cache[name, config]

    return get


def sqnr(quantized_path: Path, name: str, flag: bool | None = None) -> float:
    return zoo.sqnr_db(_float_outputs(name, flag),
                       _outputs(str(quantized_path), _select(name, flag)))


@pytest.mark.parametrize(("name", "config"), sorted(THRESHOLDS))
def test_sqnr_above_threshold(quantized, name: str, config: str) -> None:
    value = sqnr(quantized(name, config), name)
    assert np.isfinite(value)  # inf would mean nothing was quantized
    assert value >= THRESHOLDS[name, config], f"{name}/{config}: {value:.2f} dB"


@pytest.mark.parametrize(("flag", "threshold"), [(True, 16.5), (False, 33.5)],
                         ids=["then_branch", "else_branch"])
def test_if_model_each_branch(quantized, flag: bool, threshold: float) -> None:
    # Measured: then 19.72 dB (5 of the 16 feeds, clipping-limited: two nested convs calibrated
    # on the ~half of the calibration feeds that take this branch), else 36.67 dB.
    assert _select("if_subgraph_model", flag)
    value = sqnr(quantized("if_subgraph_model", "s8s8"), "if_subgraph_model", flag)
    assert np.isfinite(value) and value >= threshold


@pytest.mark.parametrize("name", ["cnn", "constant_weights_cnn"])
def test_per_channel_at_least_as_good_as_per_tensor(quantized, name: str) -> None:
    # Measured: cnn 38.07 vs 34.55 dB, constant_weights_cnn 40.78 vs 36.92 dB.
    per_tensor = sqnr(quantized(name, "s8s8"), name)
    per_channel = sqnr(quantized(name, "s8s8_per_channel"), name)
    assert per_channel >= per_tensor + 2.0


@pytest.mark.parametrize("name", ["cnn", "transformer_block", "matmul_chain"])
def test_u8u8_and_s8s8_both_above_threshold(quantized, name: str) -> None:
    s8s8 = sqnr(quantized(name, "s8s8"), name)
    u8u8 = sqnr(quantized(name, "u8u8"), name)
    assert s8s8 >= THRESHOLDS[name, "s8s8"] and u8u8 >= THRESHOLDS[name, "s8s8"]
    assert abs(u8u8 - s8s8) < 10.0  # same numerics up to the weight grid: no broken type


@pytest.mark.parametrize(("name", "gain"), [("transformer_block", 5.0), ("loop_model", 5.0),
                                            ("conv_transpose", 8.0)])
def test_int16_activations_are_more_precise(quantized, name: str, gain: float) -> None:
    # Measured int16 vs int8 activations: transformer 38.80 vs 31.53, loop 40.48 vs 31.50,
    # conv_transpose 54.21 vs 41.85 dB: the int16 grid is really used, not just relabelled.
    assert sqnr(quantized(name, "a16w8"), name) >= sqnr(quantized(name, "s8s8"), name) + gain
