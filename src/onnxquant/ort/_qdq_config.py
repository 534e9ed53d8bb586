"""onnxruntime's ``get_qdq_config``: a :class:`~onnxquant.ort.quantize.StaticQuantConfig` for QDQ
quantization of one model, with the keyword arguments turned into ``extra_options``.

What it decides from the model (read without its external data):

* ``op_types_to_quantize`` (when not given): every op type of the main graph's nodes that are not
  excluded, except ``Cast``, ``QuantizeLinear`` and ``DequantizeLinear``;
* ``nodes_to_exclude`` may be a callable ``(model, node) -> bool``; it is evaluated on every main
  graph node (whose op type is to be quantized) and becomes a list of names;
* ``use_external_data_format``: the model has external data or is at least 2 GiB;
* ``UseQDQContribOps=True`` when the model's opset is below 21 and a 4-bit type is used without
  any 16-bit type (a 16-bit type makes quantization convert the model to opset 21, where the
  standard Q/DQ operators take every type).

``ForceQuantizeNoInputCheck`` is always ``True``; the caller's ``extra_options`` override every
key set here.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import onnx

from onnxquant.ort._quant_utils_extra import get_opset_version, model_has_external_data
from onnxquant.ort.calibrate import CalibrationDataReader, CalibrationMethod
from onnxquant.ort.quant_utils import MODEL_SIZE_THRESHOLD, QuantFormat, QuantType
from onnxquant.ort.quantize import StaticQuantConfig
from onnxquant.ort.tensor_quant_overrides import TensorQuantOverridesHelper

__all__ = ["get_qdq_config"]

_NEVER_QUANTIZED = frozenset({"Cast", "DequantizeLinear", "QuantizeLinear"})
_CALIB_KEYS = {
    "symmetric": "CalibTensorRangeSymmetric",
    "moving_average": "CalibMovingAverage",
    "averaging_constant": "CalibMovingAverageConstant",
    "max_intermediate_outputs": "CalibMaxIntermediateOutputs",
    "percentile": "CalibPercentile",
}
_SIXTEEN_BIT = frozenset({"QInt16", "QUInt16"})
_FOUR_BIT = frozenset({"QInt4", "QUInt4"})

NodeFilter = Callable[[onnx.ModelProto, onnx.NodeProto], bool]


def _load(model_input: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model_input, onnx.ModelProto):
        return model_input
    return onnx.load(os.fspath(model_input), load_external_data=False)


def _split_nodes(model: onnx.ModelProto, op_types: Collection[str] | None,
                 exclude: Collection[str] | NodeFilter | None) -> tuple[list[str], set[str]]:
    """The names of the excluded nodes and the op types of the others."""
    excluded = [] if exclude is None or callable(exclude) else list(exclude)
    named = set(excluded)
    present: set[str] = set()
    for node in model.graph.node:
        if op_types and node.op_type not in op_types:
            continue
        if node.name in named:
            continue
        if callable(exclude) and exclude(model, node):
            excluded.append(node.name)
        else:
            present.add(node.op_type)
    return excluded, present


def _type_names(types: Collection[Any]) -> set[str]:
    return {str(getattr(t, "name", t)) for t in types}


def _needs_contrib_ops(model: onnx.ModelProto, types: set[str]) -> bool:
    """4-bit Q/DQ below opset 21 without a 16-bit type (which converts the model to 21)."""
    return get_opset_version(model) < 21 and bool(types & _FOUR_BIT) and not types & _SIXTEEN_BIT


def _calib_options(calibrate_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``Calib*`` extra options of the calibration arguments given."""
    options = {}
    for name, key in _CALIB_KEYS.items():
        if calibrate_args and name in calibrate_args:
            options[key] = calibrate_args[name]
    return options


def get_qdq_config(
    model_input: str | os.PathLike | onnx.ModelProto,
    calibration_data_reader: CalibrationDataReader,
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
    calibrate_args: Mapping[str, Any] | None = None,
    activation_type: QuantType = QuantType.QUInt8,
    weight_type: QuantType = QuantType.QInt8,
    activation_symmetric: bool = False,
    weight_symmetric: bool | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    keep_removable_activations: bool = False,
    min_real_range: float | None = None,
    tensor_quant_overrides: Mapping[str, list[dict[str, Any]]] | None = None,
    calibration_providers: list[str] | None = None,
    op_types_to_quantize: list[str] | None = None,
    nodes_to_exclude: list[str] | NodeFilter | None = None,
    extra_options: Mapping[str, Any] | None = None,
) -> StaticQuantConfig:
    """A QDQ :class:`StaticQuantConfig` for ``model_input``, with onnxruntime's signature.

    Args:
        model_input: Path or ``onnx.ModelProto`` (read only, without external data).
        calibration_data_reader: The reader the config calibrates with.
        calibrate_method: Calibration method.
        calibrate_args: ``symmetric``, ``moving_average``, ``averaging_constant``,
            ``max_intermediate_outputs``, ``percentile`` (become ``Calib*`` extra options).
        activation_type: Element type of activations (default QUInt8).
        weight_type: Element type of weights.
        activation_symmetric: ``extra_options["ActivationSymmetric"]``.
        weight_symmetric: ``extra_options["WeightSymmetric"]`` (None: symmetric for signed types).
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights.
        keep_removable_activations: ``extra_options["QDQKeepRemovableActivations"]``.
        min_real_range: ``extra_options["MinimumRealRange"]``.
        tensor_quant_overrides: ``extra_options["TensorQuantOverrides"]`` (copied).
        calibration_providers: Execution providers for calibration.
        op_types_to_quantize: Op types to quantize (default: those in the model).
        nodes_to_exclude: Node names, or a callable ``(model, node) -> bool``.
        extra_options: More keys; they override the ones set from the arguments.

    Returns:
        The config, for :func:`onnxquant.ort.quantize`.
    """
    model = _load(model_input)
    excluded, present = _split_nodes(model, op_types_to_quantize, nodes_to_exclude)
    overrides = TensorQuantOverridesHelper(copy.deepcopy(dict(tensor_quant_overrides))
                                           if tensor_quant_overrides else {})
    options = {
        "MinimumRealRange": min_real_range,
        "QDQKeepRemovableActivations": keep_removable_activations,
        "ActivationSymmetric": activation_symmetric,
        "WeightSymmetric": weight_symmetric,
        "ForceQuantizeNoInputCheck": True,
        "TensorQuantOverrides": overrides.get_dict(),
        **_calib_options(calibrate_args),
    }
    types = _type_names({activation_type, weight_type, *overrides.get_quant_types()})
    if _needs_contrib_ops(model, types):
        options["UseQDQContribOps"] = True
    options.update(extra_options or {})
    external = model_has_external_data(model) or model.ByteSize() >= MODEL_SIZE_THRESHOLD
    return StaticQuantConfig(
        calibration_data_reader,
        calibrate_method=calibrate_method,
        quant_format=QuantFormat.QDQ,
        activation_type=activation_type,
        weight_type=weight_type,
        op_types_to_quantize=(list(op_types_to_quantize) if op_types_to_quantize
                              else sorted(present - _NEVER_QUANTIZED)),
        nodes_to_exclude=excluded,
        per_channel=per_channel,
        reduce_range=reduce_range,
        use_external_data_format=external,
        calibration_providers=calibration_providers,
        extra_options=options,
    )
