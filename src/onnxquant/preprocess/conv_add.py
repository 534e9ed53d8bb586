"""Fold ``Add(Conv(x), c)`` with a per-channel constant ``c`` into the Conv's bias.

Exporters such as paddle2onnx write a bias-less Conv followed by an Add of a ``[1, C, 1, 1]``
(often a Reshape of a ``[C]`` constant). onnxruntime fuses that pair for float models
(ConvAddFusion) but a quantized Add between integer Convs is a real QLinearAdd; folding first
gives the quantized model the same single Conv with an int32 bias.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxquant.core.graph import add_initializer

__all__ = ["fold_conv_add"]

logger = logging.getLogger(__name__)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The data of a constant, looking through Reshape/Unsqueeze/Squeeze/Identity of
    constants (as onnxruntime's constant folding would)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    data = _constant(node.inputs[0]) if node.inputs else None
    if data is None:
        return None
    if node.op_type == "Identity":
        return data
    if node.op_type == "Reshape" and len(node.inputs) > 1:
        shape = _constant(node.inputs[1])
        if shape is None or np.any(shape == 0) or (np.count_nonzero(shape == -1) > 1):
            return None  # 0 copies an input dimension: leave such reshapes alone
        return data.reshape([int(d) for d in shape])
    if node.op_type in ("Unsqueeze", "Squeeze"):
        attr = node.attributes.get("axes")
        axes = attr.value if attr is not None else (
            _constant(node.inputs[1]) if len(node.inputs) > 1 else None)
        if axes is None:
            return np.squeeze(data) if node.op_type == "Squeeze" else None
        axes = [int(a) for a in np.atleast_1d(axes)]
        return (np.expand_dims(data, axes) if node.op_type == "Unsqueeze"
                else np.squeeze(data, tuple(axes)))
    return None


def _channel_vector(data: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``data`` as a length-``channels`` vector when it broadcasts along axis 1 only."""
    if data.ndim > rank or not np.issubdtype(data.dtype, np.floating):
        return None
    shape = (1,) * (rank - data.ndim) + data.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(data.reshape(-1), (channels,))


def _fold_one(graph: ir.Graph, add: ir.Node) -> bool:
    for index in (0, 1):
        y = add.inputs[index]
        conv = y.producer() if y is not None else None
        if y is None or conv is None or conv.op_type != "Conv" or \
                conv.domain not in ("", "ai.onnx"):
            continue
        if conv.graph is not graph or len(y.uses()) != 1 or y.is_graph_output():
            continue
        weight = conv.inputs[1].const_value if len(conv.inputs) > 1 and conv.inputs[1] else None
        bias_in = conv.inputs[2] if len(conv.inputs) > 2 else None
        bias = bias_in.const_value.numpy() if bias_in is not None and bias_in.const_value \
            else None
        if weight is None or (bias_in is not None and bias is None):
            continue
        channels = weight.shape.numpy()[0]
        data = _constant(add.inputs[1 - index])
        if data is None:
            continue
        vector = _channel_vector(data, len(weight.shape), channels)  # output rank = weight rank
        if vector is None:
            continue
        dtype = weight.dtype.numpy()
        total = (bias.astype(np.float64) if bias is not None else 0.0) + vector.astype(np.float64)
        new_bias = add_initializer(graph, f"{conv.name}_add_bias",
                                   np.asarray(total).astype(dtype).reshape(channels))
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, new_bias)
        out = add.outputs[0]
        name = out.name
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(add, safe=True)
        out.name = f"{name}_folded"
        y.name = name
        return True
    return False


def fold_conv_add(model: ir.Model) -> int:
    """Fold every ``Conv → Add(per-channel constant)`` pair of ``model`` (subgraphs too) into
    the Conv's bias. Returns the number of folded Adds."""
    count = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in list(graph):
            if node.op_type == "Add" and node.domain in ("", "ai.onnx") and _fold_one(graph, node):
                count += 1
    if count:
        RemoveUnusedNodesPass()(model)
        logger.info("folded %d per-channel Adds into the bias of their Conv", count)
    return count
