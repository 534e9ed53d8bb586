"""onnxruntime's ``TensorQuantOverrides`` through ``onnxquant.ort`` (written parameters compared
with onnxruntime's own output), its helper class, and the native ``TensorOverride`` fields that
carry it (``scale``/``zero_point``, ``reduce_range``, ``axis``, ``per_channel``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime.quantization as ortq
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
import onnxquant.ort as oqq
from onnxquant import TensorOverride
from onnxquant.core.errors import QuantizationError
from onnxquant.ort._options import _to_native_config
from onnxquant.ort.tensor_quant_overrides import TensorQuantOverridesHelper

DIM = 8
RNG = np.random.default_rng(11)
W1 = RNG.normal(0, 0.4, (DIM, DIM)).astype(np.float32)
W2 = (RNG.normal(0, 0.4, (DIM, DIM)) * np.linspace(0.1, 3, DIM)).astype(np.float32)


def _chain() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
        "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, DIM])],
        [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    return [{"x": rng.normal(size=(4, DIM)).astype(np.float32)} for _ in range(count)]


def _native(tmp_path, **config) -> tuple[onnx.ModelProto, onnxquant.QuantizationResult]:
    out = tmp_path / "native.onnx"
    result = onnxquant.quantize_static(_chain(), out, _feeds(),
                                       onnxquant.StaticQuantConfig(evaluate=False, **config))
    return onnx.load(out), result


def _ort(q, tmp_path, overrides, **kwargs) -> onnx.ModelProto:
    """The same onnxruntime-style call against onnxruntime (``ortq``) or onnxquant (``oqq``)."""
    path = tmp_path / "float.onnx"
    onnx.save(_chain(), path)
    out = tmp_path / f"{q.__name__}.onnx"

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(_feeds())

        def get_next(self):
            return next(self.feeds, None)

    q.quantize_static(str(path), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                      activation_type=kwargs.pop("activation_type", q.QuantType.QUInt8),
                      weight_type=q.QuantType.QInt8,
                      extra_options={"TensorQuantOverrides": overrides}, **kwargs)
    return onnx.load(out)


def _activation(model: onnx.ModelProto, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of the QuantizeLinear that reads ``tensor``."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
                and n.input[0] == tensor)
    return inits[node.input[1]], inits[node.input[2]]


def _weight(model: onnx.ModelProto, node_name: str, index: int = 1):
    """(quantized data, scale, zero point, axis) of the DequantizeLinear feeding an input."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumer = next(n for n in model.graph.node if n.name == node_name)
    dq = next(n for n in model.graph.node if consumer.input[index] in n.output)
    assert dq.op_type == "DequantizeLinear"
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    return inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]], axis


def _reference(w: np.ndarray, scale, zp, qmin: int, qmax: int, axis: int | None = None):
    if axis is not None:
        shape = [1] * w.ndim
        shape[axis] = -1
        scale, zp = np.reshape(scale, shape), np.reshape(zp, shape)
    return np.clip(np.rint(w / np.float32(scale)) + np.asarray(zp, np.int64), qmin, qmax)


# ---------------------------------------------------------------------------------------------
# Native fields, checked on the written graph.

def test_scale_and_zero_point_are_written_as_given(tmp_path):
    model, result = _native(tmp_path, tensors={
        "h": TensorOverride(scale=0.02, zero_point=100),
        "w1": TensorOverride(scale=0.005, zero_point=3)})
    scale, zp = _activation(model, "h")
    assert scale == np.float32(0.02) and zp == 100 and zp.dtype == np.uint8
    assert result.plan.tensors["h"].range == pytest.approx((0.02 * -100, 0.02 * 155))
    data, w_scale, w_zp, axis = _weight(model, "mm1")
    assert w_scale == np.float32(0.005) and w_zp == 3 and axis is None
    np.testing.assert_array_equal(data, _reference(W1, 0.005, 3, -128, 127))
    assert np.any(data == 127) and np.any(data == -128)  # saturates like QuantizeLinear


def test_explicit_parameters_need_no_calibrated_range(tmp_path):
    model, _ = _native(tmp_path, nodes_to_exclude=["mm1"], op_types={"MatMul"},
                       tensors={"h": TensorOverride(scale=0.5, zero_point=0)})
    scale, zp = _activation(model, "h")
    assert scale == np.float32(0.5) and zp == 0


