"""Where accuracy goes: a quantized model matched to its float model by graph structure
(:mod:`~onnxquant.debug.matching`), compared layer by layer on data
(:func:`~onnxquant.debug.compare.compare`), and reported as JSON, text and HTML
(:class:`~onnxquant.debug.report.ComparisonReport`)."""

from onnxquant.debug.compare import compare
from onnxquant.debug.matching import Matching, match_models
from onnxquant.debug.report import (
    ActivationStats,
    ComparisonReport,
    Histogram,
    LayerStats,
    OutputStats,
)

__all__ = ["compare", "match_models", "Matching", "ComparisonReport", "OutputStats",
           "LayerStats", "ActivationStats", "Histogram"]
