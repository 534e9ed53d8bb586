"""Each pre-processing pass alone, on models built in code: what it changed (op types that
remain, initializers that appear, shapes that are now known) and what it must not change."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

import onnxquant
from onnxquant.preprocess import (
    ShapeCensus,
    explain_unknown,
    infer_onnx_shapes,
    infer_symbolic_shapes,
    optimize_graph,
    shape_census,
)
from onnxquant.preprocess._value_info import is_anonymous

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def _ops(model: ir.Model) -> list[str]:
    return sorted(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


def _run(model: onnx.ModelProto | ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _value(model: ir.Model, name: str) -> ir.Value:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.name == name:
                return value
    raise KeyError(name)


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]


# ------------------------------------------------------------------------- constant folding
S, B, K, H = 4, 2, 6, 8


def lstm_with_computed_weights(seed: int = 0) -> onnx.ModelProto:
    """LSTM whose W, R, B are ``Unsqueeze(Concat(constants))``, as silero_vad's export."""
    rng = np.random.default_rng(seed)
    halves = {f"{n}{i}": (rng.standard_normal(shape) * 0.3).astype(np.float32)
              for n, shape in (("w", (2 * H, K)), ("r", (2 * H, H)), ("b", (4 * H,)))
              for i in (0, 1)}
    nodes = []
    for name in ("w", "r", "b"):
        nodes.append(helper.make_node("Constant", [], [f"{name}0"], name=f"const_{name}0",
                                      value=numpy_helper.from_array(halves[f"{name}0"])))
        nodes.append(helper.make_node("Constant", [], [f"{name}1"], name=f"const_{name}1",
                                      value=numpy_helper.from_array(halves[f"{name}1"])))
        nodes.append(helper.make_node("Concat", [f"{name}0", f"{name}1"], [f"{name}_cat"],
                                      name=f"concat_{name}", axis=0))
        nodes.append(helper.make_node("Unsqueeze", [f"{name}_cat", "axes0"], [name.upper()],
                                      name=f"unsqueeze_{name}"))
    nodes.append(helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h"], name="lstm",
                                  hidden_size=H))
    return _model(nodes, [helper.make_tensor_value_info("X", F, [S, B, K])],
                  [helper.make_tensor_value_info("Y", F, None),
                   helper.make_tensor_value_info("Y_h", F, None)],
                  [numpy_helper.from_array(np.array([0], np.int64), "axes0")])


def test_constant_chain_feeding_lstm_weights_is_folded() -> None:
    proto = lstm_with_computed_weights()
    model = _ir(proto)
    result = optimize_graph(model)
    assert _ops(result.model) == ["LSTM"]
    lstm = next(iter(result.model.graph))
    for index, shape in ((1, (1, 4 * H, K)), (2, (1, 4 * H, H)), (3, (1, 8 * H))):
        weight = lstm.inputs[index]
        assert weight is not None and weight.is_initializer()
        assert weight.const_value is not None and weight.const_value.shape.numpy() == shape
    assert result.report.changed
    assert "removed: " in result.report.details[1] and "Concat 3" in result.report.details[1]
    assert _ops(model) == sorted(["Constant"] * 6 + ["Concat"] * 3 + ["Unsqueeze"] * 3
                                 + ["LSTM"])  # the given model is untouched
    feed = {"X": np.random.default_rng(1).standard_normal((S, B, K)).astype(np.float32)}
    for want, got in zip(_run(proto, feed), _run(result.model, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_folded_lstm_is_quantized_dynamically(tmp_path) -> None:
    src = tmp_path / "lstm.onnx"
    onnx.save(lstm_with_computed_weights(), src)
    onnxquant.preprocess(src, tmp_path / "pre.onnx")
    onnxquant.quantize_dynamic(tmp_path / "pre.onnx", tmp_path / "q.onnx",
                               onnxquant.DynamicQuantConfig(evaluate=False))
    ops = [(n.domain, n.op_type) for n in onnx.load(tmp_path / "q.onnx").graph.node]
    assert ("com.microsoft", "DynamicQuantizeLSTM") in ops
    assert ("", "LSTM") not in ops


# --------------------------------------------------------------------- graph optimizations
def _conv_weights(rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32),
                                "conv_W"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "bn_bias"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "bn_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), "bn_var"),
        numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "add_c"),
    ]


