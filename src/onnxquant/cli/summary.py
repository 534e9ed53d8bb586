"""Plain-text summary of a quantization run, printed at the end of every CLI command.

:func:`format_summary` shows what happened per op type (quantized / weight-only / removed /
left float), why nodes were left float, the size before and after, the calibration samples
and the wall time.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from onnxquant.core.plan import NodeDecision
from onnxquant.core.speed import Latency
from onnxquant.static.api import QuantizationResult

__all__ = ["format_summary", "format_size", "speed_lines", "size_line", "files_lines"]

# Column title of each known NodeDecision action, in table order. "weights" (weight-only) and
# any action this module does not know get a column only when some node has them.
_TITLES = {"quantize": "quantized", "weights": "weight-only", "remove": "removed",
           "float": "float"}
_ALWAYS = ("quantize", "remove", "float")
_MAX_REASONS = 5
_MAX_EXAMPLES = 3
_QUOTED = re.compile(r"'[^']*'")


def format_size(num_bytes: int) -> str:
    """A byte count in decimal units with two decimals: ``"512 B"``, ``"789.50 KB"``,
    ``"12.30 MB"``, ``"1.50 GB"``."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    for unit, factor in (("KB", 1e3), ("MB", 1e6)):
        if num_bytes < factor * 1000:
            return f"{num_bytes / factor:.2f} {unit}"
    return f"{num_bytes / 1e9:.2f} GB"


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


def _float_reasons(floats: list[NodeDecision]) -> list[str]:
    """Float nodes grouped by reason (quoted names generalised), most common first."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for decision in floats:
        key = _QUOTED.sub("'...'", decision.reason) if decision.reason else "(no reason given)"
        groups[key].append(decision.name or "<unnamed>")
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    width = len(str(len(ordered[0][1]))) if ordered else 1
    lines = []
    for reason, names in ordered[:_MAX_REASONS]:
        examples = ", ".join(names[:_MAX_EXAMPLES])
        if len(names) > _MAX_EXAMPLES:
            examples += ", ..."
        lines.append(f"  {len(names):>{width}}  {reason} [{examples}]")
    if len(ordered) > _MAX_REASONS:
        rest = sum(len(names) for _, names in ordered[_MAX_REASONS:])
        lines.append(f"  {rest:>{width}}  other reasons ({len(ordered) - _MAX_REASONS} more)")
    return lines


def size_line(before: int, after: int) -> str:
    """``size:  12.30 MB -> 3.10 MB (3.97x smaller)`` (or ``larger``)."""
    text = f"size:         {format_size(before)} -> {format_size(after)}"
    if before > 0 and after > 0:
        ratio = before / after
        text += f" ({ratio:.2f}x smaller)" if ratio >= 1 else f" ({1 / ratio:.2f}x larger)"
    return text


def files_lines(paths: Sequence[Path]) -> list[str]:
    """``written:`` followed by the files, one per line."""
    return [f"{'written:' if index == 0 else '':<14}{path}" for index, path in enumerate(paths)]


def speed_lines(advice: Sequence[str] = (), latency: Latency | None = None) -> list[str]:
    """The "speed" part of a summary: a measured latency and warnings about slow choices."""
    lines = []
    if latency is not None:
        lines.append(f"speed:        {latency.describe()}")
    for index, text in enumerate(advice):
        lines.append(f"{'warning:' if index == 0 else '':<14}{text}")
    return lines


def format_summary(result: QuantizationResult, advice: Sequence[str] = (),
                   latency: Latency | None = None) -> str:
    """Describe a quantization run in a few lines of plain text (no trailing newline).

    The text has: a headline with node counts, a table of nodes per op type (quantized,
    weight-only when there are any, removed = Relu/Clip folded into the producer's range,
    float), the number of float nodes
    grouped by their most common reasons, size before -> after with the ratio, the number of
    calibration samples, tensors calibration never saw, the wall time and the files written.

    Args:
        result: What :func:`onnxquant.quantize_static` returned.
        advice: Warnings about format/type choices known to be slow here
            (:func:`onnxquant.core.speed.format_advice`).
        latency: A measured float vs quantized latency, if one was taken.
    """
    counts = result.plan.counts_by_op_type()
    totals: collections.Counter = collections.Counter()
    for counter in counts.values():
        totals.update(counter)
    floats = [d for d in result.plan.nodes.values() if d.action == "float"]
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
        lines += _float_reasons(floats)
    else:
        lines.append("float nodes:  0")
    lines.append(size_line(result.float_bytes, result.quantized_bytes))
    lines.append(f"calibration:  {result.calibration_samples} "
                 f"sample{'s' if result.calibration_samples != 1 else ''}")
    if result.unobserved:
        names = ", ".join(result.unobserved[:_MAX_EXAMPLES])
        more = ", ..." if len(result.unobserved) > _MAX_EXAMPLES else ""
        lines.append(f"unobserved:   {len(result.unobserved)} tensors never computed by the "
                     f"calibration data stay float ({names}{more})")
    lines.append(f"time:         {result.seconds:.2f} s")
    lines += speed_lines(advice, latency)
    lines += files_lines(result.output_files)
    return "\n".join(lines)
