"""Pieces of the plain-text summaries that every mode prints (static, dynamic, weight-only):
sizes, written files, speed lines, and float nodes grouped by reason.

Reasons that differ only in the tensor or node names they quote (``input 'a' is float`` and
``input 'b' is float``) form one group; the group shows the first member's reason with its
names (shortened when long) and how many similar ones there are.
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from onnxquant.core.speed import Latency

__all__ = ["format_size", "size_line", "files_lines", "speed_lines", "reason_groups",
           "reason_lines", "shorten", "MAX_EXAMPLES"]

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 3
"""Node names listed after each reason."""

_QUOTED = re.compile(r"'([^']*)'")
_MAX_NAME = 40


def format_size(num_bytes: int) -> str:
    """A byte count in decimal units with two decimals: ``"512 B"``, ``"789.50 KB"``,
    ``"12.30 MB"``, ``"1.50 GB"``."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    for unit, factor in (("KB", 1e3), ("MB", 1e6)):
        if num_bytes < factor * 1000:
            return f"{num_bytes / factor:.2f} {unit}"
    return f"{num_bytes / 1e9:.2f} GB"


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


def shorten(name: str, limit: int = _MAX_NAME) -> str:
    """``name`` cut in the middle to at most ``limit`` characters (``/encoder/…/MatMul``)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[len(name) - (limit - 1 - head):]}"


def _short_quotes(reason: str) -> str:
    return _QUOTED.sub(lambda m: f"'{shorten(m.group(1))}'", reason)


def reason_groups(items: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Group ``(node name, reason)`` pairs by reason, quoted names aside.

    Returns:
        ``(shown reason, node names)`` per group, largest group first: the shown reason is
        the first member's (long quoted names shortened), followed by ``(and N similar)``
        when other members quote other names.
    """
    groups: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for name, reason in items:
        reason = reason or "(no reason given)"
        groups[_QUOTED.sub("''", reason)].append((name or "<unnamed>", reason))
    ordered = sorted(groups.values(), key=lambda members: -len(members))
    result = []
    for members in ordered:
        first = members[0][1]
        similar = sum(reason != first for _, reason in members)
        shown = _short_quotes(first) + (f" (and {similar} similar)" if similar else "")
        result.append((shown, [name for name, _ in members]))
    return result


def reason_lines(items: Iterable[tuple[str, str]], max_reasons: int,
                 prefix: str = "") -> list[str]:
    """One line per reason group (see :func:`reason_groups`): count, reason, example nodes;
    groups beyond ``max_reasons`` are summed on one last line."""
    ordered = reason_groups(items)
    width = len(str(len(ordered[0][1]))) if ordered else 1
    lines = []
    for reason, names in ordered[:max_reasons]:
        examples = ", ".join(shorten(n) for n in names[:MAX_EXAMPLES])
        if len(names) > MAX_EXAMPLES:
            examples += ", ..."
        lines.append(f"  {prefix}{len(names):>{width}}  {reason} [{examples}]")
    if len(ordered) > max_reasons:
        rest = sum(len(names) for _, names in ordered[max_reasons:])
        lines.append(f"  {prefix}{rest:>{width}}  other reasons "
                     f"({len(ordered) - max_reasons} more)")
    return lines
