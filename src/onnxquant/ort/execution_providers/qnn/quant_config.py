"""onnxruntime's ``get_qnn_qdq_config``: a :class:`~onnxquant.ort.StaticQuantConfig` for models
that will run on the QNN execution provider (Qualcomm NPUs).

QNN has rules the generic quantizer does not know; the config encodes them as
``TensorQuantOverrides`` next to the user's own:

* mixed precision: a user override that gives an activation another type than the default is
  completed with the types of its neighbours and ``convert`` entries
  (:class:`~.mixed_precision_overrides_utils.MixedPrecisionTensorQuantOverridesFixer`), unless
  ``add_qtype_converts=False``;
* MatMul and LayerNormalization: with an 8-bit default weight type, a constant input next to a
  16-bit activation is quantized as a weight (default weight type and symmetry), not as an
  activation; with ``per_channel``, MatMul weights are quantized per tensor (QNN has no
  per-channel MatMul), and LayerNormalization weights must then have explicit overrides;
* 16-bit Sigmoid and Tanh outputs get the fixed scale and zero point QNN expects
  (Sigmoid: 1/65536 and 0 for uint16, 1/32768 and 0 for int16; Tanh: 1/32768 and 32768 for
  uint16, 1/32768 and 0 for int16).

The extra options are ``MinimumRealRange=0.0001``, ``DedicatedQDQPair=False``,
``QDQKeepRemovableActivations``, ``TensorQuantOverrides``, ``ActivationSymmetric``,
``WeightSymmetric`` and ``CalibStridedMinMax``, plus ``UseQDQContribOps=True`` when a 16- or
4-bit type is used in a model whose ONNX opset is below 21.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Collection
from typing import Any

import numpy as np
import onnx

from onnxquant.ort._quant_type_info import (
    get_node_input_qtype_info,
    get_node_output_qtype_info,
    update_tensor_overrides,
)
from onnxquant.ort.calibrate import CalibrationDataReader, CalibrationMethod
from onnxquant.ort.execution_providers.qnn.mixed_precision_overrides_utils import (
    MixedPrecisionTensorQuantOverridesFixer,
)
from onnxquant.ort.quant_utils import MODEL_SIZE_THRESHOLD, QuantType
from onnxquant.ort.quantize import StaticQuantConfig
from onnxquant.ort.tensor_quant_overrides import TensorQuantOverridesHelper

__all__ = ["get_qnn_qdq_config"]

logger = logging.getLogger(__name__)

Q16_TYPES = frozenset({QuantType.QInt16, QuantType.QUInt16})
Q8_TYPES = frozenset({QuantType.QInt8, QuantType.QUInt8})
Q4_TYPES = frozenset({QuantType.QInt4, QuantType.QUInt4})
OP_TYPES_TO_EXCLUDE = frozenset({"Cast"})

# op type -> {16-bit output type: (scale, zero point)} that QNN requires.
_FIXED_OUTPUT_PARAMS = {
    "Sigmoid": {QuantType.QUInt16: (1.0 / 65536.0, np.uint16(0)),
                QuantType.QInt16: (1.0 / 32768.0, np.int16(0))},
    "Tanh": {QuantType.QUInt16: (1.0 / 32768.0, np.uint16(32768)),
             QuantType.QInt16: (1.0 / 32768.0, np.int16(0))},
}


class _QnnRules:
    """Adds the overrides QNN needs for one node at a time."""

    def __init__(self, overrides: TensorQuantOverridesHelper, initializers: set[str], *,
                 activation_type: QuantType, weight_type: QuantType, weight_symmetric: bool,
                 per_channel: bool) -> None:
        self.overrides = overrides
        self.initializers = initializers
        self.activation_type = activation_type
        self.weight_type = weight_type
        self.weight_symmetric = weight_symmetric
        self.per_channel = per_channel

    def process_node(self, node: onnx.NodeProto) -> None:
        """Add the overrides ``node`` needs (if any)."""
        if node.op_type in _FIXED_OUTPUT_PARAMS:
            self._fix_output_params(node)
        elif node.op_type == "MatMul":
            if self.per_channel:
                self._matmul_per_tensor(node)
            else:
                self._weights_next_to_16bit(node)
        elif node.op_type == "LayerNormalization":
            if self.per_channel:
                self._check_layernorm_per_channel(node)
            else:
                self._weights_next_to_16bit(node)

    def _weight_override(self) -> dict[str, Any]:
        return {"quant_type": self.weight_type, "symmetric": self.weight_symmetric}

    def _weights_next_to_16bit(self, node: onnx.NodeProto) -> None:
        """Give a constant first-two input the default (8-bit) weight type when the other one
        is a 16-bit activation (the quantizer would give it the activation type)."""
        if self.weight_type not in Q8_TYPES:
            return
        weight, activation_16bit = None, False
        for name in [n for n in node.input[:2] if n]:
            is_weight = name in self.initializers
            info = get_node_input_qtype_info(self.overrides, name, node.name,
                                             None if is_weight else self.activation_type)
            if info.axis is not None:
                return  # per-channel input: left as the user gave it
            if is_weight and info.quant_type == self.weight_type \
                    and info.symmetric == self.weight_symmetric:
                return  # already quantized as a weight
            if is_weight:
                weight = name
            elif info.quant_type in Q16_TYPES:
                activation_16bit = True
        if weight is None or not activation_16bit:
            return
        if not update_tensor_overrides(self.overrides, weight, self._weight_override(),
                                       overwrite=False):
            logger.warning("could not give input weight '%s' of %s node '%s' quant_type %s and "
                           "symmetric=%s: its TensorQuantOverrides already set them", weight,
                           node.op_type, node.name, self.weight_type, self.weight_symmetric)

    def _matmul_per_tensor(self, node: onnx.NodeProto) -> None:
        for name in node.input:
            if name in self.initializers and name not in self.overrides:
                update_tensor_overrides(self.overrides, name, self._weight_override())

    def _check_layernorm_per_channel(self, node: onnx.NodeProto) -> None:
        unset = [n for n in node.input[1:3]
                 if n and n in self.initializers and n not in self.overrides]
        if unset:
            raise ValueError(
                f"get_qnn_qdq_config() does not support per_channel=True with "
                f"LayerNormalization node '{node.name}': QNN needs its bias per tensor. Give "
                f"TensorQuantOverrides for {unset} (per-tensor bias) or use per_channel=False.")

    def _fix_output_params(self, node: onnx.NodeProto) -> None:
        output = node.output[0]
        qtype = get_node_output_qtype_info(self.overrides, output, self.activation_type).quant_type
        fixed = _FIXED_OUTPUT_PARAMS[node.op_type].get(qtype)
        if fixed is None:
            return
        scale, zero_point = fixed
        update_tensor_overrides(self.overrides, output, {
            "quant_type": qtype, "scale": np.array(scale, dtype=np.float32),
            "zero_point": np.array(zero_point, dtype=zero_point.dtype)})


def _load(model_input: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model_input, onnx.ModelProto):
        return model_input
    return onnx.load_model(os.fspath(model_input), load_external_data=False)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def _needs_contrib_ops(model: onnx.ModelProto, types: set[Any]) -> bool:
    """Whether 16/4-bit Q/DQ need ``com.microsoft`` ops (ONNX has them from opset 21)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return opset < 21 and bool(types & (Q16_TYPES | Q4_TYPES))


