"""float16 layers in dynamic quantization: computed in float32 between two Casts.

DynamicQuantizeLinear reads float32 only, so a float16 MatMul/Gemm/Conv is first rewritten to
``Cast(x, float) -> node (float32 weights) -> Cast(y, float16)``; the float32 rewrite then
quantizes the node as usual. A node that then stays float computes in float32, which is at
least as accurate as float16.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.core.graph import add_initializer, is_constant, is_half
from onnxquant.core.names import UniqueNames

__all__ = ["HALF_OPS", "as_float32"]

HALF_OPS = frozenset({"MatMul", "Gemm", "Conv"})
_FLOAT = ir.DataType.FLOAT
_HALF = ir.DataType.FLOAT16


def _float_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.dtype in (_FLOAT, _HALF)]


def as_float32(node: ir.Node, names: UniqueNames, weights: dict[int, ir.Value]) -> bool:
    """Rewrite float16 ``node`` to compute in float32 between Casts; False when it is not a
    float16 MatMul/Gemm/Conv. ``weights`` caches the float32 copies of constant weights (by
    the id of the float16 value), so a weight shared by several nodes is copied once."""
    graph = node.graph
    inputs = _float_inputs(node)
    if (graph is None or node.op_type not in HALF_OPS or not inputs
            or not all(is_half(v) for v in inputs) or not is_half(node.outputs[0])):
        return False
    for index, value in enumerate(node.inputs):
        if value is None or not is_half(value):
            continue
        if is_constant(value):
            if id(value) not in weights:
                array = value.const_value.numpy().astype("float32")  # type: ignore[union-attr]
                weights[id(value)] = add_initializer(graph, names.new(f"{value.name}_float32"),
                                                     array)
            node.replace_input_with(index, weights[id(value)])
        else:
            cast = ir.node("Cast", [value], attributes={"to": _FLOAT},
                           name=names.new(f"{value.name}_to_float32"))
            cast.outputs[0].name = names.new(f"{value.name}_float32")
            cast.outputs[0].type = ir.TensorType(_FLOAT)
            cast.outputs[0].shape = value.shape
            graph.insert_before(node, cast)
            node.replace_input_with(index, cast.outputs[0])
    _cast_output_back(node, graph, names)
    return True


def _cast_output_back(node: ir.Node, graph: ir.Graph, names: UniqueNames) -> None:
    """``node``'s output becomes float32; a Cast hands float16 to its readers (and keeps the
    graph output's name)."""
    out = node.outputs[0]
    original = out.name
    cast = ir.node("Cast", [out], attributes={"to": _HALF},
                   name=names.new(f"{original}_to_float16"))
    back = cast.outputs[0]
    back.type, back.shape = ir.TensorType(_HALF), out.shape
    for user, index in list(out.uses()):
        if user is not cast:
            user.replace_input_with(index, back)
    for position, value in enumerate(graph.outputs):
        if value is out:
            graph.outputs[position] = back
    out.name = names.new(f"{original}_float32")
    out.type = ir.TensorType(_FLOAT)
    back.name = original
    graph.insert_after(node, cast)
