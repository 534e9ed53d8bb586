"""The whole-model latency guard of static quantization (issue 14): a quantized model measured
slower than float is planned again with nodes kept float.

Deterministic: the kernel costs come from the fake cost table of tests/test_cost_model.py and
the whole-model timings from a scripted timer (``ort_timer`` is replaced).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_cost_model import FakeCosts, mobilenet_model

from onnxquant import StaticQuantConfig, quantize_static
from onnxquant.core.qtypes import QuantFormat
from onnxquant.static import _latency_guard
from onnxquant.static._latency_guard import NOISE_MARGIN, Timing, guard_enabled

_ANCHORS = ("Conv", "MatMul", "Gemm")


class _Script:
    """Times the models as scripted: quantized/float ratios, one per call (the last repeats),
    or a string (the timing is skipped)."""

    def __init__(self, ratios: list[float | str]) -> None:
        self.ratios = ratios
        self.calls = 0

    def __call__(self, feeds: list[dict]) -> _latency_guard.Timer:
        assert feeds, "the guard times on the kept calibration feeds"

        def timer(float_model, quantized) -> Timing | str:
            ratio = self.ratios[min(self.calls, len(self.ratios) - 1)]
            self.calls += 1
            return ratio if isinstance(ratio, str) else Timing(1.0, ratio, 9)

        return timer


def _feeds(count: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(count)]


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ratios: list[float | str],
         **fields: object):
    script = _Script(ratios)
    monkeypatch.setattr(_latency_guard, "ort_timer", script)
    fields.setdefault("cost_model", FakeCosts())
    fields.setdefault("measure_costs", True)
    fields.setdefault("objective", "speed")
    config = StaticQuantConfig(format=QuantFormat.QDQ, evaluate=False, **fields)  # type: ignore[arg-type]
    out = tmp_path / f"q{len(list(tmp_path.iterdir()))}.onnx"
    result = quantize_static(mobilenet_model(), out, _feeds(), config)
    return onnx.load(out), result, script


def _quantized_anchors(result) -> list[str]:
    return sorted(d.name for d in result.plan.nodes.values()
                  if d.op_type in _ANCHORS and d.action == "quantize")


def test_not_slower_keeps_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, planned, _ = _run(tmp_path, monkeypatch, [0.7], latency_guard=False)
    _, result, script = _run(tmp_path, monkeypatch, [1 + NOISE_MARGIN / 2])
    assert script.calls == 1
    assert _quantized_anchors(result) == _quantized_anchors(planned)
    info = result.plan.settings["latency_guard"]
    assert info["rounds"] == 0 and info["kept_float"] == 0
    assert "whole model measured 1.01x float" in result.summary()
    assert "kept as planned" in result.summary()


def test_slower_model_is_planned_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, planned, _ = _run(tmp_path, monkeypatch, [0.7], latency_guard=False)
    before = _quantized_anchors(planned)
    assert len(before) == 4  # dw16, pw1, pw2, fc (stem and dw24 are slower: float already)
    proto, result, script = _run(tmp_path, monkeypatch, [1.6, 0.9])
    assert script.calls == 2  # timed, one round, timed again
    after = _quantized_anchors(result)
    taken = sorted(set(before) - set(after))
    assert len(taken) == 1  # a quarter of the candidates: the smallest measured gain
    reason = result.plan.nodes[taken[0]].reason
    assert "whole model measured 1.60x float" in reason and "latency guard" in reason
    info = result.plan.settings["latency_guard"]
    assert info["rounds"] == 1 and info["kept_float"] == 1 and info["ratio"] == 0.9
    summary = result.summary()
    assert "whole model measured 1.60x float" in summary
    assert "kept float 1 nodes in 1 rounds -> 0.90x float" in summary
    convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    assert convs >= 3  # stem, dw24 and the one taken out read float weights


def test_still_slower_keeps_every_node_float(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    proto, result, script = _run(tmp_path, monkeypatch, [1.6])
    assert script.calls == 4  # first timing, two rounds by gain, then every node
    assert _quantized_anchors(result) == []
    assert all(d.action == "float" for d in result.plan.nodes.values()
               if d.action != "remove")
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    assert result.plan.settings["latency_guard"]["rounds"] == 3


def test_named_nodes_stay_quantized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, result, _ = _run(tmp_path, monkeypatch, [1.6], force_nodes=["pw1"])
    assert _quantized_anchors(result) == ["pw1"]
    assert "latency guard" in result.plan.nodes["pw2"].reason
    _, result, _ = _run(tmp_path, monkeypatch, [1.6], force_op_types=["Conv"])
    assert all(d.action == "quantize" for d in result.plan.nodes.values()
               if d.op_type == "Conv")
    assert result.plan.nodes["fc"].action == "float"


def test_skipped_when_not_measuring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for fields in ({"measure_costs": False}, {"objective": "size"}, {"latency_guard": False}):
        _, result, script = _run(tmp_path, monkeypatch, [1.6], **fields)
        assert script.calls == 0
        assert "latency_guard" not in result.plan.settings
        assert "whole model measured" not in result.summary()
    assert not guard_enabled(StaticQuantConfig())  # conftest: ONNXQUANT_MEASURE_COSTS=0


def test_timing_failure_is_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, result, _ = _run(tmp_path, monkeypatch, ["one run takes more than 0.25 s"])
    assert result.plan.settings["latency_guard"] == {"skipped": "one run takes more than 0.25 s"}
    assert "whole-model check skipped (one run takes more than 0.25 s)" in result.summary()


def test_real_timer_runs(tmp_path: Path) -> None:
    """The onnxruntime timer on the real models (no verdict: only that it measures)."""
    import onnx_ir as ir

    model = ir.serde.deserialize_model(mobilenet_model())
    timing = _latency_guard.ort_timer(_feeds(2), budget_s=0.2)(model, model)
    assert isinstance(timing, Timing) and timing.runs >= 5 and timing.float_ms > 0
    assert _latency_guard.ort_timer([])(model, model) == "no calibration feed was kept to time on"