def test_identity_dropout_batchnorm_add_and_common_subexpressions_go() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"], name="identity_in"),
        helper.make_node("Conv", ["x_id", "conv_W"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "bn_scale", "bn_bias", "bn_mean",
                                                "bn_var"], ["bn"], name="bn"),
        helper.make_node("Add", ["bn", "add_c"], ["biased"], name="add_bias"),
        helper.make_node("Dropout", ["biased"], ["dropped"], name="dropout"),
        helper.make_node("Relu", ["dropped"], ["relu_a"], name="relu_a"),
        helper.make_node("Relu", ["dropped"], ["relu_b"], name="relu_b"),  # same as relu_a
        helper.make_node("Add", ["relu_a", "relu_b"], ["sum"], name="sum"),
        helper.make_node("Identity", ["sum"], ["y"], name="identity_out"),
    ]
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                   [helper.make_tensor_value_info("y", F, ["N", 4, 8, 8])], _conv_weights(rng))
    result = optimize_graph(_ir(proto))
    assert _ops(result.model) == ["Add", "Conv", "Relu"]
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run(result.model, feed)[0], _run(proto, feed)[0],
                               rtol=1e-4, atol=1e-5)


def test_optimization_that_onnxruntime_refuses_leaves_the_model_and_says_why() -> None:
    proto = _model([helper.make_node("Frobnicate", ["x"], ["y"], name="custom",
                                     domain="example.custom")],
                   [helper.make_tensor_value_info("x", F, [2])],
                   [helper.make_tensor_value_info("y", F, [2])])
    proto.opset_import.append(helper.make_opsetid("example.custom", 1))
    model = _ir(proto)
    result = optimize_graph(model)
    assert result.model is model
    assert not result.report.changed
    assert result.report.problem is not None and "onnxruntime" in result.report.problem
    assert "Frobnicate" in result.report.problem


# -------------------------------------------------------------------------- shape inference
def _control_flow_model(*, loop_condition: bool = True) -> onnx.ModelProto:
    """``x`` [N,4] through an If (Relu / Neg branches) and a Loop (3 x Add x) -> y.

    Without ``loop_condition`` the Loop's optional condition input is omitted (valid ONNX).
    """
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["then_out"], name="then_relu")],
                               "then", [], [helper.make_tensor_value_info("then_out", F, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["else_out"], name="else_neg")],
                               "else", [], [helper.make_tensor_value_info("else_out", F, None)])
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "x"], ["acc_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [helper.make_tensor_value_info("i", I64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", F, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", F, None)])
    condition = "keep_going" if loop_condition else ""
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], name="total", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["flag"], name="flag"),
        helper.make_node("If", ["flag"], ["branch"], name="if", then_branch=then_g,
                         else_branch=else_g),
        helper.make_node("Loop", ["trips", condition, "branch"], ["looped"], name="loop",
                         body=body),
        helper.make_node("Sigmoid", ["looped"], ["y"], name="sigmoid"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 4])],
                  [helper.make_tensor_value_info("y", F, None)],
                  [numpy_helper.from_array(np.float32(0), "zero"),
                   numpy_helper.from_array(np.int64(3), "trips"),
                   numpy_helper.from_array(np.array(True), "keep_going")])


_IF_VALUES = ("branch", "then_out", "else_out", "acc_out")
_LOOP_VALUES = ("looped", "y")


def test_symbolic_shapes_through_if_and_loop() -> None:
    model = _ir(_control_flow_model())
    assert all(_value(model, name).shape is None for name in _IF_VALUES + _LOOP_VALUES)
    report = infer_symbolic_shapes(model)
    assert report.changed and report.problem is None
    for name in _IF_VALUES + _LOOP_VALUES:
        assert _dims(_value(model, name)) == ["N", 4], name
    assert _dims(_value(model, "flag")) == []
    assert [n.op_type for n in model.graph] == ["ReduceSum", "Greater", "If", "Loop",
                                                "Sigmoid"]  # shapes only