def get_qnn_qdq_config(
    model_input: str | os.PathLike | onnx.ModelProto,
    calibration_data_reader: CalibrationDataReader,
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
    activation_type: QuantType = QuantType.QUInt8,
    weight_type: QuantType = QuantType.QUInt8,
    per_channel: bool = False,
    init_overrides: dict[str, list[dict[str, Any]]] | None = None,
    add_qtype_converts: bool = True,
    activation_symmetric: bool = False,
    weight_symmetric: bool | None = None,
    keep_removable_activations: bool = False,
    stride: int | None = None,
    calibration_providers: list[str] | None = None,
    op_types_to_quantize: Collection[str] | None = None,
    nodes_to_exclude: Collection[str] | None = None,
) -> StaticQuantConfig:
    """A static QDQ config for the QNN execution provider (see the module docstring).

    Args:
        model_input: The float model (path or proto; external data is not loaded).
        calibration_data_reader: Feeds for calibration.
        calibrate_method: Calibration method.
        activation_type: Default activation type.
        weight_type: Default weight type.
        per_channel: Per-channel weights (MatMul weights stay per tensor).
        init_overrides: The user's ``TensorQuantOverrides`` (copied, not modified).
        add_qtype_converts: Complete mixed-precision overrides with ``convert`` entries.
        activation_symmetric: Symmetric activation ranges.
        weight_symmetric: Symmetric weight ranges; None: True for signed 8/16-bit weights.
        keep_removable_activations: Keep Relu/Clip that quantization could remove.
        stride: ``CalibStridedMinMax``: calibrate this many feeds at a time.
        calibration_providers: Execution providers for calibration.
        op_types_to_quantize: Op types to quantize; None: every op type in the model but Cast.
        nodes_to_exclude: Names of nodes to keep float.

    Returns:
        The config, for :func:`onnxquant.ort.quantize`.

    Raises:
        ValueError: The overrides cannot be completed, or ``per_channel`` meets a
            LayerNormalization without weight overrides.
    """
    if weight_symmetric is None:
        weight_symmetric = weight_type in {QuantType.QInt8, QuantType.QInt16}
    model = _load(model_input)
    overrides = TensorQuantOverridesHelper(copy.deepcopy(init_overrides) if init_overrides
                                           else {})
    if not overrides.empty() and add_qtype_converts:
        fixer = MixedPrecisionTensorQuantOverridesFixer.create_from_model(
            overrides, model, activation_type)
        fixer.apply(activation_type, activation_symmetric)
    rules = _QnnRules(overrides, {t.name for t in model.graph.initializer},
                      activation_type=activation_type, weight_type=weight_type,
                      weight_symmetric=weight_symmetric, per_channel=per_channel)
    wanted_ops = set(op_types_to_quantize) if op_types_to_quantize else None
    excluded = set(nodes_to_exclude) if nodes_to_exclude else set()
    op_types: set[str] = set()
    for node in model.graph.node:
        if (wanted_ops and node.op_type not in wanted_ops) or node.name in excluded:
            continue
        op_types.add(node.op_type)
        rules.process_node(node)
    extra_options: dict[str, Any] = {
        "MinimumRealRange": 0.0001,
        "DedicatedQDQPair": False,
        "QDQKeepRemovableActivations": keep_removable_activations,
        "TensorQuantOverrides": overrides.get_dict(),
        "ActivationSymmetric": activation_symmetric,
        "WeightSymmetric": weight_symmetric,
        "CalibStridedMinMax": stride,
    }
    if _needs_contrib_ops(model, {activation_type, weight_type, *overrides.get_quant_types()}):
        extra_options["UseQDQContribOps"] = True
    return StaticQuantConfig(
        calibration_data_reader,
        calibrate_method=calibrate_method,
        activation_type=activation_type,
        weight_type=weight_type,
        op_types_to_quantize=(sorted(op_types - OP_TYPES_TO_EXCLUDE)
                              if op_types_to_quantize is None else op_types_to_quantize),
        nodes_to_exclude=nodes_to_exclude,
        per_channel=per_channel,
        use_external_data_format=(_uses_external_data(model)
                                  or model.ByteSize() >= MODEL_SIZE_THRESHOLD),
        calibration_providers=calibration_providers,
        extra_options=extra_options,
    )
