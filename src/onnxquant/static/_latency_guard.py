"""A whole-model latency check after emission: the quantized model is never slower than float.

The cost model (:mod:`._cost_choice`) decides node by node from kernels timed in isolation;
it can miss what only the whole model shows (symbolic dims measured at one size, a Conv in an
``If`` branch that runs on a few frames, transitions the estimate does not see). So with
``objective="speed"`` or ``"balanced"``, when costs are measured, the float and the emitted
quantized model are timed in onnxruntime (1 intra-op thread, sequential, a few warm-up runs,
then interleaved runs on the first kept calibration feeds, medians, within
:data:`BUDGET_S`). When the quantized model is slower than float by more than
:data:`NOISE_MARGIN`:

1. the quantized Conv/MatMul/Gemm with the smallest measured gain (integer over float,
   transitions included; unmeasured ones last) are kept float — the first
   :data:`ROUND_SHARES` of them, round after round — and the model is planned and emitted
   again from the float model (``keep_float`` of the planner, the finiteness check included);
2. if it is still slower, every quantized node is kept float.

Nodes the user named (``force_op_types``, ``force_nodes``, ``force_quantize``, ``tensors``)
are never kept float. Every node taken out says why in its plan decision, and
``plan.settings["latency_guard"]`` records what was measured (a summary line).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import onnx_ir as ir

from onnxquant.calibration.runner import CalibrationResult
from onnxquant.core.costs import measuring_enabled
from onnxquant.core.latency import (
    BUDGET_S,
    MAX_RUN_S,
    NOISE_MARGIN,
    Timer,
    Timing,
    ort_timer,
)
from onnxquant.core.model_io import clone_model
from onnxquant.core.objective import Objective
from onnxquant.core.plan import QuantPlan
from onnxquant.static._cost_choice import speed_choice
from onnxquant.static.config import StaticQuantConfig
from onnxquant.static.planner import build_plan, forced_nodes, select_nodes
from onnxquant.static.verify import emit_verified

__all__ = ["Timing", "Timer", "guard_enabled", "guard_latency", "ort_timer", "NOISE_MARGIN",
           "BUDGET_S", "MAX_RUN_S", "ROUND_SHARES", "guard_line"]

logger = logging.getLogger(__name__)

ROUND_SHARES = (0.25, 0.5)
"""Rounds before keeping every node float: the share of the quantized Conv/MatMul/Gemm, by
smallest measured gain, kept float in each."""
_ANCHORS = frozenset({"Conv", "MatMul", "Gemm"})


def guard_enabled(config: StaticQuantConfig) -> bool:
    """Whether the guard runs: enabled, costs measured, objective speed or balanced."""
    return (config.latency_guard and config.objective is not Objective.SIZE
            and measuring_enabled(config.measure_costs))


# -- the guard -------------------------------------------------------------------------------
def guard_latency(pristine: ir.Model, model: ir.Model, plan: QuantPlan, planned: QuantPlan,
                  calibration: CalibrationResult, config: StaticQuantConfig, *,
                  ranges: Mapping[str, tuple[float, float]],
                  annotated: set[int] | None = None,
                  timer: Timer | None = None) -> tuple[ir.Model, QuantPlan]:
    """Time ``model`` (emitted from ``pristine``, the float model, with ``plan``) against
    float; plan and emit again with nodes kept float while it is slower (module docstring).

    Args:
        pristine: A copy of the prepared float model taken before emission (not changed).
        model: The emitted quantized model.
        plan: Its plan (after the finiteness check).
        planned: The plan before the finiteness check (nodes float in ``plan`` only were
            taken out by the check and stay float).
        calibration: Its feeds time the models and are checked for finiteness.
        config: Settings.
        ranges: The ranges ``plan`` was made with.
        annotated: Ids of values whose shapes are kept; extended for a new model.
        timer: Times two models (default :func:`ort_timer` on ``calibration.feeds``).

    Returns:
        The quantized model and its plan — ``model`` and ``plan`` when it is not slower.
    """
    timer = timer or ort_timer(calibration.feeds)
    timing = timer(pristine, model)
    info: dict[str, Any] = {}
    plan.settings["latency_guard"] = info
    if isinstance(timing, str):
        info.update(skipped=timing)
        return model, plan
    info.update(first=_record(timing), ratio=round(timing.ratio, 4), kept_float=0, rounds=0)
    if timing.ratio <= 1 + NOISE_MARGIN:
        return model, plan
    first = timing
    estimate = plan.settings.get("cost_model")  # the kernel estimate of the plan as made
    names = {v.name for v in _values(model) if annotated is not None and id(v) in annotated}
    keep = {n: d.reason for n, d in plan.nodes.items() if d.action == "float"
            and n in planned.nodes and planned.nodes[n].action != "float"}
    candidates = _by_gain(pristine, plan, config)
    shares: list[float | None] = [*ROUND_SHARES, None]
    for round_index, share in enumerate(shares, start=1):
        if share is None:  # every node the objective allows
            chosen = _all_quantized(pristine, plan, config)
            why = "every quantized node kept float"
        else:
            chosen = candidates[:max(1, round(share * len(candidates)))]
            why = "smallest measured gain of the quantized Conv/MatMul/Gemm"
        fresh = [n for n in chosen if n not in keep]
        if not fresh:
            continue
        reason = (f"{first.describe()}; kept float by the latency guard ({why}, round "
                  f"{round_index})")
        keep.update({n: reason for n in fresh})
        work = clone_model(pristine)
        new_plan = build_plan(select_nodes(work, config), ranges, config, keep_float=keep)
        model, plan = emit_verified(work, new_plan, calibration, config, ranges=ranges,
                                    keep_float=keep)
        plan.settings["latency_guard"] = info
        if estimate is not None:  # nodes kept float are not measured again
            plan.settings["cost_model"] = estimate
        timing = timer(pristine, model)
        info.update(rounds=round_index, kept_float=sum(
            1 for n in keep if n in plan.nodes and plan.nodes[n].action == "float"))
        if isinstance(timing, str):
            info.update(skipped=f"re-timing failed: {timing}")
            break
        info.update(last=_record(timing), ratio=round(timing.ratio, 4))
        if timing.ratio <= 1 + NOISE_MARGIN:
            break
    else:
        logger.warning("the quantized model is still measured slower than float (%s) with "
                       "every node the objective allows kept float", timing.describe())
    if annotated is not None:
        annotated.update(id(v) for v in _values(model) if v.name in names)
    return model, plan


def _record(timing: Timing) -> dict[str, float | int]:
    return {"float_ms": round(timing.float_ms, 4), "quantized_ms": round(timing.quantized_ms, 4),
            "runs": timing.runs}


def _by_gain(pristine: ir.Model, plan: QuantPlan, config: StaticQuantConfig) -> list[str]:
    """The quantized, not user-named Conv/MatMul/Gemm by measured gain, smallest first
    (unmeasured ones last)."""
    nodes = select_nodes(pristine, config)
    forced = forced_nodes(nodes, config)
    gains: dict[str, float] = {}
    choice = speed_choice(nodes, config, forced, {})
    if choice is not None:
        gains = {n.name or "": c.float_ms - c.integer_ms for n, c, _ in choice.costs}
    names = [n.name or "" for n in nodes if n.op_type in _ANCHORS and n not in forced
             and _quantized(plan, n.name or "")]
    return sorted(names, key=lambda n: gains.get(n, float("inf")))


def _all_quantized(pristine: ir.Model, plan: QuantPlan, config: StaticQuantConfig
                   ) -> list[str]:
    nodes = select_nodes(pristine, config)
    forced = forced_nodes(nodes, config)
    return [n.name or "" for n in nodes if n not in forced and _quantized(plan, n.name or "")]


def _quantized(plan: QuantPlan, name: str) -> bool:
    decision = plan.nodes.get(name)
    return decision is not None and decision.action in ("quantize", "weights")


def _values(model: ir.Model) -> Iterator[ir.Value]:
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            yield from node.outputs


def guard_line(info: Mapping[str, Any]) -> str:
    """The summary's line for ``plan.settings["latency_guard"]``."""
    if "skipped" in info and "first" not in info:
        return f"latency:      whole-model check skipped ({info['skipped']})"
    first = info["first"]
    ratio = first["quantized_ms"] / first["float_ms"] if first["float_ms"] else 1.0
    text = (f"latency:      whole model measured {ratio:.2f}x float (float "
            f"{first['float_ms']:.3f} ms, quantized {first['quantized_ms']:.3f} ms, 1 thread)")
    if not info.get("rounds"):
        return text + "; kept as planned"
    text += f"; kept float {info['kept_float']} nodes in {info['rounds']} rounds"
    if "last" in info:
        text += f" -> {info['ratio']:.2f}x float"
    if "skipped" in info:
        text += f" ({info['skipped']})"
    return text
