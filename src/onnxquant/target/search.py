"""The accuracy-target search: calibrate once (collecting histograms, from which every
calibration method's ranges derive, and keeping feeds for the corrections' statistics), then
re-plan and re-emit candidates (:mod:`onnxquant.target.candidates`) — each costs one emission
and one pass over the evaluation samples — until one meets the target.

The moves (:mod:`onnxquant.target.moves`) are tried greedily, each kept when it raises the
score, in this order:

1. whole-model config moves (calibration method, per-channel weights) and the corrections;
2. a probe of 16-bit activations everywhere (QDQ), kept when it gains (per-channel weights are
   tried again on top: with 16-bit activations the weights' error dominates);
3. node moves ranked by the debugging report of the best model so far; when moves keep
   disappointing after the best model changed, the report is made again on the new best
   model and the ranking starts over (at most :data:`MAX_RERANKS` times).

The search stops at the first candidate that meets the target or after ``max_evaluations``
candidates. Once met: if the probe was kept, bisection finds the fewest activations (worst
own 8-bit error first) that still need 16 bits (at most :data:`NARROW_EVALUATIONS` more
candidates); then a trimming pass undoes the costly moves that are not needed after all (16-bit
everywhere, float nodes — small groups node by node —, 16-bit tensors; latest first). The best
candidate is written either way, and the result says whether the target was met and, if not,
why.
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

from onnxquant.calibration.evaluation import HoldBack
from onnxquant.calibration.fidelity import measure_fidelity
from onnxquant.calibration.readers import iter_feeds, validate_feed
from onnxquant.calibration.session import input_specs
from onnxquant.core import front_door, model_io, tempdirs
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import clone_model
from onnxquant.core.qtypes import QuantFormat
from onnxquant.debug.compare import compare
from onnxquant.preprocess import passes as preprocess
from onnxquant.static.api import calibrate_prepared
from onnxquant.static.config import CalibrationMethod, StaticQuantConfig
from onnxquant.static.planner import select_nodes
from onnxquant.static.result import QuantizationResult
from onnxquant.target.candidates import Candidates, State
from onnxquant.target.moves import (
    EVERYWHERE,
    Move,
    config_moves,
    correction_moves,
    last_resort,
    node_moves,
    widen_worst,
    widening_order,
)
from onnxquant.target.result import Step, TargetResult

__all__ = ["Step", "TargetResult", "quantize_to_target"]

logger = logging.getLogger(__name__)

TRIM_EVALUATIONS = 6
"""Candidates the trimming pass may evaluate once the target is met (on top of the budget)."""
NARROW_EVALUATIONS = 10
"""Candidates the bisection of 16-bit activations may evaluate (on top of the budget)."""
TRIM_GROUP = 4
"""Moves that kept at most this many nodes float are undone node by node when they cannot be
undone whole."""
"""Candidates the trimming pass may evaluate once the target is met (on top of the budget)."""
RERANK_AFTER = 2
"""Consecutive disappointing node moves after which the report is made again (when the best
model changed since the last one)."""
MAX_RERANKS = 3
"""Reports made again at most this many times."""


def _with_histograms(config: StaticQuantConfig) -> StaticQuantConfig:
    """``config`` collecting histograms, from which every calibration method's ranges derive
    (MinMax collects only extremes; a moving-average MinMax keeps its own statistics), and
    keeping ``correction_feeds`` feeds for the corrections' statistics."""
    keep = dataclasses.replace(config, verify_finite=True,
                               verify_feeds=max(config.verify_feeds, config.correction_feeds))
    if config.calibration_method is CalibrationMethod.MINMAX and not config.moving_average:
        return dataclasses.replace(keep, calibration_method=CalibrationMethod.MSE)
    return keep


def _eval_feeds(model: ir.Model, eval_data: Any, hold_back: HoldBack | None
                ) -> list[dict[str, np.ndarray]]:
    if eval_data is None:
        assert hold_back is not None
        return hold_back.held or hold_back.first
    specs, optional = input_specs(model)
    return [validate_feed(raw, specs, index=i, optional=optional)
            for i, raw in enumerate(iter_feeds(eval_data, specs=specs))]


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
        candidates = Candidates(clone_model(model), calibration, target, feeds, workdir,
                                declared, config.providers)
        search = _Search(candidates, config, workdir)
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




@dataclasses.dataclass
class _Best:
    state: State
    score: float
    model: ir.Model
    plan: Any
    moves: list[Move] = dataclasses.field(default_factory=list)


