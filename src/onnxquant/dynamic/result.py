"""What a dynamic quantization run did (:class:`DynamicQuantizationResult`), and its plain-text
summary (:func:`format_dynamic_summary`, printed by ``onnxquant dynamic`` and returned by
:meth:`DynamicQuantizationResult.summary`)."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxquant.calibration.fidelity import Fidelity, accuracy_lines
from onnxquant.core.objective import estimate_line
from onnxquant.core.qtypes import QuantFormat
from onnxquant.core.speed import Latency
from onnxquant.core.summary_text import files_lines, reason_lines, size_line, speed_lines
from onnxquant.dynamic._rewrite import Decision

__all__ = ["DynamicQuantizationResult", "format_dynamic_summary", "SUGGESTIONS"]

logger = logging.getLogger(__name__)

_MAX_REASONS = 6

SUGGESTIONS = ("--per-channel", "--op-types MatMul,Gemm",
               "static quantization (onnxquant static) with calibration data")
"""What the low-accuracy warning suggests trying."""
NOTHING_QUANTIZED = ("nothing was quantized: no MatMul/Gemm/Conv/Gather/LSTM/Attention node "
                     "with constant weights was selected, or each stays float (see the "
                     "reasons above); the written model is float")


@dataclasses.dataclass
class DynamicQuantizationResult:
    """What a dynamic quantization run did.

    Attributes:
        decisions: One entry per node of a quantizable op type (name, op type, action
            ``"quantized"``/``"float"``, and what was emitted or why it stays float).
        runtime_notes: Which form was chosen for which nodes and why (type/granularity
            fallbacks forced by what the installed onnxruntime executes, and the forms used).
        output_files: Paths written (model, then external data if any).
        float_bytes: Size of the input model (file plus external data; tensors when in memory).
        quantized_bytes: Size of the written files.
        seconds: Wall time of the whole run.
        format: The representation written (QOperator or QDQ).
        fidelity: How close the quantized outputs stay to the float ones, and on which
            samples; None when not measured.
        hints: What ``onnxquant preprocess`` would improve in this model (empty when it was
            pre-processed or nothing suggests it).
        cost_model: The cost model's estimate (objective, whether costs were measured, the
            measured nodes' float and planned time); see :mod:`onnxquant.core.objective`.
    """

    decisions: list[Decision]
    runtime_notes: list[str]
    output_files: list[Path]
    float_bytes: int
    quantized_bytes: int
    seconds: float
    format: QuantFormat
    fidelity: Fidelity | None = None
    hints: list[str] = dataclasses.field(default_factory=list)
    cost_model: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def quantized(self) -> list[Decision]:
        """Decisions of the nodes that were quantized."""
        return [d for d in self.decisions if d.action == "quantized"]

    def counts(self) -> dict[str, tuple[int, int]]:
        """Op type -> (quantized nodes, candidate nodes)."""
        totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for d in self.decisions:
            totals[d.op_type][1] += 1
            totals[d.op_type][0] += d.action == "quantized"
        return {op: (q, n) for op, (q, n) in totals.items()}

    def warnings(self) -> list[str]:
        """What the user must know: nothing was quantized, or the accuracy dropped."""
        found = [] if self.quantized else [NOTHING_QUANTIZED]
        low = self.fidelity.warning(SUGGESTIONS) if self.fidelity is not None else None
        return [*found, low] if low else found

    def summary(self, advice: Sequence[str] = (), latency: Latency | None = None) -> str:
        """The plain-text summary ``onnxquant dynamic`` prints (see
        :func:`format_dynamic_summary`)."""
        return format_dynamic_summary(self, advice, latency)


def _table(result: DynamicQuantizationResult) -> list[str]:
    counts = result.counts()
    if not counts:
        return []
    width = max(len("op type"), *(len(op) for op in counts))
    lines = [f"  {'op type':<{width}}  quantized  float"]
    for op, (done, total) in sorted(counts.items(), key=lambda kv: (-kv[1][1], kv[0])):
        lines.append(f"  {op:<{width}}  {done:>9}  {total - done:>5}")
    return lines


def format_dynamic_summary(result: DynamicQuantizationResult, advice: Sequence[str] = (),
                           latency: Latency | None = None) -> str:
    """Describe a dynamic quantization run in plain text (no trailing newline): nodes per op
    type, float nodes by reason, the forms chosen for this onnxruntime, the accuracy, sizes,
    time, speed, warnings and the files written."""
    done = len(result.quantized)
    lines = [f"quantized {done} of {len(result.decisions)} candidate nodes dynamically "
             f"({result.format.value})", *_table(result), ""]
    floats = [(d.name, d.reason) for d in result.decisions if d.action != "quantized"]
    if floats:
        lines += [f"float nodes:  {len(floats)}, by reason:", *reason_lines(floats, _MAX_REASONS)]
    if result.runtime_notes:
        lines.append("forms chosen for this onnxruntime:")
        lines += [f"  - {note}" for note in result.runtime_notes]
    lines += accuracy_lines(result.fidelity)
    lines.append(size_line(result.float_bytes, result.quantized_bytes))
    info = result.cost_model
    if info and (info.get("measured", True) or info.get("objective") != "balanced"):
        lines.append(estimate_line(info))
    guard = (info or {}).get("latency_guard")
    if guard:
        lines.append(guard_summary(guard))
    lines.append(f"time:         {result.seconds:.2f} s")
    lines += [f"pre-process:  {hint}" for hint in result.hints]
    lines += speed_lines([*result.warnings(), *advice], latency)
    lines += files_lines(result.output_files)
    return "\n".join(lines)


def guard_summary(guard: dict[str, Any]) -> str:
    """The ``latency:`` line of the dynamic latency guard."""
    if "skipped" in guard and "first_ratio" not in guard:
        return f"latency:      not timed ({guard['skipped']})"
    line = f"latency:      whole model measured {guard['first_ratio']:.2f}x float"
    if guard.get("rounds"):
        line += (f"; rewritten in {guard['rounds']} round(s) keeping slow layers float -> "
                 f"{guard['last_ratio']:.2f}x float")
    return line

