"""Quantize to a stated accuracy: :class:`AccuracyTarget` and the search behind
``quantize_static(..., target=...)`` (:mod:`onnxquant.target.search`)."""

from onnxquant.target.result import Step, TargetResult
from onnxquant.target.scoring import score
from onnxquant.target.search import quantize_to_target
from onnxquant.target.spec import AccuracyTarget

__all__ = ["AccuracyTarget", "TargetResult", "Step", "quantize_to_target", "score"]
