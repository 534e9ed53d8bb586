"""The dynamic latency guard: a quantized model measured slower than float is rewritten with
its Convs, then every node the user did not name, kept float (timings injected)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from onnxquant.core.latency import Timing
from onnxquant.core.model_io import clone_model
from onnxquant.dynamic import _latency_guard as guard
from onnxquant.dynamic._builder import Names
from onnxquant.dynamic._context import Context
from onnxquant.dynamic._rewrite import rewrite_model
from onnxquant.dynamic._weights import WeightStore
from onnxquant.dynamic.config import DynamicQuantConfig
from onnxquant.dynamic.runtime import assume_everything


def _model() -> ir.Model:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "w")
    m = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "m")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("MatMul", ["z", "m"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", 1, [1, 4, 6, 6]),
         helper.make_tensor_value_info("z", 1, [3, 8])],
        [helper.make_tensor_value_info("c", 1, [1, 8, 6, 6]),
         helper.make_tensor_value_info("y", 1, [3, 8])], [w, m])
    return ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)]))


def _rewrite(model: ir.Model, config: DynamicQuantConfig):
    names = Names(model)
    ctx = Context(model=model, config=config, names=names, support=assume_everything(),
                  weights=WeightStore(names), opset=17)
    return rewrite_model(ctx)


def _scripted(ratios: list[float]):
    """A timer returning the given quantized/float ratios in turn."""
    calls = iter(ratios)

    def timer(float_model, quantized):
        return Timing(1.0, next(calls), runs=9)
    return timer


def _run(ratios, **config):
    cfg = DynamicQuantConfig(objective="balanced", measure_costs=False, **config)
    pristine = _model()
    model = clone_model(pristine)
    decisions = _rewrite(model, cfg)
    assert {d.name for d in decisions if d.action == "quantized"} == {"conv", "mm"}
    return guard.guard_dynamic(pristine, model, decisions, cfg, _rewrite, _scripted(ratios))


def _quantized(decisions) -> set[str]:
    return {d.name for d in decisions if d.action == "quantized"}


def test_a_fast_model_is_kept_as_it_is():
    _, decisions, info = _run([0.8])
    assert _quantized(decisions) == {"conv", "mm"} and info["rounds"] == 0


def test_slow_convs_are_kept_float_first():
    model, decisions, info = _run([1.4, 0.95])
    assert _quantized(decisions) == {"mm"}
    conv = next(d for d in decisions if d.name == "conv")
    assert "1.40x float" in conv.reason and "round 1" in conv.reason
    assert info == {"first_ratio": 1.4, "rounds": 1, "last_ratio": 0.95}
    assert "ConvInteger" not in {n.op_type for n in model.graph}


def test_then_every_node_not_named():
    _, decisions, info = _run([1.4, 1.3, 1.0])
    assert _quantized(decisions) == set() and info["rounds"] == 2
    # Op types the user names stay quantized, however slow.
    _, decisions, info = _run([1.4, 1.3], op_types=frozenset({"MatMul", "Conv"}))
    assert _quantized(decisions) == {"conv", "mm"} and info["rounds"] == 0


def test_skipped_with_a_reason():
    pristine = _model()
    cfg = DynamicQuantConfig(objective="balanced", measure_costs=False)
    _, _, info = guard.guard_dynamic(pristine, clone_model(pristine), [], cfg, _rewrite,
                                     "no feed")
    assert info == {"skipped": "no feed"}


@pytest.mark.parametrize(("objective", "guard_flag", "on"), [
    ("balanced", True, True), ("speed", True, True), ("size", True, False),
    ("balanced", False, False)])
def test_when_it_runs(monkeypatch, objective, guard_flag, on):
    monkeypatch.setenv("ONNXQUANT_MEASURE_COSTS", "1")
    cfg = DynamicQuantConfig(objective=objective, latency_guard=guard_flag)
    assert guard.guard_enabled(cfg, _model()) is on
    monkeypatch.setenv("ONNXQUANT_MEASURE_COSTS", "0")
    assert not guard.guard_enabled(cfg, _model())


def test_summary_line():
    from onnxquant.dynamic.result import guard_summary

    assert guard_summary({"skipped": "no feed"}) == "latency:      not timed (no feed)"
    line = guard_summary({"first_ratio": 1.4, "rounds": 1, "last_ratio": 0.95})
    assert "1.40x float" in line and "1 round(s)" in line and "0.95x float" in line
