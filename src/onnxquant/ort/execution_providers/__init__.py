"""onnxruntime's ``quantization.execution_providers``: helpers for one execution provider each
(:mod:`onnxquant.ort.execution_providers.qnn` for Qualcomm's QNN)."""

from __future__ import annotations

__all__: list[str] = []