def test_axis_makes_a_weight_per_channel_with_one_value_per_channel(tmp_path):
    scales = tuple(float(s) for s in np.linspace(0.01, 0.08, DIM))
    model, _ = _native(tmp_path, per_channel_fallback_db=None, tensors={
        "w1": TensorOverride(axis=1, symmetric=True),
        "w2": TensorOverride(axis=-1, scale=scales, zero_point=0)})
    data, scale, zp, axis = _weight(model, "mm1")
    absmax = np.abs(W1).max(axis=0)
    assert axis == 1
    np.testing.assert_allclose(scale, absmax / 127, rtol=1e-6)
    np.testing.assert_array_equal(zp, np.zeros(DIM, np.int8))
    np.testing.assert_array_equal(data, _reference(W1, scale, zp, -127, 127, 1))
    data, scale, zp, axis = _weight(model, "mm2")
    assert axis == 1
    np.testing.assert_array_equal(scale, np.float32(scales))
    np.testing.assert_array_equal(data, _reference(W2, np.float32(scales), 0, -128, 127, 1))


def test_per_channel_rmin_rmax_and_reduce_range(tmp_path):
    model, _ = _native(tmp_path, tensors={
        "w1": TensorOverride(reduce_range=True, symmetric=False),
        "w2": TensorOverride(axis=1, rmin=-1.0, rmax=tuple(float(i + 1) for i in range(DIM)),
                             symmetric=False)})
    data, scale, zp, _ = _weight(model, "mm1")  # 7 bits: [-64, 63]
    low, high = min(W1.min(), 0), max(W1.max(), 0)
    assert scale == pytest.approx((high - low) / 127, rel=1e-6)
    assert zp == -64 - np.rint(low / scale)
    assert data.min() >= -64 and data.max() <= 63
    _, scale, zp, axis = _weight(model, "mm2")
    assert axis == 1
    np.testing.assert_allclose(scale, (np.arange(DIM) + 2.0) / 255, rtol=1e-6)
    np.testing.assert_array_equal(zp, -128 - np.rint(-1.0 / scale))


def test_per_channel_false_keeps_a_weight_per_tensor(tmp_path):
    model, _ = _native(tmp_path, per_channel=True,
                       tensors={"w2": TensorOverride(per_channel=False)})
    assert _weight(model, "mm1")[3] == 1 and _weight(model, "mm2")[3] is None


def test_a_type_override_on_a_weight(tmp_path):
    model, _ = _native(tmp_path, tensors={"w1": TensorOverride(onnxquant.UINT8)})
    data, scale, zp, _ = _weight(model, "mm1")
    assert data.dtype == np.uint8 and zp.dtype == np.uint8  # uint8 weights: asymmetric
    assert scale == pytest.approx((W1.max() - W1.min()) / 255, rel=1e-6)


@pytest.mark.parametrize(("override", "needle"), [
    (TensorOverride(scale=0.1), "together"),
    (TensorOverride(scale=0.1, zero_point=0, rmin=-1.0), "rmin"),
    (TensorOverride(scale=-0.1, zero_point=0), "> 0"),
    (TensorOverride(scale=0.1, zero_point=0.5), "integer"),  # type: ignore[arg-type]
    (TensorOverride(rmin=(0.0, 1.0)), "axis"),
    (TensorOverride(axis=0, per_channel=False), "per_channel"),
    (TensorOverride(symmetric=1), "symmetric"),  # type: ignore[arg-type]
])
def test_invalid_native_overrides_name_the_tensor(override, needle):
    with pytest.raises(QuantizationError, match=f"'w1'.*{needle}"):
        onnxquant.StaticQuantConfig(tensors={"w1": override})


@pytest.mark.parametrize(("tensors", "needle"), [
    ({"h": TensorOverride(axis=0)}, "'h'.*activation"),
    ({"h": TensorOverride(reduce_range=True)}, "'h'.*reduce_range"),
    ({"h": TensorOverride(scale=0.1, zero_point=300)}, "'h'.*outside the uint8 grid"),
    ({"w1": TensorOverride(axis=1, scale=(0.1, 0.2), zero_point=0)}, "'w1'.*2 values"),
    ({"w1": TensorOverride(axis=2)}, "'w1'.*axis 2 is out of range"),
])
def test_overrides_that_do_not_fit_the_model_are_refused(tmp_path, tensors, needle):
    with pytest.raises(QuantizationError, match=needle):
        _native(tmp_path, tensors=tensors)
    assert not (tmp_path / "native.onnx").exists()


# ---------------------------------------------------------------------------------------------
# onnxruntime's TensorQuantOverrides: the same parameters as onnxruntime writes.

