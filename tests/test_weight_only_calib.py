"""GPTQ calibration and factorisation internals: Hessian accumulators in both storage modes,
segmented calibration against a single session, external data read in place, and the in-place
factor ``U`` against numpy's dense reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.weight_only import _factor, _segments
from onnxquant.weight_only._hessian import HessianAccumulator, HessianStore
from onnxquant.weight_only.calib import collect_hessians


# --------------------------------------------------------------------------- accumulators
@pytest.mark.parametrize("k", [8, 128])  # 60 rows: folded into the dense sum / kept as rows
def test_accumulator_modes_equal_the_dense_formula(k):
    x = np.random.default_rng(k).standard_normal((3, 20, k)).astype(np.float32)
    acc = HessianAccumulator(k)
    for part in x:
        acc.update(part)
    assert (acc._sum is None) == (k == 128)
    flat = x.reshape(-1, k).astype(np.float64)
    want = 2 / 60 * flat.T @ flat
    np.testing.assert_allclose(acc.hessian(), want, rtol=1e-12, atol=1e-14)
    h = acc.hessian()
    h[0, 0] = -1  # the caller owns what hessian() returns
    np.testing.assert_allclose(acc.hessian(), want, rtol=1e-12, atol=1e-14)


def test_accumulator_merges_rows_into_a_dense_sum():
    rng = np.random.default_rng(1)
    dense, rows = HessianAccumulator(16), HessianAccumulator(16)
    a, b = rng.standard_normal((40, 16)), rng.standard_normal((3, 16))
    dense.update(a)
    rows.update(b)
    assert dense._sum is not None and rows._sum is None
    rows.merge(dense)
    assert rows.samples == 43
    both = np.concatenate([b, a]).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(rows.hessian(), 2 / 43 * both.T @ both, rtol=1e-12)


def test_accumulator_copies_and_rejects_nonfinite_rows():
    acc = HessianAccumulator(4)
    x = np.ones((1, 4), np.float32)
    acc.update(x)
    x[:] = 5  # the accumulator kept its own copy
    np.testing.assert_array_equal(acc.hessian(), np.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(np.array([[1, np.nan, 0, 0]], np.float32))


def test_store_drops_an_accumulator_after_its_last_user():
    a, b = HessianAccumulator(2), HessianAccumulator(2)
    store = HessianStore({"a": a, "b": b}, ["a", "b", "a"])
    assert store.take("a") is a and store.take("b") is b
    assert store.take("b") is None  # b had one user
    assert store.take("a") is a
    assert store.take("a") is None and store.take("unknown") is None


# --------------------------------------------------------------------------- factor U
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k", [40, 300, 600])  # one panel / leaf, several of both
def test_inverse_factor_matches_dense_reference(k, act_order):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((k // 2, k)) * np.exp(rng.standard_normal(k))
    x[:, 3] = 0  # a dead input
    h = 2 / len(x) * x.T @ x
    before = h.copy()
    u, dead, perm = _factor.inverse_factor(h, k, 0.01, act_order)
    np.testing.assert_array_equal(h, before)  # an array Hessian is copied
    assert dead.tolist() == [i == 3 for i in range(k)]
    ref = before.copy()
    ref[3, 3] = 1
    if act_order:
        assert perm is not None and perm.tolist() == np.argsort(-np.diag(ref),
                                                                kind="stable").tolist()
        ref = ref[np.ix_(perm, perm)]
    ref += 0.01 * np.mean(np.diag(ref)) * np.eye(k)
    want = np.linalg.cholesky(np.linalg.inv(ref)).T
    assert u.dtype == np.float32 and np.array_equal(u, np.triu(u))
    np.testing.assert_allclose(u, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_cholesky_in_place_restores_a_matrix_that_is_not_positive_definite():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((700, 600))
    h = x.T @ x
    h[500, 500] = -1.0  # fails in the second panel
    a = h.copy()
    assert not _factor._cholesky_in_place(a)
    np.testing.assert_array_equal(a, h)


def test_reverse_in_place_handles_odd_sizes():
    for k in (1, 5, 8, 513):
        a = np.arange(k * k, dtype=np.float64).reshape(k, k)
        want = a[::-1, ::-1].copy()
        _factor._reverse(a, rows=4)
        np.testing.assert_array_equal(a, want)


# --------------------------------------------------------------------------- segmented runs
def _chain_model(path=None):
    """x -> mm0 -> relu -> mm1 -> (+ residual from relu) -> mm2 -> cast/cast -> mm3."""
    rng = np.random.default_rng(0)
    ws = {f"w{i}": rng.standard_normal((16, 16)).astype(np.float32) for i in range(4)}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
             helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="mm1"),
             helper.make_node("Add", ["h1", "r0"], ["s1"]),  # r0 crosses a segment border
             helper.make_node("MatMul", ["s1", "w2"], ["h2"], name="mm2"),
             helper.make_node("Cast", ["h2"], ["c2"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["c2"], ["d2"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["d2", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        [numpy_helper.from_array(w, n) for n, w in ws.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if path is None:
        return ir.serde.deserialize_model(proto)
    onnx.save(proto, str(path), save_as_external_data=True, location="chain.data",
              size_threshold=0)
    return ir.load(path)


ACTIVATIONS = {"x": 16, "r0": 16, "s1": 16, "d2": 16}


def _feeds(count=5):
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((3, 16)).astype(np.float32)} for _ in range(count)]


def test_plan_cuts_by_weight_bytes_and_passes_border_values():
    model = _chain_model()
    segments = _segments.plan_segments(model, ACTIVATIONS, budget=16 * 16 * 4)
    # nothing after the last wanted value (mm3 only consumes d2)
    assert [[n.op_type for n in s.nodes] for s in segments] == [
        ["MatMul", "Relu"], ["MatMul", "Add"], ["MatMul", "Cast", "Cast"]]
    assert [[v.name for v in s.inputs] for s in segments] == [["x"], ["r0"], ["s1"]]
    assert [[v.name for v in s.outputs] for s in segments] == [["r0"], ["s1"], ["d2"]]
    assert _segments.plan_segments(model, ACTIVATIONS, budget=1 << 20) == []  # fits whole
    # weightless nodes never open a segment: mm0 + Relu is one group, so the model runs whole
    assert _segments.plan_segments(model, {"r0": 16}, budget=1) == []


@pytest.mark.parametrize("external", [False, True])
def test_segmented_calibration_equals_one_session(tmp_path, external):
    model = _chain_model(tmp_path / "chain.onnx" if external else None)
    whole, n_whole = collect_hessians(model, ACTIVATIONS, _feeds(), segment_bytes=1 << 30)
    parts, n_parts = collect_hessians(model, ACTIVATIONS, _feeds(), segment_bytes=1)
    assert n_whole == n_parts == 5
    for name in ACTIVATIONS:
        np.testing.assert_array_equal(parts[name].hessian(), whole[name].hessian())
    x = np.concatenate([f["x"] for f in _feeds()]).astype(np.float64)
    np.testing.assert_allclose(whole["x"].hessian(), 2 / 15 * x.T @ x, rtol=1e-12)
    if external:  # the data stayed where it was: nothing but the model's own files
        assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.data", "chain.onnx"]


def test_session_reads_external_data_in_place(tmp_path, monkeypatch):
    from onnxquant.calibration import runner

    def no_copy(*args, **kwargs):
        raise AssertionError("the model was saved (its external data copied)")

    monkeypatch.setattr(runner.ir, "save", no_copy)
    model = _chain_model(tmp_path / "chain.onnx")
    assert isinstance(model.graph.initializers["w0"].const_value, ir.ExternalTensor)
    session = runner.make_session(model, ["CPUExecutionProvider"], tmp_path)
    (y,) = session.run(None, _feeds(1)[0])
    assert y.shape == (3, 16) and np.isfinite(y).all()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_takes_an_accumulator_or_a_precomputed_factor(act_order):
    from onnxquant.weight_only.gptq import quantize_gptq

    rng = np.random.default_rng(4)
    x = (rng.standard_normal((200, 64)) * np.exp(rng.standard_normal(64))).astype(np.float32)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    acc = HessianAccumulator(64)
    acc.update(x)
    ref = quantize_gptq(w, acc.hessian(), 4, 16, False, act_order=act_order)
    factor = _factor.inverse_factor(acc, 64, 0.01, act_order)
    for source in (acc, factor):
        got = quantize_gptq(w, source, 4, 16, False, act_order=act_order)
        np.testing.assert_array_equal(got.q, ref.q)
        np.testing.assert_array_equal(got.scales, ref.scales)
    with pytest.raises(ValueError, match="does not match"):
        quantize_gptq(w, factor, 4, 16, False, act_order=not act_order)
