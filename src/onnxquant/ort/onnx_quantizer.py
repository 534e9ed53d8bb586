"""onnxruntime's ``ONNXQuantizer``: QOperator quantization, static (``QLinearOps`` with activation
ranges the caller computed) or dynamic (``IntegerOps``), backed by onnxquant's quantizers.

``ONNXQuantizer(model, per_channel, reduce_range, mode, static, weight_qType, activation_qType,
tensors_range, nodes_to_quantize, nodes_to_exclude, op_types_to_quantize, extra_options)``, then
``quantize_model()`` (returns the quantized ``ModelProto``; ``quantizer.model`` is an
:class:`~onnxquant.ort.onnx_model.ONNXModel`).

* ``mode=QLinearOps`` with ``static=True``: onnxquant's QOperator emitter with the given ranges
  (options as in :func:`onnxquant.ort.quantize_static`).
* ``mode=IntegerOps`` (or ``static=False``): :func:`onnxquant.ort.quantize_dynamic` (options as
  there; activations are always uint8).

As in onnxruntime, the element types of the activations to quantize come from ONNX shape
inference: when a quantized node reads a tensor whose type ONNX cannot infer (it comes from a
contrib operator, for instance), ``quantize_model`` raises ``RuntimeError`` unless
``extra_options["DefaultTensorType"]`` gives the type to assume.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import onnx

from onnxquant.dynamic._rewrite import DEFAULT_OP_TYPES
from onnxquant.ort._dynamic import quantize_dynamic
from onnxquant.ort._options import _enum, _to_native_config
from onnxquant.ort._ranges_quantize import (
    RangesQuantizer,
    quantize_with_ranges,
    ranges_from_tensors_range,
)
from onnxquant.ort.quant_utils import QuantFormat, QuantizationMode
from onnxquant.static.config import StaticQuantConfig as NativeStaticQuantConfig

__all__ = ["ONNXQuantizer"]

_NOT_ACTIVATION_FIRST = frozenset({"Gather", "EmbedLayerNormalization"})


def _typed_names(model: onnx.ModelProto) -> set[str]:
    """Tensors of the main graph whose element type ONNX shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    names = {t.name for t in graph.initializer}
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            names.add(info.name)
    return names


class ONNXQuantizer(RangesQuantizer):
    """QOperator quantization (static with given ranges, or dynamic), with onnxruntime's
    constructor.

    Args:
        model: The float ``onnx.ModelProto`` (not modified).
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights.
        mode: ``QuantizationMode.QLinearOps`` (static) or ``QuantizationMode.IntegerOps``
            (dynamic).
        static: Whether activation ranges are given (``QLinearOps`` needs it).
        weight_qType: ``QuantType`` of the weights.
        activation_qType: ``QuantType`` of the activations (dynamic: uint8 always).
        tensors_range: ``TensorsData`` or ``{tensor name: TensorData or (low, high)}``.
        nodes_to_quantize: Node names to quantize; empty means all.
        nodes_to_exclude: Node names to keep float.
        op_types_to_quantize: Op types to quantize; empty means all.
        extra_options: onnxruntime's option keys.
    """

    def __init__(self, model: onnx.ModelProto, per_channel: bool, reduce_range: bool,
                 mode: Any, static: bool, weight_qType: Any,  # noqa: N803 - onnxruntime's
                 activation_qType: Any, tensors_range: Mapping[str, Any] | None,  # noqa: N803
                 nodes_to_quantize: Collection[str] | None,
                 nodes_to_exclude: Collection[str] | None,
                 op_types_to_quantize: Collection[str] | None,
                 extra_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(model, per_channel, reduce_range, weight_qType, activation_qType,
                         tensors_range, nodes_to_quantize, nodes_to_exclude,
                         op_types_to_quantize, extra_options)
        self.mode = _enum(mode, QuantizationMode, "mode")
        self.static = bool(static)
        self.config: NativeStaticQuantConfig | None = None
        if self.mode is QuantizationMode.QLinearOps and self.static:
            self.config = _to_native_config(
                quant_format=QuantFormat.QOperator, op_types_to_quantize=self.op_types_to_quantize,
                per_channel=per_channel, reduce_range=reduce_range,
                activation_type=activation_qType, weight_type=weight_qType,
                nodes_to_quantize=self.nodes_to_quantize, nodes_to_exclude=self.nodes_to_exclude,
                extra_options=self.extra_options)

    def quantize_model(self) -> onnx.ModelProto:
        """Quantize; ``self.model`` then holds the quantized model, which is also returned.

        Raises:
            RuntimeError: A tensor to quantize has no inferable type and no
                ``DefaultTensorType`` was given.
        """
        if self.config is not None:
            ranges = ranges_from_tensors_range(self.tensors_range)
            return self._set_model(quantize_with_ranges(self.model.model, ranges, self.config))
        self._check_types()
        return self._set_model(self._dynamic())

    def _check_types(self) -> None:
        if self.extra_options.get("DefaultTensorType") is not None:
            return
        typed = _typed_names(self.model.model)
        op_types = set(self.op_types_to_quantize or DEFAULT_OP_TYPES)
        for node in self.model.nodes():
            if (node.op_type not in op_types or node.op_type in _NOT_ACTIVATION_FIRST
                    or node.name in self.nodes_to_exclude or not node.input
                    or (self.nodes_to_quantize and node.name not in self.nodes_to_quantize)):
                continue
            if node.input[0] and node.input[0] not in typed:
                raise RuntimeError(
                    f"Unable to find data type for weight_name={node.input[0]!r} (input of node "
                    f"{node.name!r}): ONNX shape inference gives it no type, probably because a "
                    "contrib operator produces it; set extra_options['DefaultTensorType'] to the "
                    "type to assume, usually onnx.TensorProto.FLOAT")

    def _dynamic(self) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory(prefix="onnxquant-") as folder:
            output = Path(folder) / "dynamic.onnx"
            quantize_dynamic(
                self.model.model, output, op_types_to_quantize=self.op_types_to_quantize,
                per_channel=self.per_channel, reduce_range=self.reduce_range,
                weight_type=self.weight_qType, nodes_to_quantize=self.nodes_to_quantize,
                nodes_to_exclude=self.nodes_to_exclude, extra_options=self.extra_options)
            return onnx.load(str(output))