def test_onnx_shapes_through_if_and_into_a_loop_body() -> None:
    """ONNX's Loop rule does not give loop-carried outputs a shape (symbolic inference does)."""
    model = _ir(_control_flow_model())
    report = infer_onnx_shapes(model)
    assert report.changed and report.problem is None
    for name in _IF_VALUES:
        assert _dims(_value(model, name)) == ["N", 4], name
    assert _value(model, "looped").shape is None


def test_symbolic_inference_that_fails_on_a_loop_keeps_the_shapes_before_it() -> None:
    """onnxruntime's Loop rule fails (KeyError) on an omitted condition input."""
    model = _ir(_control_flow_model(loop_condition=False))
    report = infer_symbolic_shapes(model)
    for name in _IF_VALUES[:3]:
        assert _dims(_value(model, name)) == ["N", 4], name
    assert report.changed
    assert report.problem is not None and "node 'loop' (Loop)" in report.problem
    assert report.node == "loop"
    assert _value(model, "looped").shape is None


def test_pipeline_reports_what_stays_unknown_and_why(tmp_path) -> None:
    onnx.save(_control_flow_model(loop_condition=False), tmp_path / "cf.onnx")
    result = onnxquant.preprocess(tmp_path / "cf.onnx", tmp_path / "out.onnx",
                                  onnxquant.PreprocessConfig(optimize=False))
    assert [s.step for s in result.steps] == ["symbolic shapes", "onnx shapes"]
    assert result.warnings() == [f"symbolic shapes: {result.steps[0].problem}"]
    assert (result.shapes_after.unknown, result.shapes_after.total) == (2, 9)
    [group] = result.unknown
    assert (group.node, group.op_type, group.values) == ("loop", "Loop", 2)
    assert group.reason.startswith("symbolic shapes stopped here: stopped at node 'loop'")
    text = result.summary()
    assert "still unknown, by the node where shape inference stops:" in text
    assert "node 'loop' (Loop): symbolic shapes stopped here" in text


def test_pipeline_shapes_through_if_and_loop(tmp_path) -> None:
    onnx.save(_control_flow_model(), tmp_path / "cf.onnx")
    result = onnxquant.preprocess(tmp_path / "cf.onnx", tmp_path / "out.onnx",
                                  onnxquant.PreprocessConfig(optimize=False))
    assert result.warnings() == []
    assert result.shapes_after.known == result.shapes_after.total == 9
    out = onnx.load(tmp_path / "out.onnx")
    y = next(o for o in out.graph.output if o.name == "y")
    assert [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim] == ["N", 4]


def _concat_axis_model() -> onnx.ModelProto:
    """Relu -> Reshape(shape = Concat(2, -1; axis=-1)) -> Sigmoid: valid ONNX, but
    onnxruntime's symbolic inference asserts ``axis == 0`` on a Concat of constants."""
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"], name="relu"),
        helper.make_node("Concat", ["two", "minus_one"], ["shape"], name="shape_concat",
                         axis=-1),
        helper.make_node("Reshape", ["relu", "shape"], ["reshaped"], name="reshape"),
        helper.make_node("Sigmoid", ["reshaped"], ["y"], name="sigmoid"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 6])],
                  [helper.make_tensor_value_info("y", F, None)],
                  [numpy_helper.from_array(np.array([2], np.int64), "two"),
                   numpy_helper.from_array(np.array([-1], np.int64), "minus_one")])


