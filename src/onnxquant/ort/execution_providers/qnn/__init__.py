"""onnxruntime's ``quantization.execution_providers.qnn``: quantize for the QNN execution provider.

* :func:`qnn_preprocess_model`: fusions and layout changes before quantization;
* :func:`get_qnn_qdq_config`: a :class:`~onnxquant.ort.StaticQuantConfig` with QNN's rules as
  ``TensorQuantOverrides``, for :func:`onnxquant.ort.quantize`.
"""

from __future__ import annotations

from onnxquant.ort.execution_providers.qnn.preprocess import qnn_preprocess_model
from onnxquant.ort.execution_providers.qnn.quant_config import get_qnn_qdq_config

__all__ = ["get_qnn_qdq_config", "qnn_preprocess_model"]
