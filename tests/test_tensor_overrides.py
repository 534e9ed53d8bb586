"""Per-tensor overrides (``StaticQuantConfig.tensors``): a 16-bit activation next to 8-bit
ones, a fixed range, symmetry — checked on the written graph's Q/DQ parameters."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant import TensorOverride
from onnxquant.core.errors import QuantizationError

DIM = 8


def _chain() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w1, w2 = (rng.normal(0, 0.4, (DIM, DIM)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
        "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", DIM])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    return [{"x": rng.normal(size=(4, DIM)).astype(np.float32)} for _ in range(count)]


def _quantize(tmp_path, **config):
    out = tmp_path / "q.onnx"
    result = onnxquant.quantize_static(_chain(), out, _feeds(),
                                       onnxquant.StaticQuantConfig(evaluate=False, **config))
    return onnx.load(out), result


def _zero_point_of(model: onnx.ModelProto, tensor: str) -> onnx.TensorProto:
    """The zero point of the QuantizeLinear that quantizes ``tensor``."""
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
                and n.input[0] == tensor)
    return inits[node.input[2]]


def _scale_of(model: onnx.ModelProto, tensor: str) -> float:
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
                and n.input[0] == tensor)
    return float(numpy_helper.to_array(inits[node.input[1]]))


def test_a_16_bit_activation_sits_next_to_8_bit_ones(tmp_path):
    model, result = _quantize(tmp_path, tensors={"h": TensorOverride(onnxquant.UINT16)})
    assert _zero_point_of(model, "h").data_type == TensorProto.UINT16
    assert _zero_point_of(model, "x").data_type == TensorProto.UINT8
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert result.plan.tensors["h"].qtype == "uint16"
    feed = _feeds(1)[0]
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = ort.InferenceSession(_chain().SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.allclose(got, want, atol=0.1)


def test_a_16_bit_activation_takes_its_min_max_range_under_a_clipping_method(tmp_path):
    _, clipped = _quantize(tmp_path, calibration_method=onnxquant.CalibrationMethod.PERCENTILE,
                           percentile=90.0)
    _, wide = _quantize(tmp_path, calibration_method=onnxquant.CalibrationMethod.PERCENTILE,
                        percentile=90.0, tensors={"h": TensorOverride(onnxquant.UINT16)})
    h_values = np.concatenate([f["x"] @ numpy_helper.to_array(_chain().graph.initializer[0])
                               for f in _feeds()])
    low, high = wide.plan.tensors["h"].range
    assert low == pytest.approx(min(0.0, h_values.min()), rel=1e-4)
    assert high == pytest.approx(h_values.max(), rel=1e-4)
    assert clipped.plan.tensors["h"].range[1] < 0.9 * high  # the 8-bit grid is clipped
    assert wide.plan.tensors["x"].range == clipped.plan.tensors["x"].range


def test_a_fixed_range_and_symmetry(tmp_path):
    model, result = _quantize(tmp_path, tensors={
        "h": TensorOverride(rmin=-4.0, rmax=6.0),
        "x": TensorOverride(symmetric=True)})
    assert _scale_of(model, "h") == pytest.approx(10.0 / 255.0, rel=1e-6)
    assert result.plan.tensors["h"].range == (-4.0, 6.0)
    x = result.plan.tensors["x"]
    assert x.zero_point == [128]
    assert x.scale[0] == pytest.approx(2 * max(abs(v) for v in x.range) / 254.0, rel=1e-5)


def test_a_wider_type_needs_the_qdq_format():
    with pytest.raises(QuantizationError, match="'h'.*QDQ"):
        onnxquant.StaticQuantConfig(format=onnxquant.QuantFormat.QOPERATOR,
                                    tensors={"h": TensorOverride(onnxquant.UINT16)})


def test_an_inverted_range_is_refused():
    with pytest.raises(QuantizationError, match="'h'.*rmin"):
        onnxquant.StaticQuantConfig(tensors={"h": TensorOverride(rmin=1.0, rmax=-1.0)})


def test_an_unknown_tensor_is_named(tmp_path):
    needle = "'no_such' is not present in the model.*check the names"
    with pytest.raises(ValueError, match=needle) as info:
        _quantize(tmp_path, tensors={"no_such": TensorOverride(onnxquant.UINT16)})
    assert isinstance(info.value, onnxquant.QuantizationError)
    assert not (tmp_path / "q.onnx").exists()  # nothing written