def test_symbolic_inference_that_onnxruntime_aborts_keeps_what_it_inferred() -> None:
    proto = _concat_axis_model()
    with pytest.raises(AssertionError):  # onnxruntime's own use of it fails on this model
        SymbolicShapeInference.infer_shapes(proto)
    model = _ir(proto)
    report = infer_symbolic_shapes(model)
    assert report.problem is not None
    assert "node 'shape_concat' (Concat)" in report.problem and "AssertionError" in report.problem
    assert report.node == "shape_concat"
    assert _dims(_value(model, "relu")) == ["N", 6]  # inferred before it stopped
    for name in ("shape", "reshaped", "y"):
        assert _value(model, name).shape is None
    unknown = explain_unknown(model, {"shape_concat": "symbolic inference stopped here"})
    assert [(u.node, u.op_type, u.reason, u.values) for u in unknown] == [
        ("shape_concat", "Concat", "symbolic inference stopped here", 3)]
    assert shape_census(model).unknown == 3
    infer_onnx_shapes(model)  # the pipeline's next step fills in what it can
    assert _dims(_value(model, "shape")) == [2]
    assert _dims(_value(model, "y"))[0] == 2 and is_anonymous(_value(model, "y").shape[1])
    assert shape_census(model) == ShapeCensus(known=2, partial=2, unknown=0)


def test_unknown_shapes_are_grouped_under_the_node_where_inference_stops() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"], name="relu"),
        helper.make_node("Frobnicate", ["relu"], ["odd"], name="custom", domain="example.custom"),
        helper.make_node("Sigmoid", ["odd"], ["sig"], name="sigmoid"),
        helper.make_node("Neg", ["sig"], ["y"], name="neg"),
    ]
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 6])],
                   [helper.make_tensor_value_info("y", F, None)])
    proto.opset_import.append(helper.make_opsetid("example.custom", 1))
    model = _ir(proto)
    infer_onnx_shapes(model)
    census = shape_census(model)
    assert (census.known, census.partial, census.unknown) == (1, 0, 3)
    unknown = explain_unknown(model)
    assert [(u.node, u.op_type, u.values) for u in unknown] == [
        ("custom", "example.custom::Frobnicate", 3)]
    assert "no shape rule" in unknown[0].reason and "example.custom" in unknown[0].reason


def test_onnx_shapes_follow_shape_computations_with_data_propagation() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Gather", ["x_shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch_1d"], name="unsqueeze"),
        helper.make_node("Concat", ["batch_1d", "twelve"], ["new_shape"], name="concat",
                         axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"], name="reshape"),
    ]
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 4])],
                   [helper.make_tensor_value_info("y", F, None)],
                   [numpy_helper.from_array(np.int64(0), "zero"),
                    numpy_helper.from_array(np.array([0], np.int64), "axes0"),
                    numpy_helper.from_array(np.array([12], np.int64), "twelve")])
    without = _ir(proto)
    infer_onnx_shapes(without, data_prop=False)
    shape = _value(without, "y").shape
    assert shape is not None and len(shape) == 2 and all(is_anonymous(d) for d in shape)
    model = _ir(proto)
    report = infer_onnx_shapes(model)
    assert report.changed
    assert _dims(_value(model, "y")) == ["N", 12]


def test_a_constant_folded_in_two_bodies_is_stored_once(tmp_path):
    """onnxruntime folds Transpose(W) in each If branch separately; the result keeps one
    copy, read from the outer scope, and computes the same function."""
    import onnxquant

    w = np.arange(256, dtype=np.float32).reshape(16, 16) / 256
    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Transpose", ["w"], [f"wt_{op}"], perm=[1, 0]),
             helper.make_node(op, ["x", f"wt_{op}"], [f"out_{op}"])],
            f"{op}_branch", [], [helper.make_tensor_value_info(f"out_{op}", TensorProto.FLOAT,
                                                               [16, 16])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("Add"),
                          else_branch=branch("Sub"))],
        "two_bodies",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnxquant.preprocess(model, tmp_path / "pre.onnx")
    pre = onnx.load(tmp_path / "pre.onnx")
    stored = [numpy_helper.to_array(t) for g in _all_graphs(pre.graph) for t in g.initializer
              if t.data_type == TensorProto.FLOAT]
    assert sum(a.size for a in stored) == w.size  # one copy of W or of its transpose
    x = np.ones((16, 16), np.float32)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        np.testing.assert_array_equal(_run_proto(pre, feed), _run_proto(model, feed))


def _all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _all_graphs(attr.g)
    return found


def _run_proto(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feed)[0]
