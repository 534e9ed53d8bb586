"""int32 biases of quantized Conv/Gemm/MatMul layers: scale = input scale × weight scale,
with weight scales enlarged first wherever a bias would overflow int32."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.core.external_data import read_array
from onnxquant.core.graph import is_constant, is_float
from onnxquant.core.plan import BiasQuant, NodeDecision, QuantPlan
from onnxquant.static._prequantized import dequantize_params
from onnxquant.static.config import StaticQuantConfig
from onnxquant.static.rules import OpRule, weight_axis

__all__ = ["plan_biases"]

logger = logging.getLogger("onnxquant.static.planner")


def _bias_operands(plan: QuantPlan, config: StaticQuantConfig, node: ir.Node, rule: OpRule,
               decision: NodeDecision):
    """(bias value, bias data, input params, weight params) when the bias can be int32."""
    index = rule.bias
    if index is None or not config.quantize_bias or len(node.inputs) <= index:
        return None
    bias, weight_name = node.inputs[index], decision.inputs.get(1)
    # an input or weight the model dequantizes already brings its own fixed grid
    act = (plan.tensors.get(decision.inputs.get(0, ""))
           or dequantize_params(node.inputs[0] if node.inputs else None))
    weight = (plan.tensors.get(weight_name or "")
              or dequantize_params(node.inputs[1] if len(node.inputs) > 1 else None))
    if bias is None or not is_constant(bias) or not is_float(bias) or act is None:
        return None
    if weight is not None and weight.quant_type.is_float:
        decision.bias = BiasQuant(index, bias.name or "", [], stored="float")
        return None  # float8 weights: no int32 accumulator, the bias stays float
    if weight is None or act.axis is not None or weight.block_size is not None:
        return None
    if node.op_type == "Gemm" and not _unit_alpha_beta(node):
        return None
    data = read_array(bias.const_value)  # type: ignore[arg-type]
    if data.ndim != 1 or (weight.axis is not None and len(weight.scale) != data.size):
        return None
    w_value = node.inputs[1]
    if weight.axis is not None and (w_value is None or w_value.shape is None or weight.axis
                                    != weight_axis(node, 1, len(w_value.shape))):
        return None  # per-channel along another axis than the output channels
    return bias, data, act, weight

def plan_biases(plan: QuantPlan, config: StaticQuantConfig,
            items: list[tuple[ir.Node, OpRule, NodeDecision]]) -> None:
    """int32 biases: first enlarge weight scales wherever a bias would overflow (scales only
    grow, so a weight shared by several nodes satisfies all of them), then derive every
    bias scale from the final input and weight scales."""
    operands = []
    for node, rule, decision in items:
        found = _bias_operands(plan, config, node, rule, decision)
        if found is not None:
            operands.append((rule.bias, decision, *found))
    kept = []
    for item in operands:
        _, _, bias, data, act, weight = item
        w_scale = weight.scale_array()
        adjusted = numerics.weight_scale_for_bias(data, act.scale_array(), w_scale)
        if np.array_equal(adjusted, w_scale):
            kept.append(item)
            continue
        override = config.tensors.get(weight.name)
        if override is not None and override.scale is not None or weight.role != "weight":
            logger.warning("bias '%s' stays float: it does not fit in int32 with the fixed "
                           "scale of weight '%s' (an override, a dynamic or pre-quantized "
                           "weight)", bias.name, weight.name)
            continue
        logger.info("enlarged the scale of weight '%s' so that bias '%s' fits in int32",
                    weight.name, bias.name)
        weight.scale = [float(x) for x in np.atleast_1d(adjusted)]
        kept.append(item)
    for index, decision, bias, _, act, weight in kept:
        scale = numerics.bias_scale(act.scale_array(), weight.scale_array())
        decision.bias = BiasQuant(index, bias.name or "",
                                  [float(x) for x in np.atleast_1d(scale)],
                                  0 if weight.axis is not None else None)


def _unit_alpha_beta(node: ir.Node) -> bool:
    for key in ("alpha", "beta"):
        attr = node.attributes.get(key)
        if attr is not None and attr.as_float() != 1.0:
            return False
    return True
