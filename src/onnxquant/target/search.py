"""The accuracy-target search: calibrate once (collecting histograms, from which every
calibration method's ranges derive), then re-plan and re-emit candidates — each costs one
emission and one pass over the evaluation samples — until one meets the target.

Moves, in the order they are tried, each kept when it raises the score:

1. *config* moves on the whole model: another calibration method (MSE, Percentile, Entropy),
   per-channel weights, 16-bit activations;
2. *tensor* moves, from the debugging report of the best model so far
   (:func:`onnxquant.debug.compare` on the evaluation samples): an activation whose own
   quantization error is large stays float — its producer and every reader are kept float;
3. *group* moves: every layer of an op type, when that gains clearly more than any single
   layer (the op-type sensitivity of the report);
4. *layer* moves: the layers of the sensitivity ranking (measured gain first, then isolated
   SQNR), each alone and then with the quantized layers that write its inputs (left out
   alone, a layer still reads quantized inputs: :mod:`onnxquant.debug.float_layer`).

The search stops at the first candidate that meets the target or after ``max_evaluations``
candidates; when it met the target, a trimming pass undoes the costly moves that are not
needed after all (16-bit activations, then float nodes, latest first). The best candidate is
written either way, and the result says whether the target was met. Not yet: 16-bit
activations for single tensors (only the whole model), SmoothQuant, bias correction and
cross-layer equalization.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxquant import preprocess
from onnxquant.calibration.evaluation import HoldBack
from onnxquant.calibration.fidelity import measure_fidelity
from onnxquant.calibration.readers import iter_feeds, validate_feed
from onnxquant.calibration.runner import ranges_from_statistics
from onnxquant.calibration.session import input_specs, make_session
from onnxquant.core import front_door, model_io, tempdirs
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import clone_model
from onnxquant.core.qtypes import INT16, UINT16
from onnxquant.core.summary_text import format_size
from onnxquant.debug.compare import compare
from onnxquant.static.api import calibrate_prepared
from onnxquant.static.config import CalibrationMethod, StaticQuantConfig
from onnxquant.static.planner import build_plan, select_nodes
from onnxquant.static.result import QuantizationResult
from onnxquant.static.verify import emit_verified
from onnxquant.target.scoring import score

__all__ = ["Step", "TargetResult", "quantize_to_target"]

logger = logging.getLogger(__name__)

TENSOR_MOVES = 3
"""Activations (worst own quantization SQNR first) tried as tensor moves."""
GROUP_MARGIN_DB = 3.0
"""An op-type group is tried when its gain beats the best single layer's by this much."""
TRIM_EVALUATIONS = 4
"""Candidates the trimming pass may evaluate once the target is met (on top of the budget)."""
LAYER_MOVES = 10
"""Layers of the sensitivity ranking tried as layer moves (alone, then with their inputs)."""


@dataclasses.dataclass
class Step:
    """One evaluated candidate: what was tried, its score and size, and whether it was kept."""

    move: str
    score: float
    bytes: int
    kept: bool


@dataclasses.dataclass
class TargetResult:
    """The outcome of the search.

    Attributes:
        target: The target, described (``cosine >= 0.99``).
        met: Whether the written model meets it.
        score: The written model's score on the evaluation samples.
        kept_float: Nodes the search kept float, with the reason.
        steps: Every evaluated candidate, in order (the size/accuracy trajectory).
        evaluation_samples: Samples each candidate was scored on.
    """

    target: str
    met: bool
    score: float
    kept_float: dict[str, str]
    steps: list[Step]
    evaluation_samples: int

    def lines(self) -> list[str]:
        verdict = "met" if self.met else "NOT met (the best model found was written)"
        lines = [f"target:       {self.target} {verdict}: {self.score:.4f} on "
                 f"{self.evaluation_samples} samples after {len(self.steps)} evaluations"]
        for step in self.steps:
            mark = "kept" if step.kept else "dropped"
            lines.append(f"  {step.move:<48} {step.score:10.4f}  "
                         f"{format_size(step.bytes):>10}  {mark}")
        for node, reason in self.kept_float.items():
            lines.append(f"  float: {node} ({reason})")
        return lines


