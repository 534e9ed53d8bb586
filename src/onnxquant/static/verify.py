"""Emit the plan, then check that the quantized model is finite wherever the float model is.

The rules keep singular-domain inputs float and the planner refuses meaningless grids, but a
quantized model can still reach a singular point the float model never hits (a small value
that rounds to 0 several ops before a Log or a Div). So after emission the quantized and the
float model run on the first calibration feeds (kept by calibration: a one-shot reader cannot
be read twice). Where a float output of the quantized model holds more NaN/Inf values than the
float model's:

1. both models run again with a NaN/Inf count of every main-graph float tensor as an extra
   output; the first tensors whose count grows (their inputs are fine) name the culprit nodes;
2. the quantized nodes feeding those culprits — 1, 2, 4 steps up the graph, then all of them —
   are kept float (``keep_float`` of the planner), and the model is planned and emitted again
   from the float model, until the check passes.

Every node taken out says why in its plan decision. If nothing helps, a warning says so and the
last model is kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxquant.calibration.runner import CalibrationResult
from onnxquant.calibration.session import make_session
from onnxquant.core import tempdirs
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import clone_model
from onnxquant.core.plan import QuantPlan
from onnxquant.core.qtypes import QuantFormat
from onnxquant.emitters.qdq import emit_qdq
from onnxquant.emitters.qoperator import emit_qoperator
from onnxquant.static._singular import may_turn_nonfinite
from onnxquant.static.config import StaticQuantConfig
from onnxquant.static.planner import build_plan, select_nodes

__all__ = ["emit_verified", "emit", "DEPTHS"]

logger = logging.getLogger(__name__)

DEPTHS = (1, 2, 4, None)
"""How far up from a culprit node quantized nodes are kept float, round by round (None: every
quantized ancestor)."""

_COUNT_PREFIX = "_oqverify_nonfinite_"


def emit(model: ir.Model, plan: QuantPlan, qformat: QuantFormat) -> None:
    """Rewrite ``model`` in place following ``plan`` in ``qformat``."""
    if qformat is QuantFormat.QOPERATOR:
        emit_qoperator(model, plan)
    else:
        emit_qdq(model, plan)


def emit_verified(model: ir.Model, plan: QuantPlan, calibration: CalibrationResult,
                  config: StaticQuantConfig, *, annotated: set[int] | None = None,
                  ranges: Mapping[str, tuple[float, float]] | None = None,
                  keep_float: Mapping[str, str] | None = None) -> tuple[ir.Model, QuantPlan]:
    """Emit ``plan`` into ``model`` and check finiteness on ``calibration.feeds``.

    Args:
        model: The prepared float model (rewritten in place).
        plan: The plan for ``model``.
        calibration: Ranges (for planning again) and the kept feeds.
        config: Settings (``verify_finite``, format, providers).
        annotated: Ids of values whose shapes are kept when saving; extended with the values
            of the model that is returned when it is a new one.
        ranges: The ranges ``plan`` was made with (default: ``calibration.ranges``).
        keep_float: The nodes ``plan`` was told to keep float (kept float again).

    Returns:
        The quantized model — ``model`` itself, or a new one planned again with some nodes
        kept float — and its plan.
    """
    feeds = calibration.feeds
    if not config.verify_finite or not feeds or not may_turn_nonfinite(model):
        emit(model, plan, config.format)
        return model, plan
    names = {v.name for v in _values(model) if annotated is not None and id(v) in annotated}
    pristine = clone_model(model)
    emit(model, plan, config.format)
    with tempdirs.private_dir(None, "onnxquant-verify-") as folder:
        checker = _Checker(pristine, feeds, config, folder)
        if checker.reference is None:
            return model, plan
        bad = checker.bad_outputs(model)
        if not bad:
            return model, plan
        logger.warning("the quantized model gives NaN/Inf where the float model does not (%s); "
                       "keeping the nodes that cause it float", _describe(bad))
        forced: dict[str, str] = dict(keep_float or {})
        for depth in DEPTHS:
            culprits = checker.culprits(model, bad)
            forced.update(_to_float(pristine, plan, culprits, depth))
            model = clone_model(pristine)
            plan = build_plan(select_nodes(model, config),
                              calibration.ranges if ranges is None else ranges, config,
                              keep_float=forced)
            emit(model, plan, config.format)
            bad = checker.bad_outputs(model)
            if not bad:
                break
        else:
            logger.warning("the quantized model still gives NaN/Inf where the float model does "
                           "not (%s), with every quantized node upstream kept float",
                           _describe(bad))
    if annotated is not None:
        annotated.update(id(v) for v in _values(model) if v.name in names)
    return model, plan


@dataclasses.dataclass
class _Bad:
    """A tensor with more NaN/Inf values in the quantized model than in the float model."""

    tensor: str
    feed: int
    extra: int


def _describe(bad: list[_Bad]) -> str:
    return ", ".join(f"'{b.tensor}': {b.extra} more on feed {b.feed}" for b in bad[:3]) + (
        f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def _values(model: ir.Model) -> Iterator[ir.Value]:
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            yield from node.outputs


class _Checker:
    """Runs models on the kept feeds and compares NaN/Inf counts with the float model's."""

    def __init__(self, pristine: ir.Model, feeds: list[dict], config: StaticQuantConfig,
                 workdir: Path) -> None:
        self.pristine = pristine
        self.feeds = feeds
        self.providers = config.providers
        self.workdir = workdir
        self.reference = self._counts(pristine)
        self.float_tensors: dict[str, list[int]] | None = None

    def _session(self, model: ir.Model):
        try:
            return make_session(model, self.providers, self.workdir)
        except CalibrationError as err:
            logger.warning("finiteness check skipped: %s", err)
            return None

    def _counts(self, model: ir.Model,
                tensors: list[str] | None = None) -> dict[str, list[int]] | None:
        """NaN/Inf count per float output (and per named tensor) and feed; None when the
        model does not run."""
        work = model
        exposed: dict[str, str] = {}  # output name -> tensor name
        if tensors:
            work = clone_model(model)
            exposed = {o: t for t, o in _expose_counts(work, tensors).items()}
        session = self._session(work)
        if session is None:
            return None
        outputs = [o.name for o in session.get_outputs()]
        counts: dict[str, list[int]] = {}
        for feed in self.feeds:
            try:
                results = session.run(None, feed)
            except Exception as err:  # a runtime failure is not a finiteness verdict
                logger.warning("finiteness check skipped: onnxruntime failed: %s", err)
                return None
            for name, array in zip(outputs, results, strict=True):
                if name in exposed:
                    counts.setdefault(exposed[name], []).append(int(np.asarray(array).sum()))
                elif not exposed:
                    counts.setdefault(name, []).append(_nonfinite(array))
        return counts

    def bad_outputs(self, model: ir.Model) -> list[_Bad]:
        """Graph outputs of ``model`` with more NaN/Inf values than the float model's."""
        assert self.reference is not None
        counts = self._counts(model)
        if counts is None:
            return []
        return _compare(counts, self.reference)

    def culprits(self, model: ir.Model, bad: list[_Bad]) -> dict[str, str]:
        """Node name (in the float model) -> reason, for the nodes whose outputs first turn
        NaN/Inf in ``model`` (their inputs do not)."""
        names = [v.name or "" for node in self.pristine.graph for v in node.outputs
                 if v.name and v.dtype == ir.DataType.FLOAT]
        present = {v.name for v in _values(model) if v.dtype == ir.DataType.FLOAT}
        present.update(v.name for v in model.graph.inputs)
        names = [n for n in names if n in present]
        if self.float_tensors is None:
            self.float_tensors = self._counts(self.pristine, tensors=names) or {}
        counts = self._counts(model, tensors=names) or {}
        grown = {b.tensor: b for b in _compare(counts, self.float_tensors)}
        grown.update({b.tensor: b for b in bad if b.tensor not in grown})
        found: dict[str, str] = {}
        for node in self.pristine.graph:
            hits = [grown[v.name] for v in node.outputs if v.name in grown]
            if not hits or any(v is not None and v.name in grown for v in node.inputs):
                continue
            hit = hits[0]
            found[node.name or ""] = (
                f"the quantized model gave {hit.extra} more NaN/Inf values than the float model "
                f"in '{hit.tensor}' (calibration feed {hit.feed}); kept float by the finiteness "
                "check after emission")
        return found


