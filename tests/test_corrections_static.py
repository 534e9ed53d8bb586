"""The corrections as plain ``quantize_static`` options: each raises the output SQNR of its
planted case (the float model is the same function, so only quantization error changes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import target_models as tm

import onnxquant
from onnxquant.core.errors import QuantizationError


def _sqnr(model: onnx.ModelProto, path, feeds) -> float:
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.concatenate([ref.run(None, f)[0].ravel() for f in feeds])
    y = np.concatenate([got.run(None, f)[0].ravel() for f in feeds])
    return float(20 * np.log10(np.linalg.norm(x) / np.linalg.norm(x - y)))


def _gain(tmp_path, model, feeds, **option) -> tuple[float, float]:
    base = {"evaluate": False, "per_channel_fallback_db": None}
    plain, corrected = tmp_path / "plain.onnx", tmp_path / "corrected.onnx"
    onnxquant.quantize_static(model, plain, feeds(16, 1), onnxquant.StaticQuantConfig(**base))
    onnxquant.quantize_static(model, corrected, feeds(16, 1),
                              onnxquant.StaticQuantConfig(**base, **option))
    return _sqnr(model, plain, feeds(8, 3)), _sqnr(model, corrected, feeds(8, 3))


def test_smooth_quant_option(tmp_path):
    before, after = _gain(tmp_path, tm.hidden_outlier(), tm.feeds, smooth_quant=True)
    assert after > before + 20


def test_equalize_layers_option(tmp_path):
    before, after = _gain(tmp_path, tm.unequal_cnn(), tm.image_feeds, equalize_layers=True)
    assert after > before + 6


def _coarse_conv() -> onnx.ModelProto:
    """Conv(3->8, 3x3, bias) whose channel 0 weights are 100x the rest: a per-tensor grid
    rounds the other channels coarsely."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w[0] *= 100.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")], "coarse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bias_correction_option(tmp_path):
    """Inputs with a large mean: the coarse rounding shifts every output's mean, which bias
    correction removes (channels 1-7: channel 0 dominates the whole-output SQNR)."""
    model = _coarse_conv()

    def shifted(count, seed):
        return [{"x": f["x"] * 0.2 + 3.0} for f in tm.image_feeds(count, seed)]

    base = {"evaluate": False, "per_channel_fallback_db": None}
    errors = []
    for option in ({"bias_correction": False}, {}):  # on by default
        out = tmp_path / f"{len(option)}.onnx"
        onnxquant.quantize_static(model, out, shifted(16, 1),
                                  onnxquant.StaticQuantConfig(**base, **option))
        ref = ort.InferenceSession(model.SerializeToString())
        got = ort.InferenceSession(str(out))
        diff = np.concatenate([(got.run(None, f)[0] - ref.run(None, f)[0])[:, 1:]
                               for f in shifted(8, 3)])
        errors.append(np.abs(diff.mean(axis=(0, 2, 3))).max())
    assert errors[1] < errors[0] / 5


def test_debugging_leaves_corrected_biases_out_of_the_weight_error(tmp_path):
    """The corrected bias differs from the float one on purpose: the model records it, the
    report leaves it out of the weight SQNRs, and a bias the correction added is not
    'unmatched'."""
    import json

    import onnx_ir as ir

    from onnxquant.debug.matching import match_models

    model = _coarse_conv()
    no_bias = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "nobias",
        list(model.graph.input), list(model.graph.output), [model.graph.initializer[0]]),
        opset_imports=model.opset_import)

    def shifted(count, seed):
        return [{"x": f["x"] * 0.2 + 3.0} for f in tm.image_feeds(count, seed)]

    for float_model, corrected in ((model, "b"), (no_bias, "conv.corrected_bias")):
        out = tmp_path / "q.onnx"
        result = onnxquant.quantize_static(float_model, out, shifted(16, 1),
                                           onnxquant.StaticQuantConfig(
                                               evaluate=False, per_channel_fallback_db=None))
        assert "bias corrected" in result.plan.nodes["conv"].reason
        quantized = onnx.load(out)
        meta = {p.key: p.value for p in quantized.metadata_props}
        assert json.loads(meta["onnxquant.corrected_biases"]) == [corrected]
        matching = match_models(ir.serde.deserialize_model(float_model),
                                ir.serde.deserialize_model(quantized))
        assert matching.unmatched_weights == []
        assert "w" in matching.weights and not matching.weights["w"].corrected
        if corrected == "b":
            assert matching.weights["b"].corrected
        report = onnxquant.compare(float_model, out, shifted(4, 2))
        assert corrected not in report.weights and "w" in report.weights


def test_bad_correction_settings_are_refused():
    with pytest.raises(QuantizationError, match="smooth_quant_alpha"):
        onnxquant.StaticQuantConfig(smooth_quant=True, smooth_quant_alpha=1.5)
    with pytest.raises(QuantizationError, match="correction_feeds"):
        onnxquant.StaticQuantConfig(correction_feeds=0)
