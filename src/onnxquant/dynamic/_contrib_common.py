"""Small graph helpers shared by the contrib-operator rewrites (LSTM, Attention, EmbedLayerNorm)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.core.graph import add_initializer
from onnxquant.core.qtypes import QuantType

__all__ = [
    "MS_DOMAIN",
    "NameFn",
    "constant_weight",
    "float_input",
    "input_name",
    "new_initializer",
    "quantized_initializers",
    "remove_if_unused",
    "replace_node",
    "weight_type_ok",
]

MS_DOMAIN = "com.microsoft"
NameFn = Callable[[str], str]


def constant_weight(node: ir.Node, index: int, what: str) -> tuple[np.ndarray | None, str]:
    """Return the float32 constant at input ``index`` of ``node``, or ``(None, reason)``.

    An initializer that is also a graph input can be overridden at run time, so it does not
    count as constant; neither does anything produced by a node other than ``Constant``.
    """
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None, f"{what} is missing"
    if value.is_graph_input():
        return None, f"{what} '{value.name}' is a graph input (can be overridden at run time)"
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None, f"{what} '{value.name}' is not a constant initializer"
    if tensor.dtype != ir.DataType.FLOAT:
        return None, f"{what} '{value.name}' is {tensor.dtype.name}, only FLOAT is quantized"
    array = tensor.numpy()
    if not np.all(np.isfinite(array)):
        return None, f"{what} '{value.name}' contains NaN/Inf"
    return array, ""


def float_input(node: ir.Node, index: int) -> bool:
    """Whether input ``index`` is float32 (or of unknown type, which ONNX checks later)."""
    value = node.inputs[index]
    return value is not None and value.dtype in (None, ir.DataType.FLOAT)


def input_name(node: ir.Node, index: int, default: str) -> str:
    """The name of input ``index`` of ``node``, or ``default`` if it has none."""
    value = node.inputs[index] if index < len(node.inputs) else None
    return value.name if value is not None and value.name else default


def new_initializer(graph: ir.Graph, unique_name: NameFn, stem: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` named ``unique_name(stem)``."""
    return add_initializer(graph, unique_name(stem),
                           np.ascontiguousarray(array) if array.ndim else array)


def quantized_initializers(
    graph: ir.Graph, unique_name: NameFn, stem: str, q: numerics.QuantizedTensor,
    data: np.ndarray | None = None, param_shape: Sequence[int] | None = None,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Add ``(data, scale, zero_point)`` initializers for a quantized tensor.

    ``data`` replaces ``q.data`` when the stored layout differs (e.g. transposed);
    ``param_shape`` reshapes scale and zero point.
    """
    stored = q.data if data is None else data
    scale, zero_point = q.scale, q.zero_point
    if param_shape is not None:
        scale, zero_point = scale.reshape(param_shape), zero_point.reshape(param_shape)
    return (
        new_initializer(graph, unique_name, f"{stem}_quantized", stored),
        new_initializer(graph, unique_name, f"{stem}_scale", scale.astype(np.float32)),
        new_initializer(graph, unique_name, f"{stem}_zero_point", zero_point),
    )


def weight_type_ok(qtype: QuantType) -> str:
    """Return why ``qtype`` cannot be a contrib-op weight type, or ``""`` if it can."""
    if qtype.is_float or qtype.bits != 8:
        return f"weight type {qtype} is not accepted (int8 or uint8 only)"
    return ""


def replace_node(graph: ir.Graph, old: ir.Node, new_nodes: Sequence[ir.Node],
                 new_outputs: Sequence[ir.Value | None]) -> None:
    """Insert ``new_nodes`` before ``old``, move its outputs onto ``new_outputs``, remove it.

    Each output of ``old`` keeps its name: uses and graph outputs are rewired to the new value,
    which takes over the name (and the type/shape if the new value has none).
    """
    graph.insert_before(old, new_nodes)
    for out, new in zip(old.outputs, new_outputs, strict=False):
        if new is None:
            continue
        name = out.name
        if new.type is None:
            new.type = out.type
        if new.shape is None and out.shape is not None:
            new.shape = out.shape
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        out.name = None
        new.name = name
    inputs = [v for v in old.inputs if v is not None]
    graph.remove(old, safe=True)
    for value in inputs:
        remove_if_unused(graph, value)


def remove_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Drop ``value``'s initializer from ``graph`` when nothing reads it any more."""
    name = value.name
    if (name and value.is_initializer() and not value.uses() and not value.is_graph_input()
            and not value.is_graph_output() and graph.initializers.get(name) is value):
        del graph.initializers[name]