class _Search:
    def __init__(self, candidates: Candidates, config: StaticQuantConfig, workdir: Path
                 ) -> None:
        self.candidates = candidates
        self.target = candidates.target
        self.initial = State(config)
        self.workdir = workdir
        self.steps: list[Step] = []
        self.result: TargetResult | None = None
        self.best: _Best | None = None
        self._reported: tuple[_Best, Any] | None = None

    # -- the phases -------------------------------------------------------------------------
    def run(self) -> tuple[ir.Model, Any]:
        model, plan = self.candidates.build(self.initial)
        value, size, latency = self.candidates.evaluate(model)
        self.steps.append(Step("defaults", value, size, True, latency))
        self.best = _Best(self.initial, value, model, plan)
        for move in config_moves(self.initial) + correction_moves(
                self.initial, self.candidates.changes_anything):
            if self._done():
                break
            self._attempt(move)
        order = self._probe()
        self._node_moves()
        for move in last_resort(self.best.state):
            if not self._done():
                self._attempt(move)
        if self._met() and order:
            self._narrow(order)
        if self._met():
            self._trim()
        best = self.best
        self.result = TargetResult(
            self.target.describe(), self._met(), best.score, dict(best.state.keep_float),
            self.steps, len(self.candidates.feeds), wide_tensors=dict(best.state.wide),
            changes=_effective([m.description for m in best.moves if _whole_model(m)]),
            reason="" if self._met() else self._why_not())
        return best.model, best.plan

    def _probe(self) -> list[str] | None:
        """QDQ: probe 16-bit activations everywhere, kept when it beats the best model (with
        per-channel weights tried on top when 8-bit weights then hold it back); returns the
        activations in the order :meth:`_narrow` gives them back 8 bits, when it was kept."""
        assert self.best is not None
        config = self.best.state.config
        if self._done() or config.format is not QuantFormat.QDQ or \
                config.activation_type.bits >= 16 or config.activation_type.is_float:
            return None
        order = widening_order(self._report(), self.best.plan)
        if not order or not self._attempt(widen_worst(order, len(order))):
            return None
        if not self._done() and not self.best.state.config.per_channel:
            self._attempt(Move("per-channel weights (with 16-bit activations)",
                               _per_channel))
        return order

    def _narrow(self, order: list[str]) -> None:
        """With the target met by 16-bit activations everywhere, bisect for the fewest
        activations (worst own 8-bit error first) that still meet it; the rest go back to 8
        bits and their integer kernels (evaluations on top of the budget)."""
        assert self.best is not None
        everything = [m for m in self.best.moves if m.description == EVERYWHERE]
        if not everything:
            return
        others = [m for m in self.best.moves if m is not everything[0]]
        base = self.initial
        for m in others:
            base = m.apply(base)
        minimum = self.target.min_score
        low, high = 0, len(order)
        for _ in range(NARROW_EVALUATIONS):
            if high - low <= 1:
                break
            middle = (low + high) // 2
            move = widen_worst(order, middle)
            state = move.apply(base)
            if self._attempt(Move(move.description, functools.partial(_replaced, state)),
                             accept=lambda v: v >= minimum, moves=[*others, move]):
                high = middle
            else:
                low = middle

    def _node_moves(self) -> None:
        """Node moves from the report of the best model; made again when moves keep
        disappointing after the best model changed."""
        tried: set[str] = set()
        for _ in range(MAX_RERANKS + 1):
            if self._done():
                return
            assert self.best is not None
            reported = self.best
            moves = [m for m in node_moves(self._report(), self.candidates.pristine,
                                           reported.plan, reported.state)
                     if m.description not in tried]
            misses = 0
            for move in moves:
                if self._done():
                    return
                tried.add(move.description)
                misses = 0 if self._attempt(move) else misses + 1
                if misses >= RERANK_AFTER and self.best is not reported:
                    break  # the ranking came from an older model: rank again
            else:
                return

    def _trim(self) -> None:
        """Undo the costly moves that turn out not to be needed (at most
        :data:`TRIM_EVALUATIONS` candidates): 16-bit everywhere (slow), float nodes (large),
        16-bit tensors (slower), latest first within each kind. A move that kept a few nodes
        float and cannot be undone whole is undone node by node."""
        assert self.best is not None
        ranked = sorted(enumerate(self.best.moves), key=lambda im: (_trim_rank(im[1]), -im[0]))
        costly = [move for _, move in ranked if _trim_rank(move) < 3]
        budget = len(self.steps) + TRIM_EVALUATIONS
        for move in costly:
            if len(self.steps) >= budget:
                return
            if self._undo(move, []):
                continue
            nodes = list(move.apply(State(self.initial.config)).keep_float)
            if 1 < len(nodes) <= TRIM_GROUP:
                for node in nodes[::-1]:
                    if len(self.steps) >= budget or len(nodes) == 1:
                        break
                    rest = [n for n in nodes if n != node]
                    if self._undo(move, [Move(f"{move.description} except {node}",
                                              functools.partial(_floating_only, move, rest))]):
                        move, nodes = self.best.moves[-1], rest

    def _undo(self, move: Move, replacement: list[Move]) -> bool:
        """Try the best model's moves with ``move`` replaced by ``replacement``; kept when the
        target is still met."""
        assert self.best is not None
        moves = [m for m in self.best.moves if m is not move] + replacement
        state = self.initial
        for m in moves:
            state = m.apply(state)
        minimum = self.target.min_score
        label = replacement[0].description if replacement else move.description
        return self._attempt(Move(f"undo: {label}" if not replacement else label,
                                  functools.partial(_replaced, state)),
                             accept=lambda v: v >= minimum, moves=moves)

    # -- one candidate ----------------------------------------------------------------------
    def _attempt(self, move: Move, accept: Callable[[float], bool] | None = None,
                 moves: list[Move] | None = None) -> bool:
        """Build and score ``move`` applied to the best state; keep it when ``accept`` takes
        the score (default: it beats the best). A candidate that cannot be built or run is
        recorded and skipped."""
        assert self.best is not None
        best = self.best
        state = move.apply(best.state)
        try:
            model, plan = self.candidates.build(state)
            value, size, latency = self.candidates.evaluate(model)
        except Exception as err:  # noqa: BLE001 - one failed move must not end the search
            logger.warning("accuracy target: '%s' could not be evaluated: %s",
                           move.description, err)
            self.steps.append(Step(f"{move.description} (failed)", -math.inf, 0, False))
            return False
        kept = accept(value) if accept is not None else value > best.score
        self.steps.append(Step(move.description, value, size, kept, latency))
        if kept:
            self.best = _Best(state, value, model, plan,
                              moves if moves is not None else [*best.moves, move])
        return kept

    def _met(self) -> bool:
        assert self.best is not None
        return self.best.score >= self.target.min_score

    def _done(self) -> bool:
        return self._met() or len(self.steps) >= self.target.evaluations

    def _why_not(self) -> str:
        if len(self.steps) >= self.target.evaluations:
            return (f"the budget of {self.target.evaluations} evaluations was spent; raise "
                    "max_evaluations, or accept a lower score")
        return ("every move was tried; the rest of the error is in what stays quantized — "
                "try other calibration data, or a lower target")

    def _report(self) -> Any:
        """The debugging report of the best model (made once per best model)."""
        assert self.best is not None
        if self._reported is not None and self._reported[0] is self.best:
            return self._reported[1]
        path = self.workdir / "best.onnx"
        ir.save(self.best.model, path)
        float_path = self.workdir / "float.onnx"
        if not float_path.exists():
            ir.save(self.candidates.pristine, float_path)
        report = compare(float_path, path, self.candidates.feeds, sensitivity_layers=4)
        self._reported = (self.best, report)
        return report


