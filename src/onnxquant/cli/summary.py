"""Plain-text summary of a quantization run, printed at the end of every CLI command.

:func:`format_summary` (from :mod:`onnxquant.static.result`, so that
:meth:`onnxquant.QuantizationResult.summary` gives the same text without the command line)
shows what happened per op type (quantized / weight-only / removed / left float), why nodes
were left float, the accuracy (float vs quantized outputs), the size before and after, the
calibration samples and the wall time. The smaller pieces come from
:mod:`onnxquant.core.summary_text`.
"""

from __future__ import annotations

from onnxquant.core.summary_text import files_lines, format_size, size_line, speed_lines
from onnxquant.static.result import format_summary

__all__ = ["format_summary", "format_size", "speed_lines", "size_line", "files_lines"]