class _Candidates:
    """Plans and emits candidates from one calibration, and scores them."""

    def __init__(self, pristine: ir.Model, calibration: Any, config: StaticQuantConfig,
                 target: Any, feeds: list[dict[str, np.ndarray]],
                 workdir: Path, declared: set[str]) -> None:
        self.pristine = pristine
        self.declared = declared
        self.calibration = calibration
        self.config = config
        self.target = target
        self.feeds = feeds
        self.workdir = workdir
        self._by_method: dict[CalibrationMethod, Any] = {}
        session = make_session(pristine, config.providers, workdir)
        self.names = [o.name for o in session.get_outputs()]
        self.reference = [dict(zip(self.names, session.run(self.names, f), strict=True))
                          for f in feeds]

    def calibration_for(self, config: StaticQuantConfig) -> Any:
        """The calibration result with ``config``'s method, derived from the histograms
        collected once (every method reads the same statistics)."""
        method = config.calibration_method
        if method not in self._by_method:
            derived = ranges_from_statistics(self.calibration.statistics,
                                             self.calibration.samples,
                                             config.calibration_settings())
            self._by_method[method] = dataclasses.replace(
                self.calibration, ranges=derived.ranges)
        return self._by_method[method]

    def build(self, keep_float: dict[str, str], config: StaticQuantConfig | None = None
              ) -> tuple[ir.Model, Any]:
        config = config or self.config
        calibration = self.calibration_for(config)
        model = clone_model(self.pristine)
        if model_io.default_opset(model) < config.required_opset():  # 16-bit Q/DQ: opset 21
            model = model_io.convert_opset(model, config.required_opset())
        plan = build_plan(select_nodes(model, config), calibration.ranges, config,
                          keep_float=keep_float)
        model, plan = emit_verified(model, plan, calibration, config)
        preprocess.drop_inferred_shapes(model, {  # ids of this copy's declared values
            id(v) for n in ir.traversal.RecursiveGraphIterator(model.graph)
            for v in n.outputs if v.name in self.declared})
        return model, plan

    def evaluate(self, model: ir.Model) -> tuple[float, int]:
        data = ir.serde.serialize_model(model).SerializeToString()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(data, options, providers=list(self.config.providers))
        outputs = [dict(zip(self.names, session.run(self.names, f), strict=True))
                   for f in self.feeds]
        return score(self.target.metric, self.reference, outputs), len(data)


def _with_histograms(config: StaticQuantConfig) -> StaticQuantConfig:
    """``config`` collecting histograms, from which every calibration method's ranges derive
    (MinMax collects only extremes); a moving-average MinMax keeps its own statistics."""
    if config.calibration_method is CalibrationMethod.MINMAX and not config.moving_average:
        return dataclasses.replace(config, calibration_method=CalibrationMethod.MSE)
    return config


def _eval_feeds(model: ir.Model, eval_data: Any, hold_back: HoldBack | None
                ) -> list[dict[str, np.ndarray]]:
    if eval_data is None:
        assert hold_back is not None
        return hold_back.held or hold_back.first
    specs, optional = input_specs(model)
    return [validate_feed(raw, specs, index=i, optional=optional)
            for i, raw in enumerate(iter_feeds(eval_data, specs=specs))]


def _moves(report: Any, model: ir.Model, planned: set[str]) -> list[tuple[str, dict[str, str]]]:
    """(description, nodes to keep float) in the order the search tries them."""
    values = {v.name: v for n in model.graph for v in n.outputs if v.name}
    values.update({v.name: v for v in model.graph.inputs if v.name})
    moves: list[tuple[str, dict[str, str]]] = []
    worst = sorted((a for a in report.activations.values()
                    if a.quantization_sqnr_db is not None),
                   key=lambda a: a.quantization_sqnr_db)[:TENSOR_MOVES]
    for act in worst:
        value = values.get(act.name)
        if value is None:
            continue
        producer = value.producer()
        touching = [producer] if producer is not None else []
        touching += [n for n, _ in value.uses()]
        names = {n.name for n in touching if n.name in planned}
        if names:
            reason = (f"tensor '{act.name}' stays float (own quantization SQNR "
                      f"{act.quantization_sqnr_db:.1f} dB)")
            moves.append((f"float tensor {act.name}", dict.fromkeys(names, reason)))
    nodes = {n.name: n for n in model.graph if n.name}
    moves += _group_moves(report, nodes, planned)
    for layer in report.ranked_layers()[:LAYER_MOVES]:
        name = layer.quantized_node if layer.quantized_node in planned else layer.node
        if name not in planned:
            continue
        gain = f"{layer.sensitivity_db:+.1f} dB" if layer.sensitivity_db is not None \
            else f"isolated {layer.isolated_sqnr_db:.1f} dB"
        reason = f"accuracy target (layer {gain})"
        moves.append((f"float layer {name}", {name: reason}))
        # Its inputs stay quantized while a quantized layer writes them: take those too.
        node = nodes.get(name)
        feeders = {p.name for v in (node.inputs if node is not None else ())
                   if v is not None and (p := v.producer()) is not None and p.name in planned}
        if feeders:
            moves.append((f"float layer {name} and its inputs",
                          {name: reason, **dict.fromkeys(feeders, f"input of {name}")}))
    return moves


