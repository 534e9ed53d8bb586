"""The corrections a :class:`~onnxquant.static.config.StaticQuantConfig` asks for, applied
with the statistics they need, for :func:`onnxquant.quantize_static` and the accuracy-target
search.

SmoothQuant and cross-layer equalization change float activations, so the tensors they change
are observed again (on the calibration feeds kept for the corrections) and their new
statistics replace the calibrated ones; bias correction changes only biases, after planning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxquant.calibration.runner import (
    CalibrationResult,
    calibrate_ranges,
    ranges_from_statistics,
)
from onnxquant.calibration.settings import CalibrationSettings
from onnxquant.core.graph import corrected_biases, record_corrected_biases
from onnxquant.core.plan import QuantPlan
from onnxquant.static.config import StaticQuantConfig
from onnxquant.static.corrections.bias_correction import (
    bias_correction_tensors,
    correct_biases,
)
from onnxquant.static.corrections.channel_stats import channel_statistics
from onnxquant.static.corrections.equalization import equalize_layers
from onnxquant.static.corrections.smoothquant import smooth_quant, smoothing_tensors

__all__ = ["correct_float_model", "corrected_calibration", "correct_planned_biases",
           "note_corrected_biases"]

Feeds = Sequence[dict[str, np.ndarray]]

SHIFT_GRID_STEPS = 0.0
"""Bias correction leaves a layer alone when its expected output shift is below this many steps
of its output's grid. 0 corrects every layer: on the public corpus, skipping shifts below half
a step lowered two models' fidelity a little and raised none (``bench_corrections.py``)."""


def correct_float_model(model: ir.Model, config: StaticQuantConfig, feeds: Feeds,
                        settings: CalibrationSettings, *, equalize: bool = True
                        ) -> dict[str, Any]:
    """Apply SmoothQuant and (with ``equalize``) cross-layer equalization as ``config`` asks,
    in place; returns the statistics of the tensors they changed, observed on ``feeds`` with
    ``settings`` (empty when nothing changed)."""
    changed: set[str] = set()
    if config.smooth_quant and feeds:
        maxima = channel_statistics(model, smoothing_tensors(model), feeds, config.providers)
        changed.update(smooth_quant(model, maxima, config.smooth_quant_alpha))
    if equalize and config.equalize_layers:
        changed.update(equalize_layers(model))
    if not changed or not feeds:
        return {}
    result = calibrate_ranges(model, sorted(changed), feeds, settings=settings,
                              providers=config.providers)
    return dict(result.statistics)


def corrected_calibration(calibration: CalibrationResult, observed: dict[str, Any],
                          settings: CalibrationSettings) -> CalibrationResult:
    """``calibration`` with the statistics (and ranges) of re-observed tensors replaced."""
    if not observed:
        return calibration
    statistics = {**calibration.statistics, **observed}
    derived = ranges_from_statistics(statistics, calibration.samples, settings)
    return dataclasses.replace(calibration, ranges=derived.ranges, statistics=statistics)


def correct_planned_biases(model: ir.Model, plan: QuantPlan, config: StaticQuantConfig,
                           feeds: Feeds) -> bool:
    """Bias correction for ``plan``'s weight grids, from the per-channel input means on
    ``feeds`` (:data:`SHIFT_GRID_STEPS`); whether any bias changed (the caller plans
    again)."""
    tensors = bias_correction_tensors(model, plan)
    if not config.bias_correction or not tensors or not feeds:
        return False
    means = channel_statistics(model, tensors, feeds, config.providers)
    changed = correct_biases(model, plan, means, grid_steps=SHIFT_GRID_STEPS)
    if changed:
        record_corrected_biases(model, changed)
    return bool(changed)


def note_corrected_biases(model: ir.Model, plan: QuantPlan) -> None:
    """Say in the plan which nodes read a bias that bias correction changed (the reason next
    to the node's decision)."""
    changed = corrected_biases(model)
    if not changed:
        return
    for node in model.graph:
        decision = plan.nodes.get(node.name or "")
        if decision is None or not any(v is not None and v.name in changed
                                       for v in node.inputs):
            continue
        note = "bias corrected for the mean shift of weight rounding"
        decision.reason = f"{decision.reason}; {note}" if decision.reason else note