def _assert_same(theirs, ours, *, activations=(), weights=()):
    for tensor in activations:
        for a, b in zip(_activation(theirs, tensor), _activation(ours, tensor), strict=True):
            assert a.dtype == b.dtype, tensor
            np.testing.assert_allclose(b, a, rtol=1e-6, err_msg=tensor)
    for node in weights:
        (*mine, my_axis), (*its, its_axis) = _weight(ours, node), _weight(theirs, node)
        assert my_axis == its_axis, node
        for a, b in zip(its, mine, strict=True):
            assert a.dtype == b.dtype, node
            np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=1e-6,
                                       err_msg=node)


def test_overrides_give_the_parameters_onnxruntime_gives(tmp_path):
    def overrides(q):
        return {
            "x": [{"quant_type": q.QuantType.QUInt16}],
            "h": [{"rmin": np.float32(-3.0), "rmax": np.float32(5.0)}],
            "w1": [{"scale": np.float32(0.01), "zero_point": np.int8(-2)}],
            "w2": [{"axis": 1, "symmetric": True}],
        }
    theirs = _ort(ortq, tmp_path, overrides(ortq))
    ours = _ort(oqq, tmp_path, overrides(oqq))
    _assert_same(theirs, ours, activations=("x", "h"), weights=("mm1", "mm2"))
    assert _activation(ours, "x")[1].dtype == np.uint16


def test_per_channel_lists_give_the_parameters_onnxruntime_gives(tmp_path):
    def overrides(q):
        channels = [{"axis": 1, "rmin": np.float32(-1.0 - i), "rmax": np.float32(0.5 * i)}
                    for i in range(DIM)]
        scales = [{"scale": np.float32(0.01 * (i + 1)), "zero_point": np.int8(i - 4)}
                  for i in range(DIM)]
        scales[0]["axis"] = 1
        return {"w1": channels, "w2": scales, "h": [{"rmax": np.float32(2.5)}]}
    theirs = _ort(ortq, tmp_path, overrides(ortq))
    ours = _ort(oqq, tmp_path, overrides(oqq))
    _assert_same(theirs, ours, activations=("h",), weights=("mm1", "mm2"))


def test_every_invalid_entry_is_reported():
    bad = {
        "a": [{"scale": np.float32(0.1)}],
        "b": [{"quant_type": "QInt9"}],
        "c": [{"rmin": 1.0, "colour": "red"}],
        "d": [{"axis": 0}, {"axis": 0, "quant_type": oqq.QuantType.QUInt8}],
        "e": [{"symmetric": True}, {"symmetric": True}],
        "f": [{"scale": 0.1, "zero_point": 0, "symmetric": True}],
    }
    with pytest.raises(ValueError, match="TensorQuantOverrides") as info:
        _to_native_config(extra_options={"TensorQuantOverrides": bad})
    message = str(info.value)
    for needle in ("'a': Must provide both 'scale' and 'zero_point'",
                   "'b': quant_type must be a QuantType", "'c': unknown key 'colour'",
                   "'d' channel 1: quant_type", "'e': per-channel overrides need 'axis'",
                   "'f': option(s) [symmetric] are invalid with 'scale'"):
        assert needle in message