def _config_moves(config: StaticQuantConfig
                  ) -> list[tuple[str, Callable[[StaticQuantConfig], StaticQuantConfig]]]:
    """Whole-model moves, tried first, each applied to the config kept so far: another
    calibration method (MSE picks each tensor's range by its own expected error), per-channel
    weights, then 16-bit activations (weights stay 8-bit: the size barely changes; onnxruntime
    runs them through DequantizeLinear, so they cost speed)."""
    moves: list[tuple[str, Callable[[StaticQuantConfig], StaticQuantConfig]]] = []
    if not config.moving_average:
        for method in (CalibrationMethod.MSE, CalibrationMethod.PERCENTILE,
                       CalibrationMethod.ENTROPY):
            if method is not config.calibration_method:
                moves.append((f"calibration {method.value}", functools.partial(
                    dataclasses.replace, calibration_method=method)))
    if not config.per_channel:
        moves.append(("per-channel weights",
                      functools.partial(dataclasses.replace, per_channel=True)))
    if config.activation_type.bits < 16 and not config.activation_type.is_float:
        wide = UINT16 if not config.activation_type.signed else INT16
        moves.append((f"{wide.name} activations",
                      functools.partial(dataclasses.replace, activation_type=wide)))
    return moves


def _group_moves(report: Any, nodes: dict[str, ir.Node], planned: set[str]
                 ) -> list[tuple[str, dict[str, str]]]:
    """Every layer of an op type float, for the op types whose group gain clearly beats the
    best single layer's (the error is spread over that kind of layer)."""
    best_layer = max((x.sensitivity_db or 0.0 for x in report.layers), default=0.0)
    moves = []
    for op, gain in sorted(report.op_type_sensitivity.items(), key=lambda kv: -kv[1]):
        if gain < best_layer + GROUP_MARGIN_DB:
            break
        names = {n for n, node in nodes.items() if node.op_type == op and n in planned}
        if names:
            moves.append((f"float every {op}", dict.fromkeys(
                names, f"accuracy target (every {op}: {gain:+.1f} dB)")))
    return moves


def quantize_to_target(model_input: Any, model_output: Any, calibration_data: Any,
                       config: StaticQuantConfig | None, target: Any, *,
                       eval_data: Any = None) -> QuantizationResult:
    """Quantize statically to ``target``; see the module docstring."""
    config = config or StaticQuantConfig()
    start = time.perf_counter()
    entry = front_door.enter(model_input, model_output, upgrade_opset=config.upgrade_opset,
                             min_opset=config.required_opset())
    model = entry.model
    annotated = preprocess.prepare_for_quantization(model, fold_bn=config.fold_batchnorm)
    declared = {v.name or "" for n in ir.traversal.RecursiveGraphIterator(model.graph)
                for v in n.outputs if id(v) in annotated}
    float_bytes = entry.source.float_bytes(model)
    hold_back = HoldBack() if eval_data is None else None
    calibration = calibrate_prepared(model, select_nodes(model, config), calibration_data,
                                     _with_histograms(config), hold_back=hold_back)
    feeds = _eval_feeds(model, eval_data, hold_back)
    if not feeds:
        raise CalibrationError("the accuracy target needs evaluation samples: pass eval_data")
    with tempdirs.private_dir(None, "onnxquant-target-") as workdir:
        search = _Search(_Candidates(clone_model(model), calibration, config, target, feeds,
                                     workdir, declared), workdir)
        best_model, best_plan = search.run()
    written = model_io.save_model(best_model, entry.output, external_data=config.external_data)
    del best_model
    fidelity = measure_fidelity(model_input, written[0], feeds, providers=config.providers,
                                source=f"{len(feeds)} evaluation samples of the target search")
    result = QuantizationResult(
        plan=best_plan, output_files=written, float_bytes=float_bytes,
        quantized_bytes=sum(p.stat().st_size for p in written),
        calibration_samples=calibration.samples, seconds=time.perf_counter() - start,
        unobserved=calibration.unobserved, fidelity=fidelity, target=search.result)
    return result


