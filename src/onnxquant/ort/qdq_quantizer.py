"""onnxruntime's ``QDQQuantizer``: static QDQ quantization of a model with activation ranges the
caller computed (``tensors_range``), backed by onnxquant's planner and QDQ emitter.

``QDQQuantizer(model, per_channel, reduce_range, weight_qType, activation_qType, tensors_range,
nodes_to_quantize, nodes_to_exclude, op_types_to_quantize, extra_options)``, then
``quantize_model()``; ``quantizer.model`` is an :class:`~onnxquant.ort.onnx_model.ONNXModel`
(``quantizer.model.save_model_to_file(path, use_external_data_format)``).

The options are translated exactly as for :func:`onnxquant.ort.quantize_static`
(:func:`onnxquant.ort._options._to_native_config`), so the same ``extra_options`` keys work.
The input model is never modified; ``quantize_model`` returns a new ``ModelProto``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import onnx

from onnxquant.ort._options import _to_native_config
from onnxquant.ort._ranges_quantize import (
    RangesQuantizer,
    quantize_with_ranges,
    ranges_from_tensors_range,
)
from onnxquant.ort.quant_utils import QuantFormat

__all__ = ["QDQQuantizer"]


class QDQQuantizer(RangesQuantizer):
    """Static QDQ quantization with given ranges, with onnxruntime's constructor.

    Args:
        model: The float ``onnx.ModelProto`` (not modified).
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights.
        weight_qType: ``QuantType`` of the weights.
        activation_qType: ``QuantType`` of the activations.
        tensors_range: ``TensorsData`` or ``{tensor name: TensorData or (low, high)}``;
            nodes whose activations have no range stay float.
        nodes_to_quantize: Node names to quantize; empty means all.
        nodes_to_exclude: Node names to keep float.
        op_types_to_quantize: Op types to quantize; empty means all.
        extra_options: onnxruntime's option keys (see :mod:`onnxquant.ort._options`).

    Raises:
        onnxquant.core.errors.QuantizationError: Invalid or unsupported options (checked here,
            before any work).
    """

    def __init__(self, model: onnx.ModelProto, per_channel: bool, reduce_range: bool,
                 weight_qType: Any, activation_qType: Any,  # noqa: N803 - onnxruntime's names
                 tensors_range: Mapping[str, Any] | None,
                 nodes_to_quantize: Collection[str] | None,
                 nodes_to_exclude: Collection[str] | None,
                 op_types_to_quantize: Collection[str] | None,
                 extra_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(model, per_channel, reduce_range, weight_qType, activation_qType,
                         tensors_range, nodes_to_quantize, nodes_to_exclude,
                         op_types_to_quantize, extra_options)
        self.config = _to_native_config(
            quant_format=QuantFormat.QDQ, op_types_to_quantize=self.op_types_to_quantize,
            per_channel=per_channel, reduce_range=reduce_range, activation_type=activation_qType,
            weight_type=weight_qType, nodes_to_quantize=self.nodes_to_quantize,
            nodes_to_exclude=self.nodes_to_exclude, extra_options=self.extra_options)

    def quantize_model(self) -> onnx.ModelProto:
        """Quantize; ``self.model`` then holds the quantized model, which is also returned."""
        ranges = ranges_from_tensors_range(self.tensors_range)
        return self._set_model(quantize_with_ranges(self.model.model, ranges, self.config))
