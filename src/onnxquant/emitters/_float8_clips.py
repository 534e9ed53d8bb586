"""Clip before a float8 QuantizeLinear, written as Max/Min.

onnxruntime 1.32's ClipQuantFusion (a basic-level graph optimization) reads the zero point of
the QuantizeLinear after a Clip or Relu to decide whether the Clip is redundant, and throws
"Unexpected data type for QuantizeLinear input y_zero_point of 17" for float8: the session
cannot be created. ``Max(x, min)`` and ``Min(x, max)`` compute the same values and are not
fused, so the model loads.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.core.names import UniqueNames

__all__ = ["clips_before_float8"]

_FLOAT8 = frozenset({ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ,
                     ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ})


def _feeds_float8_quantize(value: ir.Value) -> bool:
    return any(user.op_type == "QuantizeLinear" and len(user.inputs) > 2
               and user.inputs[2] is not None and user.inputs[2].dtype in _FLOAT8
               for user, _ in value.uses())


def _bound(node: ir.Node, index: int) -> ir.Value | None:
    """The min (input 1) or max (input 2) of a Clip-11+ node; None when absent."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        return node.inputs[index]
    return None


def clips_before_float8(graph: ir.Graph, names: UniqueNames) -> None:
    """Rewrite each Relu/Clip (opset 11+) of ``graph`` whose output a float8 QuantizeLinear
    reads into Max/Min with the same bounds."""
    for node in list(graph):
        if node.op_type not in ("Relu", "Clip") or node.domain not in ("", "ai.onnx"):
            continue
        if not _feeds_float8_quantize(node.outputs[0]) or "min" in node.attributes:
            continue
        x = node.inputs[0]
        assert x is not None
        steps: list[tuple[str, ir.Value]] = []
        if node.op_type == "Relu":
            zero = ir.Value(name=names.new(f"{node.name}_zero"),
                            const_value=ir.tensor(0.0, dtype=x.dtype or ir.DataType.FLOAT))
            zero.type, zero.shape = ir.TensorType(x.dtype or ir.DataType.FLOAT), ir.Shape([])
            graph.register_initializer(zero)
            steps.append(("Max", zero))
        else:
            low, high = _bound(node, 1), _bound(node, 2)
            steps += [("Max", low)] if low is not None else []
            steps += [("Min", high)] if high is not None else []
        current = x
        for op, bound in steps:
            new = ir.node(op, [current, bound], name=names.new(f"{node.name}_{op.lower()}"))
            new.outputs[0].type, new.outputs[0].shape = x.type, x.shape
            graph.insert_before(node, new)
            current = new.outputs[0]
        out = node.outputs[0]
        name = out.name
        out.replace_all_uses_with(current, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        current.name = name