def _beats(bar: float) -> Callable[[float], bool]:
    return lambda value: value > bar


def _reaches(bar: float) -> Callable[[float], bool]:
    return lambda value: value >= bar


class _Search:
    def __init__(self, candidates: _Candidates, workdir: Path) -> None:
        self.candidates = candidates
        self.workdir = workdir
        self.steps: list[Step] = []
        self.result: TargetResult | None = None

    def run(self) -> tuple[ir.Model, Any]:
        c = self.candidates
        target = c.target
        keep: dict[str, str] = {}
        model, plan = c.build(keep)
        best_score, size = c.evaluate(model)
        self.steps.append(Step("defaults", best_score, size, True))
        best = (model, plan)
        config = c.config
        for description, change in _config_moves(config):
            if self._done(best_score):
                break
            trial_config = change(config)
            found = self._try(description, keep, trial_config, _beats(best_score))
            if found is not None:
                config, best_score, best = trial_config, found[0], found[1]
        node_moves: list[tuple[str, dict[str, str]]] = []
        if not self._done(best_score):
            planned = {d.name for d in best[1].nodes.values()}
            for description, nodes in self._moves(best[0], planned):
                if self._done(best_score):
                    break
                trial = {**keep, **nodes}
                found = self._try(description, trial, config, _beats(best_score))
                if found is not None:
                    keep, best_score, best = trial, found[0], found[1]
                    node_moves.append((description, nodes))
        if best_score >= target.min_score:
            config, keep, best_score, best = self._trim(config, keep, node_moves, best_score,
                                                        best)
        self.result = TargetResult(target.describe(), best_score >= target.min_score,
                                   best_score, keep, self.steps, len(c.feeds))
        return best

    def _trim(self, config: StaticQuantConfig, keep: dict[str, str],
              node_moves: list[tuple[str, dict[str, str]]], best_score: float,
              best: tuple[ir.Model, Any]) -> tuple[StaticQuantConfig, dict[str, str], float,
                                                   tuple[ir.Model, Any]]:
        """Once the target is met, undo the costly moves that turn out not to be needed (at
        most :data:`TRIM_EVALUATIONS` candidates): 16-bit activations back to the requested
        width (they cost speed), then the float nodes, latest first (they cost size)."""
        minimum = self.candidates.target.min_score
        original = self.candidates.config.activation_type
        tries = 0
        if config.activation_type != original:
            narrow = dataclasses.replace(config, activation_type=original)
            found = self._try(f"undo: {original.name} activations", keep, narrow,
                              _reaches(minimum))
            tries += 1
            if found is not None:
                config, best_score, best = narrow, found[0], found[1]
        for description, nodes in reversed(node_moves):
            if tries >= TRIM_EVALUATIONS:
                break
            trial = {k: v for k, v in keep.items() if k not in nodes}
            found = self._try(f"undo: {description}", trial, config, _reaches(minimum))
            tries += 1
            if found is not None:
                keep, best_score, best = trial, found[0], found[1]
        return config, keep, best_score, best

    def _try(self, description: str, keep: dict[str, str], config: StaticQuantConfig,
             accept: Callable[[float], bool]) -> tuple[float, tuple[ir.Model, Any]] | None:
        """Build and score one candidate; its (score, (model, plan)) when ``accept`` takes
        the score. A candidate that cannot be built or run is recorded and skipped."""
        try:
            model, plan = self.candidates.build(keep, config)
            value, size = self.candidates.evaluate(model)
        except Exception as err:  # noqa: BLE001 - one failed move must not end the search
            logger.warning("accuracy target: '%s' could not be evaluated: %s", description, err)
            self.steps.append(Step(f"{description} (failed)", -math.inf, 0, False))
            return None
        kept = accept(value)
        self.steps.append(Step(description, value, size, kept))
        return (value, (model, plan)) if kept else None

    def _done(self, best_score: float) -> bool:
        target = self.candidates.target
        return best_score >= target.min_score or len(self.steps) >= target.evaluations

    def _moves(self, model: ir.Model, planned: set[str]) -> list[tuple[str, dict[str, str]]]:
        path = self.workdir / "default.onnx"
        ir.save(model, path)
        float_path = self.workdir / "float.onnx"
        ir.save(self.candidates.pristine, float_path)
        report = compare(float_path, path, self.candidates.feeds, sensitivity_layers=4)
        return _moves(report, self.candidates.pristine, planned)
