"""QOperator rewrites made for onnxruntime's CPU kernels (see the rapidocr cls profile).

- a Mul/Div by a positive scalar after an integer node is folded into its output grid;
- ``Conv → Add(per-channel constant)`` is folded into the Conv's bias before planning;
- depthwise Convs whose channel count is not a multiple of 16 stay float with their
  elementwise tail (``float_depthwise_multiple``);
- shallow Convs (depth < 32) on a float input stay float (``float_conv_depth``);
- an 8-bit MaxPool is emitted channels-last (see also ``test_operator[MaxPool-*]``).
"""

from __future__ import annotations

import collections
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from static_helpers import one_input_model

from onnxquant import StaticQuantConfig, quantize_static
from onnxquant.core.qtypes import INT8, UINT8, QuantFormat
from onnxquant.preprocess.conv_add import fold_conv_add

_RNG = np.random.default_rng(11)


_model = one_input_model


def _weight(*shape: int) -> np.ndarray:
    return (_RNG.standard_normal(shape) * 0.4).astype(np.float32)


def _quantize(model: onnx.ModelProto, tmp_path: Path, **fields: object):
    out = tmp_path / f"q{len(list(tmp_path.iterdir()))}.onnx"
    fields.setdefault("float_conv_depth", None)  # the toy models' stems are shallow
    config = StaticQuantConfig(activation_type=UINT8, weight_type=INT8,
                               format=QuantFormat.QOPERATOR, per_channel_fallback_db=None,
                               **fields)  # type: ignore[arg-type]
    result = quantize_static(model, out, zoo.random_feeds(model, 8, seed=1), config)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    return proto, result


def _ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def _sqnr(model: onnx.ModelProto, proto: onnx.ModelProto) -> float:
    feeds = zoo.random_feeds(model, 4, seed=5)
    ref, got = zoo.run(model, feeds), zoo.run(proto, feeds)
    return min(zoo.sqnr_db(r[0], g[0]) for r, g in zip(ref, got, strict=True))