def _replaced(state: State, _old: State) -> State:
    return state


def _floating_only(move: Move, nodes: list[str], state: State) -> State:
    """``move`` applied to ``state``, keeping only ``nodes`` of the nodes it keeps float."""
    after = move.apply(state)
    added = {n: why for n, why in after.keep_float.items()
             if n not in state.keep_float and n in nodes}
    return dataclasses.replace(after, keep_float={**state.keep_float, **added})


def _per_channel(state: State) -> State:
    return dataclasses.replace(state, config=dataclasses.replace(state.config,
                                                                 per_channel=True))


def _effective(changes: list[str]) -> list[str]:
    """Whole-model changes without the calibration methods a later one replaced."""
    methods = [c for c in changes if c.startswith("calibration ")]
    return [c for c in changes if not c.startswith("calibration ") or c == methods[-1]]


def _whole_model(move: Move) -> bool:
    return _trim_rank(move) == 3 and not move.description.startswith("16-bit for the")


def _trim_rank(move: Move) -> int:
    """0: 16-bit everywhere, 1: float nodes, 2: 16-bit tensors, 3: free (config and
    corrections: not undone)."""
    text = move.description
    if text.endswith("activations everywhere"):
        return 0
    if text.startswith("float "):
        return 1
    if text.startswith("16-bit "):
        return 2
    return 3
