"""QDQ emission of a tensor read in two types (``TensorQuant.convert``, mixed precision).

The producer quantizes the tensor to its own grid; the readers of the second grid read it
requantized (Q1→DQ1→Q2→DQ2, onnxruntime's "convert"). Five shapes, as onnxruntime writes them:

1. every reader converted:              ``T → Q1 → DQ1 → Q2 → DQ2 → readers``
2. some readers converted:              ``T → Q1 → DQ1 → original readers``, and
   ``Q1 → DQ1' → Q2 → DQ2 → converted readers`` (DQ1' is a clone of DQ1 that only Q2 reads,
   so an accelerator can fuse DQ1'→Q2 into one conversion without breaking DQ1's group)
3. as 1, ``T`` also a graph output:     DQ2 takes the graph output's name
4. as 2, ``T`` also a graph output:     DQ1 takes the graph output's name
5. ``T`` a graph output nobody reads:   ``T → Q1 → DQ1 → Q2 → DQ2 → graph output``

Names follow onnxruntime: ``<t>_QuantizeLinear``/``<t>_DequantizeLinear`` for the first grid,
``<t>_convert_QuantizeLinear``/``<t>_convert_DequantizeLinear`` for the second,
``<t>_convert_clone_DequantizeLinear`` (output ``<t>_convert_clone_QuantizeLinear_Input``) for
DQ1', parameters ``<t>_scale_convert`` and ``<t>_zero_point_convert``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import onnx_ir as ir

from onnxquant.core.names import UniqueNames
from onnxquant.core.plan import TensorQuant

__all__: list[str] = []

CONVERT_SUFFIX = "_convert"


class _Emitter(Protocol):
    """What this module uses of the QDQ emitter (:mod:`onnxquant.emitters.qdq`)."""

    names: UniqueNames

    def params(self, graph: ir.Graph, tq: TensorQuant, suffix: str = "") -> list[ir.Value]: ...

    def node(self, graph: ir.Graph, op: str, inputs: list[ir.Value], stem: str,
             axis: int | None, dtype: ir.DataType, suffix: str = "") -> ir.Value: ...

    def qdq_pair(self, graph: ir.Graph, value: ir.Value, tq: TensorQuant,
                 readers: Sequence[tuple[ir.Node, int]], suffix: str,
                 outputs: list[int]) -> None: ...


def emit_convert(emitter: _Emitter, graph: ir.Graph, value: ir.Value, tq: TensorQuant,
                 readers: Sequence[tuple[ir.Node, int]], outputs: list[int]) -> None:
    """Q1→DQ1→Q2→DQ2 on ``value`` (planned ``tq`` with a ``convert``), read by ``readers``
    and by the graph outputs at the positions ``outputs`` (empty unless the producer is
    quantized)."""
    convert = tq.convert
    assert convert is not None
    wanted = None if convert.readers is None else set(convert.readers)
    converted = [r for r in readers if wanted is None or (r[0].name or "") in wanted]
    original = [r for r in readers if wanted is not None and (r[0].name or "") not in wanted]
    if not converted and original:  # only readers of the first grid (the others read floats)
        emitter.qdq_pair(graph, value, tq, original, "", outputs)
        return
    float_type = value.dtype or ir.DataType.FLOAT
    first = emitter.params(graph, tq)
    second = emitter.params(graph, convert.params, CONVERT_SUFFIX)
    name = tq.name
    q1 = emitter.node(graph, "QuantizeLinear", [value, *first], name, tq.axis,
                      tq.quant_type.onnx_dtype)
    dq1 = emitter.node(graph, "DequantizeLinear", [q1, *first], name, tq.axis, float_type)
    q2_input = dq1
    if original:  # DQ1' feeds Q2 alone
        q2_input = emitter.node(graph, "DequantizeLinear", [q1, *first],
                                f"{name}{CONVERT_SUFFIX}_clone", tq.axis, float_type)
        q2_input.name = emitter.names.new(f"{name}{CONVERT_SUFFIX}_clone_QuantizeLinear_Input")
    stem = f"{name}{CONVERT_SUFFIX}"
    q2 = emitter.node(graph, "QuantizeLinear", [q2_input, *second], stem, None,
                      convert.params.quant_type.onnx_dtype)
    dq2 = emitter.node(graph, "DequantizeLinear", [q2, *second], stem, None, float_type)
    for node, index in original:
        node.replace_input_with(index, dq1)
    for node, index in converted:
        node.replace_input_with(index, dq2)
    if outputs:
        final = dq1 if original else dq2
        value.name = emitter.names.new(f"{name}_QuantizeLinear_Input")
        final.name = name
        for i in outputs:
            graph.outputs[i] = final