def hardswish_model() -> onnx.ModelProto:
    """conv1 → HardSwish as Add/Clip/Mul/Div(6) → conv2."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv1"),
             helper.make_node("Add", ["c", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["r"], name="clip"),
             helper.make_node("Mul", ["c", "r"], ["m"], name="mul"),
             helper.make_node("Div", ["m", "six"], ["h"], name="div"),
             helper.make_node("Conv", ["h", "W2"], ["y"], name="conv2")]
    inits = {"W1": _weight(8, 4, 1, 1), "W2": _weight(8, 8, 1, 1), "three": np.float32(3),
             "zero": np.float32(0), "six": np.float32(6)}
    return _model(nodes, inits, [1, 4, 6, 6], ["y"])


def test_division_folds_into_producer_grid(tmp_path: Path) -> None:
    model = hardswish_model()
    proto, result = _quantize(model, tmp_path)
    ops = _ops(proto)
    # the Div is gone; Add and Mul stay integer, Clip is fused into the Add's grid
    assert ops["QLinearMul"] == 1 and ops["QLinearAdd"] == 1 and ops["Div"] == 0
    plan = result.plan
    assert plan.nodes["div"].action == "remove" and "folded" in plan.nodes["div"].reason
    # the QLinearMul writes the Div's output on the Div's grid times 6
    qmul = next(n for n in proto.graph.node if n.op_type == "QLinearMul")
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert np.isclose(float(inits[qmul.input[6]]), plan.tensors["h"].scale[0] * 6, rtol=1e-6)
    assert int(inits[qmul.input[7]]) == plan.tensors["h"].zero_point[0]
    assert plan.tensors["m"].source == "folded:div"
    assert _sqnr(model, proto) > 25


def test_negative_factor_is_not_folded(tmp_path: Path) -> None:
    model = hardswish_model()
    for init in model.graph.initializer:
        if init.name == "six":
            init.CopyFrom(numpy_helper.from_array(np.float32(-6), "six"))
    model.graph.node[2].input[2] = "six_pos"  # Clip keeps a positive bound
    model.graph.initializer.append(numpy_helper.from_array(np.float32(6), "six_pos"))
    proto, result = _quantize(model, tmp_path)
    assert result.plan.nodes["div"].action == "quantize"
    assert _ops(proto)["QLinearMul"] == 2


def conv_add_model(bias_shape: tuple[int, ...]) -> onnx.ModelProto:
    """conv (no bias) → Add(Reshape(c, bias_shape)) → Relu → conv2."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv1"),
             helper.make_node("Reshape", ["b", "shape"], ["b4"], name="reshape"),
             helper.make_node("Add", ["c", "b4"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2")]
    size = int(np.prod(bias_shape))
    inits = {"W1": _weight(8, 4, 3, 3), "W2": _weight(8, 8, 1, 1),
             "b": _RNG.standard_normal(size).astype(np.float32),
             "shape": np.asarray(bias_shape, np.int64)}
    return _model(nodes, inits, [1, 4, 6, 6], ["y"])


def test_conv_add_folds_into_bias() -> None:
    model = ir.serde.deserialize_model(conv_add_model((1, 8, 1, 1)))
    bias = model.graph.initializers["b"].const_value.numpy().copy()
    assert fold_conv_add(model) == 1
    ops = [n.op_type for n in model.graph]
    assert ops == ["Conv", "Relu", "Conv"]
    conv = next(iter(model.graph))
    np.testing.assert_array_equal(conv.inputs[2].const_value.numpy(), bias)
    assert conv.outputs[0].name == "a"  # the Add's output name survives
    # a constant varying over H/W is not a bias
    spatial = ir.serde.deserialize_model(conv_add_model((1, 1, 4, 1)))
    assert fold_conv_add(spatial) == 0


def test_conv_add_quantized_without_qlinearadd(tmp_path: Path) -> None:
    model = conv_add_model((8, 1, 1))
    proto, _ = _quantize(model, tmp_path)
    ops = _ops(proto)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 0
    assert _sqnr(model, proto) > 25


def depthwise_model(channels: int) -> onnx.ModelProto:
    """pw conv → depthwise 3x3 (``channels``) → Relu → pw conv."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["p"], name="pw1"),
             helper.make_node("Conv", ["p", "Wd", "Bd"], ["d"], name="dw", group=channels,
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="pw2")]
    inits = {"W1": _weight(channels, 4, 1, 1), "Wd": _weight(channels, 1, 3, 3),
             "Bd": _weight(channels), "W2": _weight(8, channels, 1, 1)}
    return _model(nodes, inits, [1, 4, 6, 6], ["y"])


def test_depthwise_with_odd_channels_stays_float(tmp_path: Path) -> None:
    model = depthwise_model(24)
    proto, result = _quantize(model, tmp_path)
    ops = _ops(proto)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 1 and ops["Relu"] == 1
    assert "float_depthwise_multiple" in result.plan.nodes["dw"].reason
    assert result.plan.nodes["relu"].action == "float"
    assert _sqnr(model, proto) > 25
    # a multiple of 16 channels, or the rule switched off: every Conv is integer
    for channels, fields in ((32, {}), (24, {"float_depthwise_multiple": None})):
        proto, _ = _quantize(depthwise_model(channels), tmp_path, **fields)
        assert _ops(proto)["QLinearConv"] == 3 and _ops(proto)["Conv"] == 0


def test_depthwise_rule_leaves_qdq_alone(tmp_path: Path) -> None:
    out = tmp_path / "qdq.onnx"
    model = depthwise_model(24)
    quantize_static(model, out, zoo.random_feeds(model, 8, seed=1),
                    StaticQuantConfig(activation_type=UINT8, format=QuantFormat.QDQ))
    convs = [n for n in onnx.load(out).graph.node if n.op_type == "Conv"]
    dequantized = {n.output[0] for n in onnx.load(out).graph.node
                   if n.op_type == "DequantizeLinear"}
    assert all(c.input[1] in dequantized for c in convs)


def stem_model(in_channels: int) -> onnx.ModelProto:
    """3x3 stride-2 stem on the graph input (depth ``in_channels`` * 9) → Relu → pw conv
    (32 → 32, depth 32) → Relu → pw conv (32 → 16, depth 32)."""
    nodes = [helper.make_node("Conv", ["x", "Ws"], ["s"], name="stem", strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
             helper.make_node("Conv", ["sr", "W1"], ["p"], name="pw1"),
             helper.make_node("Relu", ["p"], ["pr"], name="pw1_relu"),
             helper.make_node("Conv", ["pr", "W2"], ["y"], name="pw2")]
    inits = {"Ws": _weight(32, in_channels, 3, 3), "W1": _weight(32, 32, 1, 1),
             "W2": _weight(16, 32, 1, 1)}
    return _model(nodes, inits, [1, in_channels, 12, 12], ["y"])


def test_shallow_stem_on_graph_input_stays_float(tmp_path: Path) -> None:
    model = stem_model(3)  # depth 3 * 3 * 3 = 27 < 32
    proto, result = _quantize(model, tmp_path, float_conv_depth=32)
    ops = _ops(proto)
    assert ops["Conv"] == 1 and ops["Relu"] == 1 and ops["QLinearConv"] == 2
    stem = result.plan.nodes["stem"]
    assert stem.action == "float" and "reduction depth 27" in stem.reason
    assert "float_conv_depth" in stem.reason
    assert "elementwise tail" in result.plan.nodes["stem_relu"].reason
    first = proto.graph.node[0]
    assert first.op_type == "Conv" and first.input[0] == "x"  # the graph input stays float
    assert [n.op_type for n in proto.graph.node].index("QuantizeLinear") == 2
    assert _sqnr(model, proto) > 25
    # a deep stem (4 * 9 = 36), or the rule switched off: every Conv is integer
    for channels, fields in ((4, {"float_conv_depth": 32}), (3, {})):
        proto, _ = _quantize(stem_model(channels), tmp_path, **fields)
        assert _ops(proto)["QLinearConv"] == 3 and _ops(proto)["Conv"] == 0


def test_shallow_conv_inside_integer_region_stays_integer(tmp_path: Path) -> None:
    """pw1 (depth 32 < 34) reads the quantized output of a deeper stem (36): leaving it would
    cost a DequantizeLinear/QuantizeLinear pair, so only a float input makes a shallow Conv
    float."""
    proto, result = _quantize(stem_model(4), tmp_path, float_conv_depth=34)
    assert _ops(proto)["QLinearConv"] == 3
    assert result.plan.nodes["pw1"].action == "quantize"
    # with depth 40 the stem (36) stays float, and so do pw1 and pw2 (32) on its float
    # output: no integer region is opened at all
    proto, result = _quantize(stem_model(4), tmp_path, float_conv_depth=40)
    assert [result.plan.nodes[n].action for n in ("stem", "pw1", "pw2")] == ["float"] * 3
    assert _ops(proto)["QLinearConv"] == 0 and _ops(proto)["QuantizeLinear"] == 0
