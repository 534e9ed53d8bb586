"""Accuracy (output fidelity) of quantized models: :func:`measure_fidelity`, the hold-back of
calibration feeds, and ``result.fidelity`` / ``result.summary()`` of the three modes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
import onnxquant.ort
from onnxquant import StaticQuantConfig, WeightOnlyConfig
from onnxquant.calibration.evaluation import EVAL_MAX, HoldBack, random_feeds
from onnxquant.calibration.fidelity import (
    Fidelity,
    OutputFidelity,
    accuracy_lines,
    measure_fidelity,
)
from onnxquant.calibration.session import model_input_specs
from onnxquant.core.errors import EvaluationError, FeedError

RNG = np.random.default_rng(0)
W = RNG.standard_normal((16, 8)).astype(np.float32)


def linear(weight: np.ndarray = W, opset: int = 13) -> onnx.ModelProto:
    """y = x @ weight, x: [N, 16] float."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weight.shape[1]])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = zoo.IR_VERSION
    return model


def feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(n)]


@pytest.fixture()
def paths(tmp_path: Path) -> tuple[Path, Path]:
    float_path = tmp_path / "float.onnx"
    onnx.save(linear(), float_path)
    return float_path, tmp_path


# -- measure_fidelity --------------------------------------------------------------------------
def test_identical_model_is_exact(paths):
    float_path, folder = paths
    copy = folder / "copy.onnx"
    shutil.copy(float_path, copy)
    fidelity = measure_fidelity(float_path, copy, feeds(5))
    out = fidelity.outputs["y"]
    assert fidelity.samples == 5 and fidelity.source == "5 samples"
    assert out.cosine == pytest.approx(1.0) and out.sqnr_db > 100
    assert out.argmax_agreement == 1.0
    assert not fidelity.is_low() and fidelity.warning() is None
    assert fidelity.float_model == str(float_path) and fidelity.quantized_model == str(copy)


@pytest.mark.parametrize("as_what", ["proto", "ir"])
def test_in_memory_float_models(paths, as_what):
    import onnx_ir as ir

    float_path, _ = paths
    model = linear() if as_what == "proto" else ir.serde.deserialize_model(linear())
    fidelity = measure_fidelity(model, float_path, feeds(2))
    assert fidelity.outputs["y"].sqnr_db > 100 and fidelity.float_model is None


def test_bad_model_is_low_and_the_warning_names_the_output(paths):
    float_path, folder = paths
    bad = folder / "bad.onnx"
    onnx.save(linear(-W), bad)
    fidelity = measure_fidelity(float_path, bad, feeds(3), source="3 test feeds")
    out = fidelity.outputs["y"]
    assert out.cosine == pytest.approx(-1.0) and out.argmax_agreement < 0.5
    assert fidelity.is_low() and fidelity.worst() is out
    warning = fidelity.warning(["--per-channel", "--bits 8"])
    assert "output 'y'" in warning and f"onnxquant report {float_path} {bad}" in warning
    assert warning.endswith("or try --per-channel or --bits 8")
    lines = accuracy_lines(fidelity)
    assert lines[0] == "accuracy:     float vs quantized on 3 test feeds:"
    assert lines[1].startswith("  y  SQNR ") and lines[1].endswith("<- low")


def test_streaming_from_a_one_shot_generator(paths):
    float_path, _ = paths
    generator = (feed for feed in feeds(40))
    fidelity = measure_fidelity(float_path, float_path, generator, max_samples=25)
    assert fidelity.samples == 25


def test_feed_errors_name_the_feed_and_the_file(paths):
    float_path, folder = paths
    bad = feeds(3)
    bad[2] = {"X": bad[2]["x"]}
    with pytest.raises(FeedError, match=r"Feed 2: unknown input name 'X'"):
        measure_fidelity(float_path, float_path, bad)
    data = folder / "data"
    data.mkdir()
    np.savez(data / "a.npz", x=np.zeros((1, 16), np.float32))
    np.savez(data / "b.npz", x=np.zeros((1, 15), np.float32))
    with pytest.raises(FeedError, match=r"Feed 1 \('.*b\.npz'\): input 'x' has shape"):
        measure_fidelity(float_path, float_path, data)


def test_mismatched_outputs_and_empty_data_are_evaluation_errors(paths):
    float_path, folder = paths
    other = folder / "other.onnx"
    onnx.save(linear(W[:, :4]), other)
    with pytest.raises(EvaluationError, match="output 'y' on evaluation feed 0"):
        measure_fidelity(float_path, other, feeds(1))
    with pytest.raises(EvaluationError, match="yielded no feeds"):
        measure_fidelity(float_path, float_path, [])


