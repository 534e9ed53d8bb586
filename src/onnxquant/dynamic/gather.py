"""Gather on a constant float table: the table stored 8-bit, Gather on integers, then
DequantizeLinear on the (small) gathered rows. Used by both forms of dynamic quantization.

Per-channel (one scale per column of an embedding table) applies when the Gather does not
index the table's last axis, so that axis is still the last one of the gathered output, and
the model is at opset 13 or newer (per-axis DequantizeLinear).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.core.graph import is_constant
from onnxquant.core.graph import is_float32 as is_float  # float16: not yet
from onnxquant.dynamic._context import Context, Outcome

__all__ = ["rewrite_gather"]


def rewrite_gather(ctx: Context, node: ir.Node) -> Outcome:
    """Gather(table) -> Gather(table_q) + DequantizeLinear."""
    table, indices = node.inputs[0], node.inputs[1]
    if table is None or not is_float(table) or not is_constant(table):
        return False, "the data input is not a constant float32 table"
    assert table.const_value is not None and indices is not None
    qtype = ctx.support.gather_type(ctx.config.weight_type)
    if qtype is None:
        return False, f"onnxruntime {ctx.support.version} cannot Gather 8-bit tables"
    if qtype is not ctx.config.weight_type:
        ctx.note(f"Gather: {ctx.config.weight_type} tables do not run in onnxruntime "
                 f"{ctx.support.version}; {qtype} is used instead", node)
    rank = table.const_value.shape.rank()
    attr = node.attributes.get("axis")
    axis = (attr.value if attr is not None else 0) % max(rank, 1)
    possible = rank >= 2 and axis != rank - 1 and ctx.opset >= 13
    choice = ctx.per_channel(table, rank - 1 if possible else None, qtype=qtype,
                             sqnr_fallback=False, reduce_range=False)
    if choice.float_reason:
        return False, choice.float_reason
    per_channel = choice.per_channel
    b = ctx.builder(node)
    qw = ctx.weights.get(table, b.graph, qtype=qtype, axis=rank - 1 if per_channel else None,
                         symmetric=ctx.symmetric, reduce_range=False)
    stem = node.name or "gather"
    (gathered,) = b.op("Gather", [qw.data, indices], f"{stem}_quantized",
                       attributes={"axis": axis}, dtypes=(qtype.onnx_dtype,))
    (y,) = b.op("DequantizeLinear", [gathered, qw.scale, qw.zero_point], f"{stem}_dequantized",
                attributes={"axis": -1} if per_channel else None, dtypes=(ir.DataType.FLOAT,))
    b.replace(node.outputs[0], y)
    assert node.graph is not None
    node.graph.remove(node, safe=True)
    granularity = "per-column" if per_channel else "per-tensor"
    why = f"; {choice.why}" if choice.why else ""
    return True, f"Gather on an {qtype} table ({granularity}{why})"
