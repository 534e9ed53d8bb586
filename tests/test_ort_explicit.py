"""``onnxquant.ort`` honours what the user names, the way onnxruntime does.

What the user names explicitly (op types, nodes, tensors with overrides, extra options) is
quantized as onnxruntime quantizes it; onnxquant's own selection and speed rules decide only
what was left open. The emitted Q/DQ nodes and parameters are named and stored as onnxruntime
writes them (``<t>_QuantizeLinear``, ``<t>_scale`` in ``float_data``, zero points in
``int32_data``), because code written for onnxruntime's models reads them that way.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant.ort as oqq
from onnxquant.core.errors import QuantizationError

RNG = np.random.default_rng(7)
SHAPE = [2, 4, 6, 6]


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _vi(name, shape=SHAPE, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _feeds(model, n=4):
    rng = np.random.default_rng(11)  # the same feeds for every model of a test
    feeds = []
    for _ in range(n):
        feed = {}
        for inp in model.graph.input:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            if inp.type.tensor_type.elem_type == TensorProto.BOOL:
                feed[inp.name] = rng.random(dims) > 0.5
            else:
                feed[inp.name] = rng.normal(size=dims).astype(np.float32)
        feeds.append(feed)
    return feeds


def _quantize(tmp_path, model, **kwargs) -> onnx.ModelProto:
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    oqq.quantize_static(str(src), str(out), iter(_feeds(model)), **kwargs)
    return onnx.load(out)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _run(model: onnx.ModelProto, feed) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _two_adds():
    return _model([helper.make_node("Add", ["a", "b"], ["y0"], name="Add0"),
                   helper.make_node("Add", ["b", "c"], ["y1"], name="Add1")],
                  [_vi("a"), _vi("b"), _vi("c")], [_vi("y0"), _vi("y1")])


# -- explicit names win over onnxquant's selection rules ------------------------------------

def test_lone_ops_stay_float_unless_named(tmp_path):
    # Left open: an Add with no quantized neighbour would only add Q/DQ to float code.
    assert _ops(_quantize(tmp_path, _two_adds())) == ["Add", "Add"]
    # Named by op type: quantized as onnxruntime quantizes it (3 inputs, 2 outputs).
    named = _quantize(tmp_path, _two_adds(), op_types_to_quantize=["Add"])
    assert _ops(named).count("QuantizeLinear") == 5 and _ops(named).count("Add") == 2
    # Named by node: only that node.
    one = _quantize(tmp_path, _two_adds(), nodes_to_quantize=["Add1"])
    add1 = next(n for n in one.graph.node if n.name == "Add1")
    add0 = next(n for n in one.graph.node if n.name == "Add0")
    assert all(i.endswith("_DequantizeLinear_Output") for i in add1.input)
    assert list(add0.input) == ["a", "b"]


def test_tensor_override_names_the_nodes_that_touch_it(tmp_path):
    q = _quantize(tmp_path, _two_adds(), extra_options={
        "TensorQuantOverrides": {"a": [{"scale": 0.005, "zero_point": 2}]}})
    inits = {i.name: i for i in q.graph.initializer}
    assert list(inits["a_zero_point"].int32_data) == [2]
    assert np.float32(inits["a_scale"].float_data[0]) == np.float32(0.005)
    add1 = next(n for n in q.graph.node if n.name == "Add1")
    assert list(add1.input) == ["b", "c"]  # not named: stays float


def test_force_quantize_no_input_check(tmp_path):
    model = _model([helper.make_node("Add", ["x", "x"], ["s"], name="add"),
                    helper.make_node("Mul", ["x", "x"], ["p"], name="mul"),
                    helper.make_node("Where", ["cond", "s", "p"], ["y"], name="where")],
                   [_vi("cond", elem=TensorProto.BOOL), _vi("x")], [_vi("y")])
    plain = _quantize(tmp_path, model, nodes_to_exclude=["add", "mul"])
    assert _ops(plain) == ["Add", "Mul", "Where"]
    forced = _quantize(tmp_path, model, nodes_to_exclude=["add", "mul"],
                       extra_options={"ForceQuantizeNoInputCheck": True})
    where = next(n for n in forced.graph.node if n.op_type == "Where")
    assert where.input[1] == "s_DequantizeLinear_Output"
    assert where.input[2] == "p_DequantizeLinear_Output"
    assert forced.graph.output[0].name == "y" and _ops(forced)[-1] == "DequantizeLinear"


def _shallow_conv():
    w = numpy_helper.from_array(RNG.normal(size=[3, 2, 3, 3]).astype(np.float32), "w")
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                  [_vi("x", [1, 2, 10, 10])], [_vi("y", [1, 3, 8, 8])], [w])


def test_the_ort_layer_quantizes_what_onnxruntime_would(tmp_path):
    # A 2-channel 3x3 Conv on a graph input runs faster in float: onnxquant's own objective
    # keeps it float (tests run without measuring, on the fallback rules) ...
    balanced = _quantize(tmp_path, _shallow_conv(), quant_format=oqq.QuantFormat.QOperator,
                         extra_options={"Objective": "balanced"})
    assert _ops(balanced) == ["Conv"]
    # ... onnxquant.ort quantizes it, as onnxruntime does, unless asked otherwise ...
    left_open = _quantize(tmp_path, _shallow_conv(), quant_format=oqq.QuantFormat.QOperator)
    assert "QLinearConv" in _ops(left_open)
    # ... and a Conv the user names is quantized whatever the objective.
    named = _quantize(tmp_path, _shallow_conv(), quant_format=oqq.QuantFormat.QOperator,
                      op_types_to_quantize=["Conv"], extra_options={"Objective": "speed"})
    assert "QLinearConv" in _ops(named)
    with pytest.raises(ValueError, match="Objective"):
        _quantize(tmp_path, _shallow_conv(), extra_options={"Objective": "fast"})


def test_matmul_const_b_only_keeps_dynamic_matmuls_float(tmp_path):
    w = numpy_helper.from_array(RNG.normal(size=[6, 6]).astype(np.float32), "w")
    model = _model([helper.make_node("MatMul", ["a", "b"], ["ab"], name="dyn"),
                    helper.make_node("MatMul", ["ab", "w"], ["y"], name="const")],
                   [_vi("a", [3, 6]), _vi("b", [6, 6])], [_vi("y", [3, 6])], [w])
    kwargs = {"quant_format": oqq.QuantFormat.QOperator, "op_types_to_quantize": ["MatMul"]}
    both = _quantize(tmp_path, model, **kwargs)
    assert _ops(both).count("QLinearMatMul") == 2
    only = _quantize(tmp_path, model, **kwargs, extra_options={"MatMulConstBOnly": True})
    assert _ops(only).count("QLinearMatMul") == 1 and "MatMul" in _ops(only)


# -- layout options --------------------------------------------------------------------------

def _matmul_fanout():
    rng = np.random.default_rng(3)  # the same weights on every call
    inits = [numpy_helper.from_array(rng.normal(size=[6]).astype(np.float32), "p")]
    inits += [numpy_helper.from_array(rng.normal(size=[6, 6]).astype(np.float32), n)
              for n in ("q", "r", "s")]
    nodes = [helper.make_node("Add", ["x", "p"], ["t"], name="add")]
    nodes += [helper.make_node("MatMul", ["t", w], [f"y{i}"], name=f"mm{i}")
              for i, w in enumerate(("q", "r", "s"), start=1)]
    return _model(nodes, [_vi("x", [3, 6])], [_vi(f"y{i}", [3, 6]) for i in (1, 2, 3)],
                  inits)


def test_dedicated_qdq_pair_gives_each_reader_its_own_pair(tmp_path):
    shared = _quantize(tmp_path, _matmul_fanout(), nodes_to_exclude=["add"])
    dedicated = _quantize(tmp_path, _matmul_fanout(), nodes_to_exclude=["add"],
                          extra_options={"DedicatedQDQPair": True})
    for i in (1, 2, 3):
        mm = next(n for n in dedicated.graph.node if n.name == f"mm{i}")
        assert mm.input[0] == f"t_DequantizeLinear_Output_{i}"
    assert _ops(dedicated).count("QuantizeLinear") == _ops(shared).count("QuantizeLinear") + 2
    feed = _feeds(_matmul_fanout(), 1)[0]
    for a, b in zip(_run(shared, feed), _run(dedicated, feed), strict=True):
        np.testing.assert_array_equal(a, b)  # the same grid, only more nodes


def test_op_types_to_exclude_output_quantization(tmp_path):
    q = _quantize(tmp_path, _matmul_fanout(), nodes_to_exclude=["add"],
                  extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    outputs = {o.name for o in q.graph.output}
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert all(producers[o] == "MatMul" for o in outputs)


def test_use_qdq_contrib_ops(tmp_path):
    q = _quantize(tmp_path, _matmul_fanout(), extra_options={"UseQDQContribOps": True})
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(n.domain == "com.microsoft" for n in qdq)
    assert any(o.domain == "com.microsoft" for o in q.opset_import)
    feed = _feeds(_matmul_fanout(), 1)[0]
    plain = _quantize(tmp_path, _matmul_fanout())
    for a, b in zip(_run(plain, feed), _run(q, feed), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_add_qdq_pair_to_weight_keeps_the_float_weight(tmp_path):
    stored = _quantize(tmp_path, _matmul_fanout(), op_types_to_quantize=["MatMul"])
    paired = _quantize(tmp_path, _matmul_fanout(), op_types_to_quantize=["MatMul"],
                       extra_options={"AddQDQPairToWeight": True})
    inits = {i.name: i for i in paired.graph.initializer}
    assert inits["q"].data_type == TensorProto.FLOAT and "q_quantized" not in inits
    q_node = next(n for n in paired.graph.node if n.name == "q_QuantizeLinear")
    assert q_node.input[0] == "q"
    feed = _feeds(_matmul_fanout(), 1)[0]
    for a, b in zip(_run(stored, feed), _run(paired, feed), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


# -- names and storage as onnxruntime writes them --------------------------------------------

def test_parameters_are_named_and_stored_like_onnxruntime(tmp_path):
    w = numpy_helper.from_array(RNG.normal(size=[3, 4, 3, 3]).astype(np.float32), "W")
    b = numpy_helper.from_array(RNG.normal(size=[3]).astype(np.float32), "B")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    model = _model([helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
                    helper.make_node("Reshape", ["c", "shape"], ["y"], name="reshape")],
                   [_vi("x", [1, 4, 6, 6])], [_vi("y", [1, 48])], [w, b, shape])
    q = _quantize(tmp_path, model, activation_type=oqq.QuantType.QUInt8,
                  weight_type=oqq.QuantType.QInt8)
    inits = {i.name: i for i in q.graph.initializer}
    for name in ("x", "W", "c"):
        assert len(inits[f"{name}_zero_point"].int32_data) == 1, name
        assert len(inits[f"{name}_scale"].float_data) == 1, name
    assert list(inits["B_quantized_zero_point"].int32_data) == [0]
    # The Reshape output shares the Conv output's grid: the same initializers.
    dq_y = next(n for n in q.graph.node if n.output[0] == "y")
    assert dq_y.input[1:] == ["c_scale", "c_zero_point"]
    # The graph output keeps its name; the tensor before its Q/DQ pair is renamed.
    q_y = next(n for n in q.graph.node if n.op_type == "QuantizeLinear"
               and n.output[0] == dq_y.input[0])
    assert q_y.input[0] == "y_QuantizeLinear_Input"


def test_relu_writing_a_graph_output_is_folded(tmp_path):
    w = numpy_helper.from_array(RNG.normal(size=[3, 4, 1, 1]).astype(np.float32), "W")
    model = _model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
                    helper.make_node("Relu", ["c"], ["y"], name="relu")],
                   [_vi("x", [1, 4, 5, 5])], [_vi("y", [1, 3, 5, 5])], [w])
    q = _quantize(tmp_path, model, activation_type=oqq.QuantType.QUInt8)
    assert "Relu" not in _ops(q) and q.graph.output[0].name == "y"
    inits = {i.name: i for i in q.graph.initializer}
    zero_points = [v for k, v in inits.items() if k.endswith("_zero_point") and "W" not in k]
    assert any(list(z.int32_data) == [0] for z in zero_points)  # the grid starts at 0
    feed = _feeds(model, 1)[0]
    got = _run(q, feed)[0]
    assert got.min() >= 0.0
    want = np.maximum(_run(model, feed)[0], 0.0)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_onnx_element_types_are_accepted_as_ints(tmp_path):
    q = _quantize(tmp_path, _matmul_fanout(), activation_type=TensorProto.UINT16,
                  weight_type=TensorProto.UINT8)
    types = {n.name: n for n in q.graph.node}
    assert any(n.op_type == "QuantizeLinear" for n in types.values())
    inits = {i.name: i for i in q.graph.initializer}
    assert inits["x_zero_point"].data_type == TensorProto.UINT16
    with pytest.raises(ValueError, match="ONNX element type"):
        _quantize(tmp_path, _matmul_fanout(), activation_type=TensorProto.FLOAT)


def test_an_override_of_a_missing_tensor_raises(tmp_path):
    with pytest.raises(ValueError, match="'NOPE'.*not present in the model"):
        _quantize(tmp_path, _matmul_fanout(),
                  extra_options={"TensorQuantOverrides": {"NOPE": [{"rmax": 1.0}]}})
    assert not (tmp_path / "q.onnx").exists()


def test_minimum_real_range_applies_to_weights(tmp_path):
    zeros = numpy_helper.from_array(np.zeros([3, 4, 1, 1], np.float32), "W")
    model = _model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
                   [_vi("x", [1, 4, 3, 3])], [_vi("y", [1, 3, 3, 3])], [zeros])
    q = _quantize(tmp_path, model, activation_type=oqq.QuantType.QUInt8,
                  weight_type=oqq.QuantType.QUInt8, extra_options={"MinimumRealRange": 1e-4})
    inits = {i.name: i for i in q.graph.initializer}
    assert np.float32(inits["W_scale"].float_data[0]) == np.float32(1e-4 / 255)


def test_named_options_are_type_checked():
    from onnxquant.ort._options import _to_native_config

    with pytest.raises(QuantizationError, match="list of op types"):
        _to_native_config(extra_options={"OpTypesToExcludeOutputQuantization": "MatMul"})
    config = _to_native_config(op_types_to_quantize=["Conv"], nodes_to_quantize=["n"],
                               extra_options={"ForceQuantizeNoInputCheck": True,
                                              "DedicatedQDQPair": True})
    assert config.force_op_types == frozenset({"Conv"}) and config.force_nodes == {"n"}
    assert config.force_quantize and config.dedicated_qdq_pairs


@pytest.mark.parametrize(("low", "high", "zero_point"), [(0.0, 2.0, 0), (-1.0, 2.0, 128),
                                                         (0.0, 0.0, 0), (-3.0, -1.0, 128)])
def test_activation_restricted_asymmetric(tmp_path, low, high, zero_point):
    w = numpy_helper.from_array(np.ones([2, 2, 1, 1], np.float32), "W")
    model = _model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
                   [_vi("x", [1, 2, 4, 4])], [_vi("y", [1, 2, 4, 4])], [w])
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    feeds = [{"x": np.full([1, 2, 4, 4], v, np.float32)} for v in (low, high)]
    oqq.quantize_static(str(src), str(out), iter(feeds), activation_type=oqq.QuantType.QUInt8,
                        weight_type=oqq.QuantType.QUInt8, op_types_to_quantize=["Conv"],
                        extra_options={"ActivationRestrictedAsymmetric": True})
    inits = {i.name: i for i in onnx.load(out).graph.initializer}
    assert list(inits["x_zero_point"].int32_data) == [zero_point]
    scale = np.float32(inits["x_scale"].float_data[0])
    lo, hi = min(low, 0.0), max(high, 0.0)
    # the smallest scale that holds both sides around the restricted zero point
    want = 1.0 if lo == hi == 0 else max(-lo / (zero_point - 0) if zero_point else 0.0,
                                         hi / (255 - zero_point))
    assert scale == pytest.approx(want, rel=1e-6)
