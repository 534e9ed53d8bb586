"""onnxruntime's ``quantize_dynamic``, backed by :func:`onnxquant.quantize_dynamic` (its config
class, ``DynamicQuantConfig``, is in :mod:`onnxquant.ort.quantize` next to ``QuantConfig``).

Every argument becomes a field of one :class:`onnxquant.DynamicQuantConfig` in
:func:`_to_native_dynamic_config`. ``extra_options``:

* **Mapped:** ``WeightSymmetric`` → ``weight_symmetric``, ``MatMulConstBOnly`` →
  ``matmul_const_b_only`` (default True, as in onnxruntime), ``EnableSubgraph`` → ``subgraphs``
  (If/Loop/Scan bodies are quantized only when it is ``True``, as in onnxruntime), and
  onnxquant's own ``Objective`` (default ``"size"``: every selected node is quantized, as
  onnxruntime does; ``"balanced"`` / ``"speed"`` keep float the Convs whose ConvInteger is
  measured slower than float).
* **Accepted, no effect:** keys of static quantization and calibration (dynamic quantization
  computes activation ranges at run time), ``ForceQuantizeNoInputCheck`` and
  ``DefaultTensorType``.
* **Unknown keys** log a WARNING with the closest known key and are ignored.

Differences from onnxruntime, on purpose: the output is checked against what onnxruntime's CPU
provider can execute (a Conv whose weights ConvInteger cannot take is given a form that runs
instead of a model that fails to load), the result object is returned, and nothing is written on
failure.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from onnxquant.core.model_io import ModelInput
from onnxquant.dynamic.config import DynamicQuantConfig as NativeDynamicQuantConfig
from onnxquant.ort._errors import InvalidOptionError
from onnxquant.ort._options import _bool, _enum, _names, _objective, _optional_bool
from onnxquant.ort.quant_utils import QuantType

if TYPE_CHECKING:
    from onnxquant.dynamic.api import DynamicQuantizationResult

__all__ = ["quantize_dynamic"]

logger = logging.getLogger(__name__)

_MAPPED = {
    "WeightSymmetric": ("weight_symmetric", _optional_bool),
    "MatMulConstBOnly": ("matmul_const_b_only", _bool),
    "EnableSubgraph": ("subgraphs", _bool),
    "Objective": ("objective", _objective),
}
_NO_EFFECT = (
    "ActivationSymmetric", "ActivationRestrictedAsymmetric", "ForceQuantizeNoInputCheck",
    "DefaultTensorType", "QuantizeBias", "MinimumRealRange", "AddQDQPairToWeight",
    "DedicatedQDQPair", "OpTypesToExcludeOutputQuantization", "QDQOpTypePerChannelSupportToAxis",
    "QDQKeepRemovableActivations", "QDQDisableWeightAdjustForInt32Bias", "UseQDQContribOps",
    "CalibTensorRangeSymmetric", "CalibMovingAverage", "CalibMovingAverageConstant",
    "CalibMaxIntermediateOutputs", "CalibPercentile", "CalibStridedMinMax", "extra.Sigmoid.nnapi",
    "TensorQuantOverrides", "BlockSize", "SmoothQuant", "SmoothQuantAlpha", "SmoothQuantFolding",
)


def _to_native_dynamic_config(
    *,
    op_types_to_quantize: Collection[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: Any = QuantType.QInt8,
    nodes_to_quantize: Collection[str] | None = None,
    nodes_to_exclude: Collection[str] | None = None,
    use_external_data_format: bool = False,
    extra_options: Mapping[str, Any] | None = None,
) -> NativeDynamicQuantConfig:
    """Translates onnxruntime's ``quantize_dynamic`` options into one native config.

    Raises:
        InvalidOptionError: A value is invalid (e.g. a weight type other than QInt8/QUInt8).
    """
    wgt = _enum(weight_type, QuantType, "weight_type")
    if wgt not in (QuantType.QInt8, QuantType.QUInt8):
        raise InvalidOptionError(
            f"weight_type={wgt} is not supported by dynamic quantization (its integer operators "
            "take 8-bit weights); use QuantType.QInt8 or QuantType.QUInt8."
        )
    fields: dict[str, Any] = {}
    for key, value in (extra_options or {}).items():
        if key in _MAPPED:
            field, parse = _MAPPED[key]
            fields[field] = parse(key, value)
        elif key in _NO_EFFECT:
            logger.info("extra_options[%r] has no effect on dynamic quantization.", key)
        else:
            close = difflib.get_close_matches(str(key), (*_MAPPED, *_NO_EFFECT), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            logger.warning("Unknown extra_options key %r is ignored.%s", key, hint)
    return NativeDynamicQuantConfig(
        weight_type=wgt.qtype,
        per_channel=bool(per_channel),
        reduce_range=bool(reduce_range),
        op_types=_names(op_types_to_quantize, "op_types_to_quantize"),
        nodes_to_quantize=_names(nodes_to_quantize, "nodes_to_quantize"),
        nodes_to_exclude=_names(nodes_to_exclude, "nodes_to_exclude") or frozenset(),
        external_data=True if use_external_data_format else None,
        evaluate=False,  # onnxruntime measures nothing
        **{"objective": "size", **fields},  # quantize what onnxruntime would (Objective)
    )


def quantize_dynamic(
    model_input: ModelInput,
    model_output: str | os.PathLike,
    op_types_to_quantize: Collection[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: QuantType = QuantType.QInt8,
    nodes_to_quantize: Collection[str] | None = None,
    nodes_to_exclude: Collection[str] | None = None,
    use_external_data_format: bool = False,
    extra_options: Mapping[str, Any] | None = None,
) -> DynamicQuantizationResult:
    """Quantize a float model dynamically (QOperator form), with onnxruntime's signature.

    Args:
        model_input: Path or ``onnx.ModelProto`` (never modified).
        model_output: Where to write the quantized model (not the input path).
        op_types_to_quantize: Op types to quantize; ``None`` or empty means all that dynamic
            quantization handles (MatMul, Gemm, Conv, Gather, LSTM, Attention,
            EmbedLayerNormalization).
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights (for CPUs without VNNI).
        weight_type: ``QuantType.QInt8`` or ``QuantType.QUInt8``.
        nodes_to_quantize: Node names to quantize; ``None`` or empty means all.
        nodes_to_exclude: Node names to keep float.
        use_external_data_format: True: save tensors in ``<output>.data``; False: by size.
        extra_options: onnxruntime's option keys (see the module docstring).

    Returns:
        The :class:`onnxquant.dynamic.api.DynamicQuantizationResult` of the run.
    """
    from onnxquant.dynamic.api import quantize_dynamic as native_quantize_dynamic

    config = _to_native_dynamic_config(
        op_types_to_quantize=op_types_to_quantize, per_channel=per_channel,
        reduce_range=reduce_range, weight_type=weight_type, nodes_to_quantize=nodes_to_quantize,
        nodes_to_exclude=nodes_to_exclude, use_external_data_format=use_external_data_format,
        extra_options=extra_options)
    return native_quantize_dynamic(model_input, model_output, config)
