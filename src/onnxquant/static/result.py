"""What a static quantization run did (:class:`QuantizationResult`), and its plain-text summary
(:func:`format_summary`, printed by ``onnxquant static`` and returned by
:meth:`QuantizationResult.summary`).

The summary counts what the written model does: a node the QOperator emitter kept float (its
plan reason says ``kept float in QOperator format: ...``) counts as float, even when the plan
had meant to quantize or remove it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from onnxquant.calibration.fidelity import Fidelity, accuracy_lines
from onnxquant.core.objective import Objective, estimate_line
from onnxquant.core.plan import NodeDecision, QuantPlan
from onnxquant.core.speed import Latency
from onnxquant.core.summary_text import (
    MAX_EXAMPLES,
    files_lines,
    reason_lines,
    size_line,
    speed_lines,
)
from onnxquant.emitters.qoperator import FALLBACK
from onnxquant.static._latency_guard import guard_line

__all__ = ["QuantizationResult", "format_summary", "effective_action", "SUGGESTIONS"]

logger = logging.getLogger(__name__)

# Column title of each known NodeDecision action, in table order. "weights" (weight-only) and
# any action this module does not know get a column only when some node has them.
_TITLES = {"quantize": "quantized", "weights": "weight-only", "remove": "removed",
           "float": "float"}
_ALWAYS = ("quantize", "remove", "float")
_MAX_REASONS = 5

NO_CANDIDATES = ("nothing was quantized: no selected node is of a kind static quantization "
                 "handles (Conv, MatMul, Gemm, ...; see --op-types/--nodes); the written "
                 "model is float")
NOTHING_QUANTIZED = ("nothing was quantized: every candidate node stays float (see the "
                     "reasons above); the written model is float")
SUGGESTIONS = ("--op-types MatMul,Conv,Gemm", "--per-channel", "--activation-type uint16")
"""What the low-accuracy warning suggests trying (CLI options of ``onnxquant static``)."""


@dataclasses.dataclass
class QuantizationResult:
    """What a quantization run did.

    Attributes:
        plan: Every decision and parameter.
        output_files: Paths written (model, then external data if any).
        float_bytes: Size of the input model (file plus external data; tensors when in memory).
        quantized_bytes: Size of the written files.
        calibration_samples: Number of feeds calibrated on.
        seconds: Wall time of the whole run.
        unobserved: Tensors that calibration could not observe (they stay float).
        fidelity: How close the quantized outputs stay to the float ones, and on which
            samples; None when not measured.
        target: With ``quantize_static(..., target=...)``: the search's outcome
            (:class:`onnxquant.target.TargetResult`: met, score, kept float, every step).
        hints: What ``onnxquant preprocess`` would improve in this model (empty when it was
            pre-processed or nothing suggests it).
    """

    plan: QuantPlan
    output_files: list[Path]
    float_bytes: int
    quantized_bytes: int
    calibration_samples: int
    seconds: float
    unobserved: list[str]
    fidelity: Fidelity | None = None
    target: Any = None
    hints: list[str] = dataclasses.field(default_factory=list)

    def summary(self, advice: Sequence[str] = (), latency: Latency | None = None) -> str:
        """The plain-text summary ``onnxquant static`` prints (see :func:`format_summary`).

        Args:
            advice: Warnings about choices known to be slow here.
            latency: A measured float vs quantized latency, if one was taken.
        """
        return format_summary(self, advice, latency)

    def warnings(self) -> list[str]:
        """What the user must know: nothing was quantized, or the accuracy dropped (the
        summary shows these too)."""
        found = []
        if not any(effective_action(d) in ("quantize", "weights")
                   for d in self.plan.nodes.values()):
            found.append(NOTHING_QUANTIZED if self.plan.nodes else NO_CANDIDATES)
        if self.fidelity is not None:
            low = self.fidelity.warning(SUGGESTIONS)
            if low:
                found.append(low)
        return found


def effective_action(decision: NodeDecision) -> str:
    """The node's action in the written model: ``"float"`` for a node the QOperator emitter
    kept float, else the plan's action."""
    if decision.action in ("quantize", "remove") and FALLBACK in (decision.reason or ""):
        return "float"
    return decision.action


def _float_reason(decision: NodeDecision) -> str:
    reason = decision.reason or ""
    return reason[reason.index(FALLBACK):] if FALLBACK in reason else reason


