"""Candidates of the accuracy-target search: a :class:`State` (config, nodes kept float,
16-bit tensors, corrections) is planned and emitted from the one calibration, then scored.

Statistics are collected once: the calibration's histograms give every method's ranges; the
corrections that change float activations (SmoothQuant, cross-layer equalization) re-observe
only the tensors they change, on the calibration feeds kept for this
(``StaticQuantConfig.correction_feeds``), once per combination; bias correction reads
per-channel input means from the same feeds. A candidate then costs one emission and one pass
over the evaluation samples.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxquant.calibration.runner import ranges_from_statistics
from onnxquant.calibration.session import make_session
from onnxquant.core import model_io
from onnxquant.core.model_io import clone_model
from onnxquant.core.qtypes import INT16, UINT16, QuantType
from onnxquant.preprocess import passes as preprocess
from onnxquant.static.api import plan_ranges
from onnxquant.static.config import StaticQuantConfig, TensorOverride
from onnxquant.static.corrections import equalize_layers, smoothing_tensors
from onnxquant.static.corrections.pipeline import (
    correct_float_model,
    correct_planned_biases,
    corrected_calibration,
    note_corrected_biases,
)
from onnxquant.static.planner import build_plan, select_nodes
from onnxquant.static.verify import emit_verified
from onnxquant.target.scoring import score

__all__ = ["State", "Candidates", "wide_type"]

TIMING_RUNS = 3
"""Extra timed runs of the first evaluation feed, for the latency estimate."""


@dataclasses.dataclass(frozen=True)
class State:
    """One candidate's recipe.

    Attributes:
        config: The static config (calibration method, per-channel, activation type).
        keep_float: Node name -> why it stays float.
        wide: Activation name -> why it gets 16 bits.
    """

    config: StaticQuantConfig
    keep_float: Mapping[str, str] = dataclasses.field(default_factory=dict)
    wide: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def planning_config(self) -> StaticQuantConfig:
        """The config with the 16-bit tensors as overrides."""
        if not self.wide:
            return self.config
        wide = wide_type(self.config.activation_type)
        return dataclasses.replace(self.config, tensors={
            **self.config.tensors, **{t: TensorOverride(wide) for t in self.wide}})


def wide_type(narrow: QuantType) -> QuantType:
    """The 16-bit type of the same signedness."""
    return INT16 if narrow.signed else UINT16


class Candidates:
    """Plans, emits and scores candidates from one calibration."""

    def __init__(self, pristine: ir.Model, calibration: Any, target: Any,
                 feeds: list[dict[str, np.ndarray]], workdir: Path, declared: set[str],
                 providers: tuple[str, ...]) -> None:
        self.pristine = pristine
        self.declared = declared
        self.calibration = calibration
        self.correction_feeds = calibration.feeds
        self.target = target
        self.feeds = feeds
        self.workdir = workdir
        self.providers = providers
        self._observed: dict[tuple[bool, float, bool], tuple[ir.Model, dict[str, Any]]] = {}
        self._ranges: dict[tuple[Any, tuple[bool, float, bool]], Any] = {}
        session = make_session(pristine, providers, workdir)
        self.names = [o.name for o in session.get_outputs()]
        self.reference, self.float_seconds = self._run(session)

    # -- corrections ------------------------------------------------------------------------
    def corrected(self, config: StaticQuantConfig) -> tuple[ir.Model, dict[str, Any]]:
        """A copy of the model with ``config``'s float-changing corrections applied, and the
        statistics of the tensors they changed (re-observed once per combination)."""
        key = self._correction_key(config)
        if key not in self._observed:
            model = clone_model(self.pristine)
            observed = correct_float_model(model, config, self.correction_feeds,
                                           self.calibration.settings)
            self._observed[key] = (model, observed)
        model, observed = self._observed[key]
        return clone_model(model), observed

    def changes_anything(self, correction: str) -> bool:
        """Whether the correction ``correction`` (a config field) finds anything to change."""
        if correction == "smooth_quant":
            return bool(smoothing_tensors(self.pristine))
        if correction == "equalize_layers":
            return bool(equalize_layers(clone_model(self.pristine), iterations=1))
        return True

    # -- building ---------------------------------------------------------------------------
    def build(self, state: State) -> tuple[ir.Model, Any]:
        """Plan and emit ``state``; returns the quantized model and its plan."""
        config = state.planning_config()
        model, observed = self.corrected(config)
        if model_io.default_opset(model) < config.required_opset():  # 16-bit Q/DQ: opset 21
            model = model_io.convert_opset(model, config.required_opset())
        calibration = dataclasses.replace(self._ranged(config, observed),
                                          feeds=self.correction_feeds[:config.verify_feeds])
        ranges = plan_ranges(calibration, config)
        plan = build_plan(select_nodes(model, config), ranges, config,
                          keep_float=state.keep_float)
        if correct_planned_biases(model, plan, config, self.correction_feeds):
            plan = build_plan(select_nodes(model, config), ranges, config,
                              keep_float=state.keep_float)
            note_corrected_biases(model, plan)
        model, plan = emit_verified(model, plan, calibration, config, ranges=ranges,
                                    keep_float=state.keep_float)
        preprocess.drop_inferred_shapes(model, {  # ids of this copy's declared values
            id(v) for n in ir.traversal.RecursiveGraphIterator(model.graph)
            for v in n.outputs if v.name in self.declared})
        return model, plan

    def _ranged(self, config: StaticQuantConfig, observed: dict[str, Any]) -> Any:
        """The calibration with ``config``'s method and the corrections' re-observed tensors
        (derived once per combination: histogram methods search every tensor's range)."""
        settings = config.calibration_settings()
        key = (settings, self._correction_key(config))
        if key not in self._ranges:
            self._ranges[key] = corrected_calibration(
                dataclasses.replace(self.calibration, ranges=ranges_from_statistics(
                    self.calibration.statistics, self.calibration.samples, settings).ranges),
                observed, settings)
        return self._ranges[key]

    @staticmethod
    def _correction_key(config: StaticQuantConfig) -> tuple[bool, float, bool]:
        return (config.smooth_quant, config.smooth_quant_alpha, config.equalize_layers)

    # -- scoring ----------------------------------------------------------------------------
    def evaluate(self, model: ir.Model) -> tuple[float, int, float]:
        """(score, serialized bytes, latency relative to float) of a candidate."""
        data = ir.serde.serialize_model(model).SerializeToString()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(data, options, providers=list(self.providers))
        outputs, seconds = self._run(session)
        latency = seconds / self.float_seconds if self.float_seconds > 0 else float("nan")
        return score(self.target.metric, self.reference, outputs), len(data), latency

    def _run(self, session: ort.InferenceSession
             ) -> tuple[list[dict[str, np.ndarray]], float]:
        """Outputs on every evaluation feed and the median run time (the evaluation runs and
        a few more runs of the first feed)."""
        outputs, times = [], []
        for feed in self.feeds:
            start = time.perf_counter()
            values = session.run(self.names, feed)
            times.append(time.perf_counter() - start)
            outputs.append(dict(zip(self.names, values, strict=True)))
        for _ in range(TIMING_RUNS):
            start = time.perf_counter()
            session.run(self.names, self.feeds[0])
            times.append(time.perf_counter() - start)
        return outputs, statistics.median(times[1:] or times)
