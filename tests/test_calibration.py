"""Calibration: the augmented model's (min, max) pairs and the MinMax observer.

Ranges from :func:`calibrate_ranges` are compared with independent references: the float model
run by onnxruntime with the tensors made graph outputs (main graphs), and numpy
re-implementations of the If branches and the Loop/Scan bodies (subgraph tensors, which
onnxruntime cannot return directly). Only the If branch that ran contributes; Loop and Scan
bodies contribute every iteration.
"""

from __future__ import annotations

import math

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxquant import StaticQuantConfig
from onnxquant.calibration.augment import expose_ranges
from onnxquant.calibration.observers import MinMaxObserver
from onnxquant.calibration.runner import calibrate_ranges
from onnxquant.static.api import prepare_model

Range = tuple[float, float]


# -- references ------------------------------------------------------------------------------
_zoo_tensors = zoo.zoo_tensors


def _span(arrays: list[np.ndarray]) -> Range:
    return (float(min(np.min(a) for a in arrays)), float(max(np.max(a) for a in arrays)))


def _assert_ranges_close(got: dict[str, Range], expected: dict[str, Range]) -> None:
    assert set(got) == set(expected)
    for name, (low, high) in expected.items():
        np.testing.assert_allclose(got[name], (low, high), rtol=1e-5, atol=1e-6, err_msg=name)


def _with_all_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph also outputs ``names`` (float tensors)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def _main_graph_float_tensors(model: ir.Model) -> list[str]:
    names = [v.name for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT]
    names += [v.name for node in model.graph for v in node.outputs
              if v.dtype == ir.DataType.FLOAT]
    return [n for n in names if n]


def _conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Conv1d (cross-correlation), kernel 3, pad 1, in float64."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1)))
    windows = np.stack([padded[:, :, i:i + 3] for i in range(x.shape[2])], axis=2)
    return np.einsum("nclk,ock->nol", windows, w.astype(np.float64)) + b[None, :, None]


def _if_model_reference(feeds: list[dict[str, np.ndarray]]) -> dict[str, Range]:
    """Ranges of the if_subgraph_model tensors, from the branch each feed takes."""
    t = _zoo_tensors(zoo.if_subgraph_model())
    seen: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        x = feed["x"]
        values = {"x": x}
        if feed["flag"]:
            values["then_conv_out"] = _conv1d(x, t["then_conv_W"], t["then_conv_B"])
            values["then_relu_out"] = np.maximum(values["then_conv_out"], 0)
            values["inner_then_out"] = _conv1d(values["then_relu_out"], t["inner_conv_W"],
                                               t["inner_conv_B"])
            values["y"] = values["inner_then_out"]
        else:
            values["else_conv_out"] = _conv1d(x, t["else_conv_W"], t["else_conv_B"])
            values["else_out"] = np.maximum(values["else_conv_out"], 0)
            values["y"] = values["else_out"]
        for name, value in values.items():
            seen.setdefault(name, []).append(value)
    return {name: _span(values) for name, values in seen.items()}


IF_TENSORS = ["x", "then_conv_out", "then_relu_out", "inner_then_out", "else_conv_out",
              "else_out", "y"]


def _prepared(model: onnx.ModelProto) -> ir.Model:
    return prepare_model(model, StaticQuantConfig(fold_batchnorm=False))


# -- main graphs -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn", "transformer_block", "matmul_chain"])
def test_main_graph_ranges_match_the_float_model(name: str) -> None:
    float_model = getattr(zoo, name)()
    model = _prepared(float_model)
    names = _main_graph_float_tensors(model)
    assert len(names) > 5
    feeds = zoo.random_feeds(float_model, 6, seed=4)
    result = calibrate_ranges(model, names, feeds)
    assert result.samples == 6 and result.unobserved == [] and result.nonfinite == {}

    probe = _with_all_outputs(ir.serde.serialize_model(model), names)
    outputs = zoo.run(probe, feeds)
    index = {o.name: i for i, o in enumerate(probe.graph.output)}
    expected = {n: _span([feed_outputs[index[n]] for feed_outputs in outputs]) for n in names}
    _assert_ranges_close(result.ranges, expected)


def test_calibration_leaves_the_model_unchanged() -> None:
    model = _prepared(zoo.if_subgraph_model())
    before = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
    calibrate_ranges(model, IF_TENSORS, zoo.random_feeds(zoo.if_subgraph_model(), 2))
    assert ir.serde.serialize_model(model).SerializeToString(deterministic=True) == before


