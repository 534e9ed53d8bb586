"""Emitters turn a QuantPlan into a quantized graph; each format has its own small module."""

from onnxquant.emitters.qdq import emit_qdq
from onnxquant.emitters.qoperator import emit_qoperator

__all__ = ["emit_qdq", "emit_qoperator"]
