"""Emitters turn a QuantPlan into a quantized graph; each format has its own small module."""

from onnxquant.emitters.qdq import emit_qdq

__all__ = ["emit_qdq"]