def _nonfinite(array: object) -> int:
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _compare(counts: dict[str, list[int]], reference: dict[str, list[int]]) -> list[_Bad]:
    bad = []
    for name, per_feed in counts.items():
        ref = reference.get(name)
        if ref is None:
            continue
        for index, (got, want) in enumerate(zip(per_feed, ref, strict=False)):
            if got > want:
                bad.append(_Bad(name, index, got - want))
                break
    return bad


def _expose_counts(model: ir.Model, names: list[str]) -> dict[str, str]:
    """Add a float32 NaN/Inf count output for every named main-graph tensor, in place; returns
    tensor name -> output name."""
    graph = model.graph
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    exposed: dict[str, str] = {}
    for index, name in enumerate(names):
        value = values.get(name)
        if value is None:
            continue
        stem = f"{_COUNT_PREFIX}{index}"
        nan = _append(graph, "IsNaN", [value], f"{stem}_nan")
        inf = _append(graph, "IsInf", [value], f"{stem}_inf")
        either = _append(graph, "Or", [nan, inf], f"{stem}_or")
        as_float = _append(graph, "Cast", [either], f"{stem}_cast", to=ir.DataType.FLOAT)
        out = _append(graph, "ReduceSum", [as_float], f"{stem}_count", keepdims=0)
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = ir.Shape([])
        graph.outputs.append(out)
        exposed[name] = out.name or ""
    graph.sort()
    return exposed


def _append(graph: ir.Graph, op: str, inputs: list[ir.Value], name: str,
            **attrs: Any) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs or None, name=name)
    graph.append(node)
    node.outputs[0].name = name
    return node.outputs[0]


def _to_float(pristine: ir.Model, plan: QuantPlan, culprits: dict[str, str],
              depth: int | None) -> dict[str, str]:
    """The quantized nodes at most ``depth`` steps up from each culprit (the culprit itself
    included; None: all of them), with the culprit's reason."""
    producers: dict[str, ir.Node] = {}
    nodes = {n.name: n for n in pristine.graph}
    for node in pristine.graph:
        for out in node.outputs:
            producers[out.name or ""] = node
    found: dict[str, str] = {}
    for name, reason in culprits.items():
        start = nodes.get(name)
        if start is None:
            continue
        frontier, seen, step = [start], {start}, 0
        while frontier:
            for node in frontier:
                for inner in _with_subgraph_nodes(node):
                    decision = plan.nodes.get(inner.name or "")
                    if decision is not None and decision.action != "float":
                        found.setdefault(inner.name or "", reason)
            step += 1
            if depth is not None and step > depth:
                break
            upstream = []
            for node in frontier:
                for value in node.inputs:
                    producer = producers.get(value.name or "") if value is not None else None
                    if producer is not None and producer not in seen:
                        seen.add(producer)
                        upstream.append(producer)
            frontier = upstream
    return found


def _with_subgraph_nodes(node: ir.Node) -> Iterator[ir.Node]:
    yield node
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.as_graphs())
        for graph in graphs:
            yield from ir.traversal.RecursiveGraphIterator(graph)

