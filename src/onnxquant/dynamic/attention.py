"""Attention (com.microsoft) → DynamicQuantizeLinear + QAttention (com.microsoft).

QAttention's inputs: ``input(uint8), weight(int8|uint8), bias(float), input_scale,
weight_scale, mask_index, input_zero_point, weight_zero_point, past``. The input is quantized at
run time by DynamicQuantizeLinear (uint8, per tensor); the ``[input_hidden, 3*hidden]`` weight
offline, per tensor or per column (``weight_scale`` of length ``3*hidden``). The bias stays float
(zeros when the Attention has none, since QAttention requires it); mask and past pass through.

What onnxruntime 1.32 (CPU) refuses: an int8 quantized input ("Could not find an implementation
for QAttention"), so the input is always uint8; weights may be int8 or uint8, with any zero
point, per tensor or per column. QAttention has no ``qkv_hidden_sizes``,
``rotary_embedding_dim``, ``attention_bias`` or ``past_sequence_length``; nodes using them stay
float, as do float16/bfloat16 Attention nodes (DynamicQuantizeLinear reads float32 only).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.dynamic._contrib_common import (
    MS_DOMAIN,
    NameFn,
    constant_weight,
    float_input,
    input_name,
    new_initializer,
    quantized_initializers,
    replace_node,
    weight_type_ok,
)
from onnxquant.dynamic.config import DynamicQuantConfig

__all__ = ["rewrite_attention"]

logger = logging.getLogger(__name__)

_KEPT_ATTRIBUTES = frozenset(
    {"num_heads", "scale", "mask_filter_value", "past_present_share_buffer", "unidirectional"}
)


def _check(node: ir.Node, config: DynamicQuantConfig) -> str:
    if "qkv_hidden_sizes" in node.attributes:
        return "qkv_hidden_sizes is set (QAttention needs equal Q/K/V hidden sizes)"
    if node.attributes.get_int("do_rotary", 0):
        return "do_rotary=1 (rotary embedding is not supported by the quantized form)"
    unknown = set(node.attributes) - _KEPT_ATTRIBUTES - {"do_rotary"}
    if unknown:
        return f"attribute(s) {sorted(unknown)} are not supported by QAttention"
    for index, what in ((5, "attention_bias"), (6, "past_sequence_length")):
        if len(node.inputs) > index and node.inputs[index] is not None:
            return f"input {what} is set (QAttention has no such input)"
    if not float_input(node, 0):
        return "input is not float32 (DynamicQuantizeLinear takes float32 only)"
    return weight_type_ok(config.weight_type)


def rewrite_attention(graph: ir.Graph, node: ir.Node, config: DynamicQuantConfig,
                      unique_name: NameFn) -> tuple[bool, str]:
    """Replace an Attention (com.microsoft) node by DynamicQuantizeLinear + QAttention.

    Args:
        graph: The graph that holds ``node``; new initializers are added to it.
        node: The Attention node.
        config: Weight type, per-channel (per column), symmetry and reduce-range settings.
        unique_name: Returns an unused name for a stem.

    Returns:
        ``(True, note)`` after the rewrite, or ``(False, reason)`` with the graph untouched.
    """
    reason = _check(node, config)
    if reason:
        return False, reason
    w, reason = constant_weight(node, 1, "weights")
    if w is None:
        return False, reason
    if w.ndim != 2 or w.shape[1] % 3:
        return False, f"weights have shape {w.shape}, expected [input_hidden, 3*hidden]"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not float_input(node, 2):
        return False, "bias is not float32"

    stem = node.name or "attention"
    w_name = input_name(node, 1, f"{stem}_weights")
    q = numerics.quantize_weight(
        w, config.weight_type, axis=1 if config.per_channel else None,
        symmetric=config.weights_symmetric, reduce_range=config.reduce_range, name=w_name)
    wq, w_scale, w_zp = quantized_initializers(graph, unique_name, w_name, q)
    if bias is None:
        bias = new_initializer(graph, unique_name, f"{stem}_bias", np.zeros(w.shape[1], np.float32))

    x = node.inputs[0]
    assert x is not None  # checked by _check
    dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3,
                  name=unique_name(f"{stem}_input_DynamicQuantizeLinear"))
    xq, x_scale, x_zp = dql.outputs
    for value, suffix, dtype in ((xq, "quantized", ir.DataType.UINT8),
                                 (x_scale, "scale", ir.DataType.FLOAT),
                                 (x_zp, "zero_point", ir.DataType.UINT8)):
        value.name = unique_name(f"{x.name or stem}_{suffix}")
        value.type = ir.TensorType(dtype)
    xq.shape = x.shape

    def optional(index: int) -> ir.Value | None:
        return node.inputs[index] if len(node.inputs) > index else None

    inputs = [xq, wq, bias, x_scale, w_scale, optional(3), x_zp, w_zp, optional(4)]
    attributes = [a for name, a in node.attributes.items() if name in _KEPT_ATTRIBUTES]
    qattention = ir.Node(MS_DOMAIN, "QAttention", inputs, attributes,
                         num_outputs=len(node.outputs), name=unique_name(f"{stem}_quant"))
    replace_node(graph, node, [dql, qattention], list(qattention.outputs))
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    granularity = "per column" if config.per_channel else "per tensor"
    note = f"QAttention, uint8 input, {config.weight_type} weights {granularity}"
    logger.debug("%s: %s", node.name, note)
    return True, note
