"""What a weight-only run did (:class:`WeightOnlyResult`), and its plain-text summary
(:func:`format_weights_summary`, printed by ``onnxquant weights`` and returned by
:meth:`WeightOnlyResult.summary`)."""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

from onnxquant.calibration.fidelity import Fidelity, accuracy_lines
from onnxquant.core.summary_text import (
    MAX_EXAMPLES,
    files_lines,
    reason_groups,
    shorten,
    size_line,
    speed_lines,
)
from onnxquant.weight_only._select import WeightDecision

__all__ = ["WeightOnlyResult", "format_weights_summary", "SUGGESTIONS"]

logger = logging.getLogger(__name__)

_MAX_REASONS = 5

SUGGESTIONS = ("--block-size 32", "--bits 8", "--algorithm gptq --calib DIR")
"""What the low-accuracy warning suggests trying (options of ``onnxquant weights``)."""
NO_CANDIDATES = ("nothing was quantized: no selected MatMul has a constant 2-D weight (B), "
                 "and Gather tables are quantized only with --op-types MatMul,Gather (see "
                 "also --nodes/--exclude); the written model is float")
NOTHING_QUANTIZED = ("nothing was quantized: every candidate node stays float (see the reasons "
                     "above); the written model is float")


@dataclasses.dataclass
class WeightOnlyResult:
    """What a weight-only run did.

    Attributes:
        decisions: One per candidate node, in graph order.
        output_files: Paths written (model, then external data if any).
        float_bytes: Size of the input model (file plus external data; tensors when in memory).
        quantized_bytes: Size of the written files.
        calibration_samples: Feeds used by GPTQ (0 otherwise).
        seconds: Wall time of the whole run.
        fidelity: How close the quantized outputs stay to the float ones, and on which
            samples; None when not measured.
    """

    decisions: list[WeightDecision]
    output_files: list[Path]
    float_bytes: int
    quantized_bytes: int
    calibration_samples: int
    seconds: float
    fidelity: Fidelity | None = None

    @property
    def quantized(self) -> list[WeightDecision]:
        """Decisions of the nodes whose weights were quantized."""
        return [d for d in self.decisions if d.action == "weights"]

    def warnings(self) -> list[str]:
        """What the user must know: nothing was quantized, or the accuracy dropped."""
        found = []
        if not self.quantized:
            found.append(NOTHING_QUANTIZED if self.decisions else NO_CANDIDATES)
        low = self.fidelity.warning(SUGGESTIONS) if self.fidelity is not None else None
        return [*found, low] if low else found

    def summary(self) -> str:
        """The plain-text summary ``onnxquant weights`` prints (see
        :func:`format_weights_summary`)."""
        return format_weights_summary(self)


def _float_lines(result: WeightOnlyResult) -> list[str]:
    items = [(d.name, d.reason) for d in result.decisions if d.action != "weights"]
    ordered = reason_groups(items)
    lines = []
    for reason, names in ordered[:_MAX_REASONS]:
        more = ", ..." if len(names) > MAX_EXAMPLES else ""
        shown = ", ".join(shorten(n) for n in names[:MAX_EXAMPLES])
        lines.append(f"  float {len(names)}: {reason} [{shown}{more}]")
    if len(ordered) > _MAX_REASONS:
        rest = sum(len(names) for _, names in ordered[_MAX_REASONS:])
        lines.append(f"  float {rest}: other reasons ({len(ordered) - _MAX_REASONS} more)")
    return lines


def format_weights_summary(result: WeightOnlyResult) -> str:
    """A few lines: nodes per emitted op, float nodes by reason, the accuracy, sizes, time,
    warnings, files."""
    done = result.quantized
    by_op = collections.Counter(d.emitted for d in done)
    ops = ", ".join(f"{op} {count}" for op, count in sorted(by_op.items()))
    lines = [f"quantized {len(done)} of {len(result.decisions)} candidate nodes"
             + (f" ({ops})" if ops else "")]
    settings = collections.Counter(
        (d.bits, d.block_size, "sym" if d.symmetric else "asym", d.algorithm) for d in done)
    for (bits, block, sym, algo), count in sorted(settings.items()):
        lines.append(f"  {count:>4} x {bits}-bit, block {block}, {sym}, {algo}")
    lines += _float_lines(result)
    lines += accuracy_lines(result.fidelity)
    lines.append(size_line(result.float_bytes, result.quantized_bytes))
    if result.calibration_samples:
        lines.append(f"calibration:  {result.calibration_samples} samples")
    lines.append(f"time:         {result.seconds:.2f} s")
    lines += speed_lines(result.warnings())
    lines += files_lines(result.output_files)
    return "\n".join(lines)