def test_max_samples() -> None:
    float_model = zoo.matmul_chain()
    feeds = zoo.random_feeds(float_model, 6, seed=4)
    limited = calibrate_ranges(_prepared(float_model), ["x"], feeds, max_samples=2)
    assert limited.samples == 2
    assert limited.ranges["x"] == pytest.approx(_span([f["x"] for f in feeds[:2]]), rel=1e-6)


# -- If --------------------------------------------------------------------------------------
def _if_feeds(flags: list[bool], seed: int = 5) -> list[dict[str, np.ndarray]]:
    feeds = zoo.random_feeds(zoo.if_subgraph_model(), len(flags), seed=seed)
    for feed, flag in zip(feeds, flags, strict=True):
        feed["flag"] = np.array(flag)
    return feeds


@pytest.mark.parametrize("flags", [[True, False, True, False, False],
                                   [True, True, True], [False, False]],
                         ids=["mixed", "then_only", "else_only"])
def test_if_ranges_come_from_the_branch_taken(flags: list[bool]) -> None:
    feeds = _if_feeds(flags)
    result = calibrate_ranges(_prepared(zoo.if_subgraph_model()), IF_TENSORS, feeds)
    expected = _if_model_reference(feeds)
    _assert_ranges_close(result.ranges, expected)
    assert sorted(result.unobserved) == sorted(set(IF_TENSORS) - set(expected))
    assert result.nonfinite == {}


def test_expose_ranges_if_branch_shapes() -> None:
    model = _prepared(zoo.if_subgraph_model())
    outputs = expose_ranges(model, [*IF_TENSORS, "then_conv_W", "no_such_tensor"])
    assert set(outputs) == set(IF_TENSORS)  # initializers and unknown names are not exposed
    augmented = ir.serde.serialize_model(model)
    index = {o.name: i for i, o in enumerate(augmented.graph.output)}
    then_names = {"then_conv_out", "then_relu_out", "inner_then_out"}
    else_names = {"else_conv_out", "else_out"}
    for flag in (True, False):
        feed = _if_feeds([flag])
        results = zoo.run(augmented, feed)[0]
        expected = _if_model_reference(feed)
        for name in IF_TENSORS:
            pairs = results[index[outputs[name]]]
            assert pairs.dtype == np.float32
            ran = name in expected
            assert ran == (name not in (else_names if flag else then_names))
            assert pairs.shape == (1, 2), name
            if ran:
                np.testing.assert_allclose(pairs[0], expected[name], rtol=1e-5, atol=1e-6)
            else:  # the untaken branch reports "no data"
                assert pairs[0].tolist() == [np.inf, -np.inf], name


# -- Loop and Scan ---------------------------------------------------------------------------
def _loop_reference(feeds: list[dict[str, np.ndarray]]) -> dict[str, Range]:
    w = _zoo_tensors(zoo.loop_model())["body_W"].astype(np.float64)
    seen: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        state = feed["x"].astype(np.float64)
        seen.setdefault("x", []).append(state)
        for _ in range(3):  # trip_count
            product = state @ w
            new_state = np.tanh(product)
            for name, value in (("state_in", state), ("body_matmul_out", product),
                                ("state_out", new_state)):
                seen.setdefault(name, []).append(value)
            state = new_state
        seen.setdefault("y", []).append(state)
    return {name: _span(values) for name, values in seen.items()}


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_loop_ranges_reduce_over_iterations(scale: float) -> None:
    feeds = zoo.random_feeds(zoo.loop_model(), 4, seed=6)
    for feed in feeds:
        feed["x"] = (feed["x"] * scale).astype(np.float32)
    names = ["x", "state_in", "body_matmul_out", "state_out", "y"]
    result = calibrate_ranges(_prepared(zoo.loop_model()), names, feeds)
    expected = _loop_reference(feeds)
    _assert_ranges_close(result.ranges, expected)
    if scale < 1:
        # Small inputs grow (the body's gain is ~1.5): the later iterations set the ranges,
        # so a first-iteration-only reduction would fail here, a last-only one with scale 1.
        assert expected["state_in"][1] > 1.5 * expected["x"][1]


