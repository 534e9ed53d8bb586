"""The whole-model latency check of dynamic quantization (see
:mod:`onnxquant.static._latency_guard` for the static one).

With ``objective="speed"`` or ``"balanced"`` and costs measured, the rewritten model and the
float model are timed (:func:`onnxquant.core.latency.ort_timer`, on random feeds: dynamic
quantization has no calibration data). When the quantized model is slower than float by more
than :data:`~onnxquant.core.latency.NOISE_MARGIN`, the model is rewritten again with its
quantized Convs kept float (ConvInteger is onnxruntime's slow dynamic kernel), then, if still
slower, with every node the user did not name kept float. Each node taken out says why in its
decision, and the result's ``cost_model["latency_guard"]`` records what was measured.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from onnxquant.calibration.evaluation import random_feeds
from onnxquant.calibration.session import input_specs
from onnxquant.core.costs import measuring_enabled
from onnxquant.core.latency import MAX_MODEL_BYTES, NOISE_MARGIN, Timer, Timing, ort_timer
from onnxquant.core.model_io import clone_model, model_size_bytes
from onnxquant.core.objective import Objective
from onnxquant.dynamic._rewrite import Decision
from onnxquant.dynamic.config import DynamicQuantConfig

__all__ = ["guard_enabled", "guard_dynamic", "feeds_timer"]

logger = logging.getLogger(__name__)

Rewrite = Callable[[ir.Model, DynamicQuantConfig], list[Decision]]
"""Rewrites a model in place with a config; returns the decisions."""


def guard_enabled(config: DynamicQuantConfig, model: ir.Model) -> bool:
    """Whether the guard runs: enabled, costs measured, objective speed or balanced, and a
    model small enough to time."""
    return (config.latency_guard and config.objective is not Objective.SIZE
            and measuring_enabled(config.measure_costs)
            and model_size_bytes(model) <= MAX_MODEL_BYTES)


def feeds_timer(model: ir.Model) -> Timer | str:
    """The default timer on two random feeds, or why the model cannot be timed."""
    specs, _ = input_specs(model)
    feeds = random_feeds(specs, count=2)
    if feeds is None:
        return "an input is not a float tensor of known rank (no feed to time on)"
    return ort_timer(feeds)


def _named(decision: Decision, config: DynamicQuantConfig) -> bool:
    return decision.op_type in (config.op_types or ()) or (
        config.nodes_to_quantize is not None and decision.name in config.nodes_to_quantize)


def guard_dynamic(pristine: ir.Model, model: ir.Model, decisions: list[Decision],
                  config: DynamicQuantConfig, rewrite: Rewrite,
                  timer: Timer | str) -> tuple[ir.Model, list[Decision], dict[str, Any]]:
    """Time ``model`` (rewritten from ``pristine``) against ``pristine``; rewrite again with
    fewer quantized nodes while it is slower. Returns the model to save, its decisions and
    what was measured."""
    if isinstance(timer, str):
        return model, decisions, {"skipped": timer}
    first = timer(pristine, model)
    if isinstance(first, str):
        return model, decisions, {"skipped": first}
    info: dict[str, Any] = {"first_ratio": round(first.ratio, 3), "rounds": 0}
    timing: Timing = first
    kinds = ({"Conv"}, None)  # None: every quantized node not named by the user
    excluded: set[str] = set()
    reasons: dict[str, str] = {}
    for number, op_types in enumerate(kinds, start=1):
        if timing.ratio <= 1.0 + NOISE_MARGIN:
            break
        out = [d.name for d in decisions if d.action == "quantized" and not _named(d, config)
               and (op_types is None or d.op_type in op_types)]
        if not out:
            continue
        why = (f"{first.describe()}; kept float by the latency guard "
               f"({'quantized Convs' if op_types else 'every node'}, round {number})")
        excluded |= set(out)  # rounds add up
        retry = dataclasses.replace(
            config, nodes_to_exclude=frozenset(config.nodes_to_exclude) | excluded)
        candidate = clone_model(pristine)
        reasons.update(dict.fromkeys(out, why))
        candidate_decisions = [
            dataclasses.replace(d, reason=reasons[d.name]) if d.name in reasons else d
            for d in rewrite(candidate, retry)]
        model, decisions = candidate, candidate_decisions
        info["rounds"] = number
        measured = timer(pristine, model)
        if isinstance(measured, str):
            info["skipped"] = measured
            break
        timing = measured
    info["last_ratio"] = round(timing.ratio, 3)
    if timing.ratio > 1.0 + NOISE_MARGIN:
        logger.warning("dynamic quantization: the model is still measured %.2fx float after "
                       "the latency guard (nodes named by the user stay quantized)",
                       timing.ratio)
    return model, decisions, info