def _table(counts: dict[str, collections.Counter], totals: collections.Counter) -> list[str]:
    """Nodes per op type and action, most frequent op types first, then a total row."""
    actions = [a for a in _TITLES if a in _ALWAYS or totals[a]]
    actions += sorted(a for a in totals if a not in _TITLES)
    titles = [_TITLES.get(a, a) for a in actions]
    rows = sorted(counts.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    width = max([len("op type"), len("total"), *(len(op) for op in counts)])
    widths = [max(len(t), len(str(totals[a]))) for t, a in zip(titles, actions, strict=True)]

    def line(label: str, values: Iterable[object]) -> str:
        cells = "  ".join(f"{v!s:>{w}}" for v, w in zip(values, widths, strict=True))
        return f"  {label:<{width}}  {cells}"

    lines = [line("op type", titles)]
    lines += [line(op, [counter[a] for a in actions]) for op, counter in rows]
    lines.append(line("total", [totals[a] for a in actions]))
    return lines


def _counts(plan: QuantPlan) -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for decision in plan.nodes.values():
        counts[decision.op_type][effective_action(decision)] += 1
    return dict(counts)


def _cost_lines(plan: QuantPlan) -> list[str]:
    """The cost model's estimate (see :func:`onnxquant.core.objective.estimate_line`); nothing
    when costs were not measured and the objective is the default."""
    info = plan.settings.get("cost_model")
    guard = plan.settings.get("latency_guard")
    lines = [guard_line(guard)] if isinstance(guard, dict) and guard else []
    if not isinstance(info, dict) or (not info.get("measured", True)
                                      and info.get("objective") == Objective.BALANCED.value):
        return lines
    return [estimate_line(info), *lines]


def format_summary(result: QuantizationResult, advice: Sequence[str] = (),
                   latency: Latency | None = None) -> str:
    """Describe a quantization run in a few lines of plain text (no trailing newline).

    The text has: a headline with node counts, a table of nodes per op type (quantized,
    weight-only when there are any, removed = Relu/Clip folded into the producer's range,
    float), the float nodes grouped by their most common reasons, the accuracy (float vs
    quantized outputs, with a warning when low), size before -> after with the ratio, the
    number of calibration samples, tensors calibration never saw, the wall time and the files
    written.

    Args:
        result: What :func:`onnxquant.quantize_static` returned.
        advice: Warnings about format/type choices known to be slow here
            (:func:`onnxquant.core.speed.format_advice`).
        latency: A measured float vs quantized latency, if one was taken.
    """
    counts = _counts(result.plan)
    totals: collections.Counter = collections.Counter()
    for counter in counts.values():
        totals.update(counter)
    floats = [d for d in result.plan.nodes.values() if effective_action(d) == "float"]
    weight_only = f"{totals['weights']} weight-only, " if totals["weights"] else ""
    lines = [
        f"quantized {totals['quantize']} of {len(result.plan.nodes)} candidate nodes "
        f"({weight_only}{totals['remove']} removed, {len(floats)} left float)"
    ]
    if counts:
        lines += ["", *_table(counts, totals)]
    lines.append("")
    if floats:
        lines.append(f"float nodes:  {len(floats)}, by reason:")
        lines += reason_lines(((d.name, _float_reason(d)) for d in floats), _MAX_REASONS)
    else:
        lines.append("float nodes:  0")
    lines += accuracy_lines(result.fidelity)
    if result.target is not None:
        lines += result.target.lines()
    lines.append(size_line(result.float_bytes, result.quantized_bytes))
    lines += _cost_lines(result.plan)
    lines.append(f"calibration:  {result.calibration_samples} "
                 f"sample{'s' if result.calibration_samples != 1 else ''}")
    if result.unobserved:
        names = ", ".join(result.unobserved[:MAX_EXAMPLES])
        more = ", ..." if len(result.unobserved) > MAX_EXAMPLES else ""
        lines.append(f"unobserved:   {len(result.unobserved)} tensors never computed by the "
                     f"calibration data stay float ({names}{more})")
    lines.append(f"time:         {result.seconds:.2f} s")
    lines += [f"pre-process:  {hint}" for hint in result.hints]
    lines += speed_lines([*result.warnings(), *advice], latency)
    lines += files_lines(result.output_files)
    return "\n".join(lines)