def test_expose_ranges_loop_stacks_one_pair_per_iteration() -> None:
    model = _prepared(zoo.loop_model())
    outputs = expose_ranges(model, ["body_matmul_out", "state_in"])
    augmented = ir.serde.serialize_model(model)
    index = {o.name: i for i, o in enumerate(augmented.graph.output)}
    feed = zoo.random_feeds(zoo.loop_model(), 1, seed=6)
    results = zoo.run(augmented, feed)[0]
    w = _zoo_tensors(zoo.loop_model())["body_W"].astype(np.float64)
    state = feed[0]["x"].astype(np.float64)
    pairs_in = results[index[outputs["state_in"]]]
    pairs_mm = results[index[outputs["body_matmul_out"]]]
    assert pairs_in.shape == pairs_mm.shape == (3, 1, 2)
    for i in range(3):
        np.testing.assert_allclose(pairs_in[i, 0], [state.min(), state.max()], rtol=1e-5)
        product = state @ w
        np.testing.assert_allclose(pairs_mm[i, 0], [product.min(), product.max()], rtol=1e-5)
        state = np.tanh(product)


def _scan_model() -> onnx.ModelProto:
    """Scan over ``xs`` [T,4] with state ``s`` [4]: s_out = s_in + x_t; y_t = tanh(s_out)."""
    f = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"], name="acc"),
         helper.make_node("Tanh", ["s_out"], ["y_t"], name="tanh")],
        "scan_body",
        [helper.make_tensor_value_info("s_in", f, [4]),
         helper.make_tensor_value_info("x_t", f, [4])],
        [helper.make_tensor_value_info("s_out", f, [4]),
         helper.make_tensor_value_info("y_t", f, [4])])
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], name="scan", body=body,
                          num_scan_inputs=1, scan_output_axes=[0])],
        "scan_model",
        [helper.make_tensor_value_info("s0", f, [4]),
         helper.make_tensor_value_info("xs", f, ["T", 4])],
        [helper.make_tensor_value_info("s_final", f, [4]),
         helper.make_tensor_value_info("ys", f, ["T", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_scan_ranges_reduce_over_iterations() -> None:
    float_model = _scan_model()
    rng = np.random.default_rng(7)
    feeds = [{"s0": rng.standard_normal(4).astype(np.float32),
              "xs": rng.standard_normal((t, 4)).astype(np.float32)} for t in (5, 3, 6)]
    names = ["s_in", "x_t", "s_out", "y_t", "ys", "s_final"]
    result = calibrate_ranges(_prepared(float_model), names, feeds)
    seen: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        state = feed["s0"].astype(np.float64)
        for x_t in feed["xs"].astype(np.float64):
            new = state + x_t
            for name, value in (("s_in", state), ("x_t", x_t), ("s_out", new),
                                ("y_t", np.tanh(new))):
                seen.setdefault(name, []).append(value)
            state = new
        seen.setdefault("s_final", []).append(state)
    seen["ys"] = seen["y_t"]
    _assert_ranges_close(result.ranges, {n: _span(v) for n, v in seen.items()})


def _loop_with_if_by_parity() -> onnx.ModelProto:
    """Loop (3 iterations) whose body runs an If on ``iteration % 2 == 0``:
    even: s_out = s_in * 2 (then branch), odd: s_out = -s_in (else branch)."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    then_g = helper.make_graph([helper.make_node("Mul", ["s_in", "two"], ["t_out"], name="t_mul")],
                               "then", [], [helper.make_tensor_value_info("t_out", f, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["s_in"], ["e_out"], name="e_neg")],
                               "else", [], [helper.make_tensor_value_info("e_out", f, [1, 4])])
    body = helper.make_graph(
        [helper.make_node("Mod", ["it", "two_i"], ["parity"], name="mod"),
         helper.make_node("Equal", ["parity", "zero_i"], ["even"], name="eq"),
         helper.make_node("If", ["even"], ["s_out"], name="if", then_branch=then_g,
                          else_branch=else_g),
         helper.make_node("Identity", ["c_in"], ["c_out"], name="cond")],
        "body",
        [helper.make_tensor_value_info("it", i64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", f, [1, 4])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", f, [1, 4])],
        initializer=[numpy_helper.from_array(np.int64(2), "two_i"),
                     numpy_helper.from_array(np.int64(0), "zero_i"),
                     numpy_helper.from_array(np.float32(2), "two")])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("x", f, [1, 4])],
        [helper.make_tensor_value_info("y", f, [1, 4])],
        initializer=[numpy_helper.from_array(np.int64(3), "n")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_if_inside_loop_with_branch_changing_between_iterations() -> None:
    x = np.array([[-1.0, 0.5, 2.0, 3.0]], np.float32)
    result = calibrate_ranges(_prepared(_loop_with_if_by_parity()), ["t_out", "e_out", "y"],
                              [{"x": x}])
    # it 0 (even): t = 2x; it 1 (odd): e = -2x; it 2 (even): t = -4x.
    _assert_ranges_close(result.ranges, {"t_out": _span([2 * x, -4 * x]),
                                         "e_out": _span([-2 * x]), "y": _span([-4 * x])})


# -- non-finite and empty values -------------------------------------------------------------
def _identity_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu")], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_nonfinite_batches_are_counted_and_left_out() -> None:
    good = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)
    batches = [good, np.full((2, 4), np.nan, np.float32), good * 2,
               np.array([[0.0, np.inf, 1.0, 1.0]], np.float32)]
    result = calibrate_ranges(_prepared(_identity_model()), ["x", "r"],
                              [{"x": b} for b in batches])
    assert result.samples == 4
    assert result.nonfinite == {"x": 2, "r": 2}
    assert result.ranges == {"x": (-4.0, 6.0), "r": (0.0, 6.0)}


def test_nan_after_the_first_element_marks_the_batch() -> None:
    batch = np.array([[1.0, np.nan, 3.0, 0.5]], np.float32)
    finite = np.array([[-1.0, 2.0, 0.0, 0.5]], np.float32)
    result = calibrate_ranges(_prepared(_identity_model()), ["x"], [{"x": batch}, {"x": finite}])
    assert result.nonfinite == {"x": 1}
    assert result.ranges == {"x": (-1.0, 2.0)}  # the NaN batch is left out entirely


def test_empty_tensor_batches_are_not_nonfinite() -> None:
    batches = [np.zeros((0, 4), np.float32), np.full((2, 4), 3.0, np.float32)]
    result = calibrate_ranges(_prepared(_identity_model()), ["x", "r"],
                              [{"x": b} for b in batches])
    assert result.nonfinite == {}
    assert result.ranges == {"x": (3.0, 3.0), "r": (3.0, 3.0)}  # the empty batch adds nothing


# -- MinMaxObserver --------------------------------------------------------------------------
finite = st.floats(min_value=-2.0**100, max_value=2.0**100, allow_nan=False, allow_infinity=False,
                   width=32)
pair_batch = st.lists(st.tuples(finite, finite), min_size=0, max_size=4)
stream = st.lists(pair_batch, min_size=0, max_size=8)


def _observe(batches: list[list[tuple[float, float]]], **kwargs) -> MinMaxObserver:
    observer = MinMaxObserver(**kwargs)
    for batch in batches:
        observer.update(np.array(batch, np.float32).reshape(-1, 2))
    return observer


def _stream_range(batches: list[list[tuple[float, float]]]) -> Range | None:
    rows = [row for batch in batches for row in batch]
    if not rows:
        return None
    return (float(min(np.float32(r[0]) for r in rows)), float(max(np.float32(r[1]) for r in rows)))


@settings(max_examples=200, deadline=None)
@given(stream)
def test_observer_equals_the_concatenated_stream(batches) -> None:
    observer = _observe(batches)
    expected = _stream_range(batches)
    assert observer.batches == sum(1 for b in batches if b)
    assert observer.nonfinite_batches == 0
    if expected is None:
        assert not observer.observed
        with pytest.raises(ValueError):
            observer.result()
    else:
        assert observer.result() == expected


@settings(max_examples=200, deadline=None)
@given(stream, stream)
def test_merge_equals_observing_both_streams(first, second) -> None:
    merged = _observe(first).merge(_observe(second))
    whole = _observe(first + second)
    assert (merged.batches, merged.nonfinite_batches) == (whole.batches, whole.nonfinite_batches)
    assert merged.observed == whole.observed
    if whole.observed:
        assert merged.result() == whole.result()


@settings(max_examples=100, deadline=None)
@given(stream, st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), max_size=3))
def test_nonfinite_batches_are_counted_not_used(batches, bad_values) -> None:
    observer = MinMaxObserver()
    for value in bad_values:
        observer.update(np.array([[value, 1.0]]))
    for batch in batches:
        observer.update(np.array(batch, np.float32).reshape(-1, 2))
        observer.update(np.array([[0.0, math.nan]]))
    reference = _observe(batches)
    assert observer.nonfinite_batches == len(bad_values) + len(batches)
    assert observer.batches == reference.batches
    if reference.observed:
        assert observer.result() == reference.result()


def test_empty_arrays_are_ignored() -> None:
    observer = MinMaxObserver()
    for empty in (np.zeros((0, 2)), np.zeros((0, 1, 2)), np.zeros((3, 0, 2))):
        observer.update(empty)
    assert (observer.batches, observer.nonfinite_batches, observer.observed) == (0, 0, False)
    observer.update(np.array([[[-1.0, 2.0]], [[-3.0, 0.5]]]))  # a Loop's [iterations, 1, 2]
    observer.update(np.zeros((0, 2)))
    assert observer.batches == 1 and observer.result() == (-3.0, 2.0)


def test_symmetric_result() -> None:
    observer = MinMaxObserver(symmetric=True)
    observer.update(np.array([[-0.5, 2.0]]))
    assert observer.result() == (-2.0, 2.0)
    observer.update(np.array([[-3.0, 1.0]]))
    assert observer.result() == (-3.0, 3.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(finite, finite).map(sorted), min_size=1, max_size=10),
       st.floats(min_value=0.0, max_value=1.0))
def test_moving_average_follows_its_definition(batch_ranges, constant) -> None:
    observer = MinMaxObserver(moving_average=True, averaging_constant=constant)
    low = high = None
    for b_low, b_high in batch_ranges:
        observer.update(np.array([[b_low, b_high]]))
        if low is None:  # the first batch sets the range
            low, high = b_low, b_high
        else:  # then low <- (1 - c) * low + c * batch_low
            low = (1 - constant) * low + constant * b_low
            high = (1 - constant) * high + constant * b_high
    got_low, got_high = observer.result()
    tol = 1e-9 * max(1.0, abs(low), abs(high))
    assert abs(got_low - low) <= tol and abs(got_high - high) <= tol


def test_moving_average_values() -> None:
    observer = MinMaxObserver(moving_average=True, averaging_constant=0.5)
    for low, high in ((-1.0, 1.0), (-3.0, 5.0), (0.0, 1.0)):
        observer.update(np.array([[low, high]]))
    # (-1, 1) -> (-2, 3) -> (-1, 2); a plain MinMax would give (-3, 5).
    assert observer.result() == (-1.0, 2.0)
    observer.update(np.array([[math.nan, 1.0]]))  # skipped, not averaged in
    assert observer.result() == (-1.0, 2.0) and observer.nonfinite_batches == 1


def test_moving_average_merge_weights_by_batches() -> None:
    a = MinMaxObserver(moving_average=True, averaging_constant=0.5)
    b = MinMaxObserver(moving_average=True, averaging_constant=0.5)
    for low, high in ((-2.0, 2.0), (-2.0, 2.0), (-2.0, 2.0)):
        a.update(np.array([[low, high]]))
    b.update(np.array([[-6.0, 10.0]]))
    a.merge(b)
    assert a.batches == 4 and a.result() == (-3.0, 4.0)  # (3 * (-2, 2) + (-6, 10)) / 4
    empty = MinMaxObserver(moving_average=True)
    assert empty.merge(MinMaxObserver(moving_average=True)).observed is False


def test_moving_average_through_quantize_static(tmp_path) -> None:
    from onnxquant import quantize_static

    model = zoo.matmul_chain()
    feeds = zoo.random_feeds(model, 6, seed=8)
    plain = quantize_static(model, tmp_path / "a.onnx", feeds)
    averaged = quantize_static(model, tmp_path / "b.onnx", feeds,
                               StaticQuantConfig(moving_average=True, averaging_constant=0.5))
    x_ranges = [(float(f["x"].min()), float(f["x"].max())) for f in feeds]
    low, high = x_ranges[0]
    for b_low, b_high in x_ranges[1:]:
        low, high = low + 0.5 * (b_low - low), high + 0.5 * (b_high - high)
    assert averaged.plan.tensors["x"].range == pytest.approx((low, high), rel=1e-6)
    assert plain.plan.tensors["x"].range == pytest.approx(_span([f["x"] for f in feeds]))