def test_convert_matches_onnxruntime(tmp_path):
    """``convert`` (mixed precision): the same Q1->DQ1->Q2->DQ2 chain, names and second grid as
    onnxruntime writes (see tests/test_mixed_precision_convert.py for the native API)."""
    def overrides(q):
        return {"h": [{"quant_type": q.QuantType.QUInt8,
                       "convert": {"quant_type": q.QuantType.QUInt16, "recv_nodes": {"mm2"}}}],
                "y": [{"quant_type": q.QuantType.QUInt16}]}

    ours, theirs = _ort(oqq, tmp_path, overrides(oqq)), _ort(ortq, tmp_path, overrides(ortq))
    for model in (ours, theirs):
        assert model.opset_import[0].version == 21
    chain = ["h_QuantizeLinear", "h_DequantizeLinear", "h_convert_QuantizeLinear",
             "h_convert_DequantizeLinear"]
    for model in (ours, theirs):
        nodes = {n.name: n for n in model.graph.node}
        assert [nodes[name].op_type for name in chain] == [
            "QuantizeLinear", "DequantizeLinear"] * 2
        assert nodes["mm2"].input[0] == "h_convert_DequantizeLinear_Output"
    inits = [{i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
             for m in (ours, theirs)]
    for name in ("h_scale_convert", "h_zero_point_convert", "h_scale", "h_zero_point"):
        assert inits[0][name].dtype == inits[1][name].dtype, name
        np.testing.assert_allclose(inits[0][name], inits[1][name], rtol=1e-6, err_msg=name)


def test_a_key_given_for_some_channels_only_is_refused():
    channels = [{"axis": 1, "rmin": -1.0}] + [{} for _ in range(DIM - 1)]
    with pytest.raises(QuantizationError, match="'w1'.*'rmin'.*some channels only"):
        _to_native_config(extra_options={"TensorQuantOverrides": {"w1": channels}})


def test_translation_into_native_overrides():
    config = _to_native_config(extra_options={"TensorQuantOverrides": {
        "x": [{"quant_type": oqq.QuantType.QInt16, "symmetric": np.bool_(True)}],
        "w": [{"axis": 0, "scale": np.array(0.5, np.float32), "zero_point": np.array(1, np.int8)},
              {"scale": 0.25, "zero_point": 2}],
        "empty": [],
    }})
    assert config.tensors == {
        "x": TensorOverride(onnxquant.INT16, symmetric=True, per_channel=False),
        "w": TensorOverride(scale=(0.5, 0.25), zero_point=(1, 2), axis=0),
    }


def test_a_reduce_range_activation_is_refused_while_planning(tmp_path):
    with pytest.raises(QuantizationError, match="'h'.*reduce_range"):
        _ort(oqq, tmp_path, {"h": [{"reduce_range": True}]})


# ---------------------------------------------------------------------------------------------
# TensorQuantOverridesHelper.

def test_helper_views_the_raw_dict():
    raw = {"a": [{"quant_type": oqq.QuantType.QUInt16}],
           "w": [{"axis": 0, "quant_type": oqq.QuantType.QInt8}, {}],
           "c": [{"convert": {"quant_type": oqq.QuantType.QInt16}}]}
    helper_ = TensorQuantOverridesHelper(raw)
    assert helper_.overrides is raw
    assert len(helper_) == 3 and list(helper_) == ["a", "w", "c"] and "w" in helper_
    assert helper_["a"] is raw["a"] and helper_.get("zz") is None
    assert helper_.has_per_tensor_overrides("a") and not helper_.has_per_channel_overrides("a")
    assert helper_.has_per_channel_overrides("w") and not helper_.has_per_tensor_overrides("w")
    assert not helper_.has_per_tensor_overrides("missing")
    assert helper_.get_per_tensor_overrides("a") == {"quant_type": oqq.QuantType.QUInt16}
    assert helper_.get_per_tensor_overrides("missing", {"rmin": 0.0}) == {"rmin": 0.0}
    with pytest.raises(ValueError, match="'w'.*2 per-channel"):
        helper_.get_per_tensor_overrides("w")
    assert helper_.get_per_channel_overrides("w") is raw["w"]
    assert helper_.get_per_channel_overrides("missing") == [{}]
    assert helper_.get_quant_types() == {oqq.QuantType.QUInt16, oqq.QuantType.QInt8,
                                         oqq.QuantType.QInt16}
    assert '"quant_type": "QUInt16"' in helper_.pprint_str()


def test_is_valid_checks_every_tensor_against_the_model():
    inits = {"w": numpy_helper.from_array(W1, "w")}
    raw = {"x": [{"quant_type": oqq.QuantType.QUInt16}],
           "ghost": [{"symmetric": True}],
           "w": [{"axis": 1}, {}, {}],
           "h": [{"reduce_range": True}],
           "y": [{"convert": {"quant_type": oqq.QuantType.QUInt8}}]}
    ok, message = TensorQuantOverridesHelper(raw).is_valid(inits, {"x", "h", "y"},
                                                           oqq.QuantType.QUInt8)
    assert not ok
    lines = message.splitlines()
    assert len(lines) == 4
    assert "'ghost' is not in the model" in lines[0]
    assert "'w': 3 channel overrides for 8 channels" in lines[1]
    assert "'h': reduce_range is only for initializers" in lines[2]
    assert "'y': the 'convert' quant_type must differ" in lines[3]
    # onnxruntime's own helper stops at the first tensor it validates
    ort_ok, ort_message = ortq.tensor_quant_overrides.TensorQuantOverridesHelper(
        {k: raw[k] for k in ("x", "w")}).is_valid(inits, {"x", "h", "y"}, ortq.QuantType.QUInt8)
    assert ort_ok and ort_message is None
    assert TensorQuantOverridesHelper({"x": raw["x"]}).is_valid(inits, {"x"},
                                                                 oqq.QuantType.QUInt8) == (
        True, None)