def test_huge_outputs_do_not_overflow(paths):
    import warnings

    float_path, folder = paths
    huge = folder / "huge.onnx"
    onnx.save(linear(W * np.float32(1e30)), huge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fidelity = measure_fidelity(huge, huge, feeds(2))
    assert fidelity.outputs["y"].cosine == pytest.approx(1.0)
    assert fidelity.outputs["y"].sqnr_db > 100


def test_thresholds_and_to_dict():
    good = OutputFidelity("a", 30.0, 0.999, 0.99)
    assert not good.is_low() and good.describe() == "SQNR 30.0 dB, cosine 0.9990, argmax 99.0 %"
    for low in (OutputFidelity("b", 30.0, 0.97, None), OutputFidelity("c", 30.0, 0.999, 0.9),
                OutputFidelity("d", 9.0, 0.999, None)):
        assert low.is_low(), low
    nan = OutputFidelity("e", -math.inf, 0.5, None)
    fidelity = Fidelity({"a": good, "e": nan}, 2, "2 samples")
    assert fidelity.is_low() and fidelity.worst() is nan
    document = json.loads(json.dumps(fidelity.to_dict()))
    assert document["outputs"]["e"]["sqnr_db"] is None and document["low"] is True
    assert accuracy_lines(None) == ["accuracy:     not measured (pass --eval DIR)"]
    many = Fidelity({f"o{i}": OutputFidelity(f"o{i}", 40.0 - i, 0.999, None) for i in range(12)},
                    1, "1 sample")
    lines = many.lines()
    assert len(lines) == 9 and lines[0].startswith("o11 ") and "4 more outputs" in lines[-1]


# -- hold-back and random feeds ----------------------------------------------------------------
def test_hold_back_every_tenth_at_most_sixteen():
    hold = HoldBack()
    calibrated = list(hold.split(iter(feeds(25))))
    assert len(calibrated) == 23 and len(hold.held) == 2 and hold.first == []
    assert hold.feeds()[1].startswith("2 calibration samples held back from calibration")
    many = HoldBack()
    assert len(list(many.split(iter(feeds(200))))) == 200 - EVAL_MAX
    assert len(many.held) == EVAL_MAX and many.calibration_count(200) == 184
    few = HoldBack()
    assert len(list(few.split(iter(feeds(4))))) == 4
    chosen, source = few.feeds()
    assert len(chosen) == 4 and source == "4 calibration samples (too few to hold back)"


def test_random_feeds_only_for_float_inputs():
    made = random_feeds(model_input_specs(linear())[0])
    assert made is not None and len(made) == 4 and made[0]["x"].shape == (1, 16)
    assert random_feeds(model_input_specs(zoo.transformer_block())[0]) is None


# -- quantize_static ---------------------------------------------------------------------------
def test_static_holds_back_every_tenth_feed(tmp_path):
    result = onnxquant.quantize_static(linear(), tmp_path / "q.onnx", feeds(12))
    assert result.calibration_samples == 11
    assert result.fidelity is not None and result.fidelity.samples == 1
    assert "held back from calibration" in result.fidelity.source
    assert result.fidelity.outputs["y"].sqnr_db > 20 and not result.fidelity.is_low()
    text = result.summary()
    assert "accuracy:     float vs quantized on 1 calibration sample held back" in text
    assert "\n  y  SQNR " in text and "calibration:  11 samples" in text


def test_static_with_few_feeds_measures_on_calibration_feeds(tmp_path):
    result = onnxquant.quantize_static(linear(), tmp_path / "q.onnx", feeds(4))
    assert result.calibration_samples == 4
    assert result.fidelity.source == "4 calibration samples (too few to hold back)"


def test_static_eval_data_and_evaluate_off(tmp_path):
    with_eval = onnxquant.quantize_static(linear(), tmp_path / "a.onnx", feeds(12),
                                          eval_data=feeds(3, seed=5))
    assert with_eval.calibration_samples == 12
    assert with_eval.fidelity.source == "3 samples from the evaluation data"
    off = onnxquant.quantize_static(linear(), tmp_path / "b.onnx", feeds(12),
                                    StaticQuantConfig(evaluate=False))
    assert off.calibration_samples == 12 and off.fidelity is None
    assert "accuracy:     not measured (pass --eval DIR)" in off.summary()
    with pytest.raises(FeedError, match="Feed 1"):
        onnxquant.quantize_static(linear(), tmp_path / "c.onnx", feeds(12),
                                  eval_data=[feeds(1)[0], {"x": np.zeros((2, 3), np.float32)}])


def test_static_fidelity_matches_an_independent_sqnr(tmp_path):
    model = zoo.cnn()
    evaluation = zoo.random_feeds(model, 6, seed=2)
    result = onnxquant.quantize_static(model, tmp_path / "q.onnx", zoo.random_feeds(model, 8),
                                       eval_data=evaluation)
    ref = np.concatenate([o[0].ravel() for o in zoo.run(model, evaluation)])
    got = np.concatenate([o[0].ravel() for o in zoo.run(str(tmp_path / "q.onnx"), evaluation)])
    (only,) = result.fidelity.outputs.values()
    assert only.sqnr_db == pytest.approx(zoo.sqnr_db(ref, got), abs=0.05)


def test_low_static_accuracy_gives_the_warning(tmp_path):
    calib = feeds(5)
    calib[0]["x"][0, 0] = 1e4  # one outlier: every other activation rounds to 0
    result = onnxquant.quantize_static(linear(), tmp_path / "q.onnx", calib,
                                       eval_data=feeds(3, seed=7))
    assert result.fidelity.is_low()
    (warning,) = result.warnings()
    assert "output 'y'" in warning and "onnxquant report" in warning
    assert "--op-types MatMul,Conv,Gemm, --per-channel or --activation-type uint16" in warning
    assert f"warning:      {warning}" in result.summary()


@pytest.mark.parametrize("kind", ["generator", "workers", "cache"])
def test_static_hold_back_with_streams_workers_and_cache(tmp_path, kind):
    config = StaticQuantConfig()
    data = feeds(12)
    if kind == "generator":
        source = (feed for feed in data)
    elif kind == "workers":
        source, config = data, StaticQuantConfig(calibration_workers=2)
    else:
        cache = tmp_path / "stats.json"
        onnxquant.quantize_static(linear(), tmp_path / "first.onnx", data,
                                  StaticQuantConfig(calibration_cache=cache))
        source, config = (feed for feed in data), StaticQuantConfig(calibration_cache=cache)
    result = onnxquant.quantize_static(linear(), tmp_path / "q.onnx", source, config)
    assert result.calibration_samples == 11
    assert result.fidelity.samples == 1 and "held back" in result.fidelity.source


def test_calibrate_and_the_ort_layer_do_not_hold_back(tmp_path):
    assert onnxquant.calibrate(linear(), feeds(12)).samples == 12
    result = onnxquant.ort.quantize_static(linear(), tmp_path / "q.onnx", feeds(12))
    assert result.calibration_samples == 12 and result.fidelity is None


# -- quantize_dynamic and quantize_weights --------------------------------------------------
def test_dynamic_random_feeds_eval_data_and_int_inputs(tmp_path):
    result = onnxquant.quantize_dynamic(linear(), tmp_path / "a.onnx")
    assert result.fidelity.samples == 4 and "random feeds" in result.fidelity.source
    assert "accuracy:     float vs quantized on 4 random feeds" in result.summary()
    given = onnxquant.quantize_dynamic(linear(), tmp_path / "b.onnx", eval_data=feeds(2))
    assert given.fidelity.source == "2 samples from the evaluation data"
    block = onnxquant.quantize_dynamic(zoo.transformer_block(), tmp_path / "c.onnx")
    assert block.fidelity is None
    assert "accuracy:     not measured (pass --eval DIR)" in block.summary()
    measured = onnxquant.quantize_dynamic(
        zoo.transformer_block(), tmp_path / "d.onnx",
        eval_data=zoo.random_feeds(zoo.transformer_block(), 2, seed=3))
    assert measured.fidelity.samples == 2 and not measured.fidelity.is_low()
    ort_result = onnxquant.ort.quantize_dynamic(linear(), tmp_path / "e.onnx")
    assert ort_result.fidelity is None


def test_weights_rtn_gptq_and_nothing_to_quantize(tmp_path):
    model = zoo.matmul_chain(dim=32)
    config = WeightOnlyConfig(block_size=16)
    rtn = onnxquant.quantize_weights(model, tmp_path / "rtn.onnx", config)
    assert rtn.fidelity.samples == 4 and "random feeds" in rtn.fidelity.source
    gptq = onnxquant.quantize_weights(
        model, tmp_path / "gptq.onnx",
        WeightOnlyConfig(block_size=16, algorithm=onnxquant.WeightOnlyAlgorithm.GPTQ),
        zoo.random_feeds(model, 12, seed=1))
    assert gptq.calibration_samples == 11
    assert "held back from calibration" in gptq.fidelity.source
    assert "accuracy:     float vs quantized on 1 calibration sample" in gptq.summary()
    given = onnxquant.quantize_weights(model, tmp_path / "e.onnx", config,
                                       eval_data=zoo.random_feeds(model, 3, seed=4))
    assert given.fidelity.samples == 3
    nothing = onnxquant.quantize_weights(zoo.cnn(), tmp_path / "cnn.onnx")
    assert nothing.quantized == [] and "nothing was quantized" in nothing.warnings()[0]
    assert "warning:      nothing was quantized" in nothing.summary()
