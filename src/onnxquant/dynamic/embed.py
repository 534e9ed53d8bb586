"""EmbedLayerNormalization → QEmbedLayerNormalization (com.microsoft).

The word, position and segment embedding tables and the layer-norm gamma and beta are stored
as uint8, asymmetric, one scale and zero point per tensor (the baseline's activation type).
QEmbedLayerNormalization's inputs: ``input_ids, segment_ids, word_embedding, position_embedding,
segment_embedding, gamma, beta, mask``, then the five scales (word, position, segment, gamma,
beta), then the five zero points in the same order; the segment entries are all present or
all empty. Its two outputs (``layernorm_out, mask_index_out``) are both required, so a node
without a mask_index output gets an unused one.

What onnxruntime 1.32 (CPU) accepts: uint8 and int8 tables, with or without segment and mask;
it refuses a node with a single output. QEmbedLayerNormalization has no ``position_ids`` input
and no ``embedding_sum`` output; nodes that use them stay float.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.core.qtypes import UINT8
from onnxquant.dynamic._contrib_common import (
    MS_DOMAIN,
    NameFn,
    constant_weight,
    input_name,
    quantized_initializers,
    replace_node,
)
from onnxquant.dynamic.config import DynamicQuantConfig

__all__ = ["rewrite_embed_layer_norm"]

logger = logging.getLogger(__name__)

_TABLES = ((2, "word_embedding"), (3, "position_embedding"), (4, "segment_embedding"),
           (5, "gamma"), (6, "beta"))


def _check(node: ir.Node) -> str:
    unknown = set(node.attributes) - {"epsilon", "mask_index_type"}
    if unknown:
        return f"attribute(s) {sorted(unknown)} are not supported by QEmbedLayerNormalization"
    if len(node.inputs) > 8 and node.inputs[8] is not None:
        return "input position_ids is set (QEmbedLayerNormalization has no such input)"
    if len(node.outputs) > 2:
        extra = node.outputs[2]
        if extra.uses() or extra.is_graph_output():
            return "output embedding_sum is used (QEmbedLayerNormalization has no such output)"
    segment_ids = node.inputs[1] if len(node.inputs) > 1 else None
    segment_table = node.inputs[4] if len(node.inputs) > 4 else None
    if (segment_ids is None) != (segment_table is None):
        return "segment_ids and segment_embedding must be both given or both omitted"
    return ""


def rewrite_embed_layer_norm(graph: ir.Graph, node: ir.Node, config: DynamicQuantConfig,
                             unique_name: NameFn) -> tuple[bool, str]:
    """Replace EmbedLayerNormalization by QEmbedLayerNormalization with uint8 tables.

    Args:
        graph: The graph that holds ``node``; new initializers are added to it.
        node: The EmbedLayerNormalization node (com.microsoft).
        config: Unused beyond the common signature: tables are always uint8 per tensor.
        unique_name: Returns an unused name for a stem.

    Returns:
        ``(True, note)`` after the rewrite, or ``(False, reason)`` with the graph untouched.
    """
    del config  # tables follow the activation type (uint8), as in the baseline
    reason = _check(node)
    if reason:
        return False, reason
    arrays = {}
    for index, what in _TABLES:
        if index == 4 and (len(node.inputs) <= 4 or node.inputs[4] is None):
            continue
        array, reason = constant_weight(node, index, what)
        if array is None:
            return False, reason
        arrays[index] = array

    stem = node.name or "embed_layer_norm"
    quantized = {}  # everything is quantized before the graph changes
    for index, what in _TABLES:
        if index in arrays:
            name = input_name(node, index, f"{stem}_{what}")
            quantized[index] = name, numerics.quantize_weight(
                arrays[index], UINT8, symmetric=False, name=name)
    data: list[ir.Value | None] = [None] * 5
    scales: list[ir.Value | None] = [None] * 5
    zero_points: list[ir.Value | None] = [None] * 5
    for slot, (index, _) in enumerate(_TABLES):
        if index in quantized:
            name, q = quantized[index]
            data[slot], scales[slot], zero_points[slot] = quantized_initializers(
                graph, unique_name, name, q)

    def optional(index: int) -> ir.Value | None:
        return node.inputs[index] if len(node.inputs) > index else None

    inputs = [node.inputs[0], optional(1), data[0], data[1], data[2], data[3], data[4],
              optional(7), *scales, *zero_points]
    attributes = [a for name, a in node.attributes.items() if name == "epsilon"]
    qnode = ir.Node(MS_DOMAIN, "QEmbedLayerNormalization", inputs, attributes, num_outputs=2,
                    name=unique_name(f"{stem}_quant"))
    out, mask_index = qnode.outputs
    if len(node.outputs) < 2:
        mask_index.name = unique_name(f"{stem}_mask_index")
        mask_index.type = ir.TensorType(ir.DataType.INT32)
    replace_node(graph, node, [qnode], [out, mask_index if len(node.outputs) > 1 else None])
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    note = f"QEmbedLayerNormalization, uint8 per-tensor tables ({len(arrays)} quantized)"
    logger.debug("%s: %s", node.name, note)
    return True, note
