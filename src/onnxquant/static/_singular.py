"""Which values reach a singular-domain input (see ``rules.SINGULAR_INPUTS``) on a grid.

A value reaches such an input directly, or through ops that hand its grid on: ops that only
move, pick or clip values (Reshape, Transpose, Slice, Gather, Concat, MaxPool, Relu, Clip, ...)
and elementwise affine maps by a constant (``x + eps``, ``x * c``, ``x / c``, ``-x``). Such a
value must not carry a grid: its producer gives it no QuantizeLinear/DequantizeLinear pair, and
the grid-handing ops on the way stay float (quantized, they would read their input through a
DequantizeLinear and hand its grid on).

A guard (``Clip(min=1e-10)``, ``+ 1e-6``) keeps the singular op finite on any input, but a grid
still puts the guarded value at the guard where the float value is not (a step rounds a small
power to 0, so log gives -23 instead of -7; a variance ``x*x`` rounds to 0 while ``x`` does not,
so ``x / sqrt(x*x + eps)`` gives ``x * 1e3`` instead of 1): the chain goes on through guards.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from onnxquant.core.external_data import read_array
from onnxquant.static.rules import singular_input

__all__ = ["GRID_KEEPING_OPS", "OVERFLOWING_OPS", "singular_reach", "grid_keeping_nodes",
           "may_turn_nonfinite"]

GRID_KEEPING_OPS: frozenset[str] = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather",
    "GatherElements", "GatherND", "Split", "Concat", "Pad", "MaxPool", "Expand", "Tile",
    "Resize", "DepthToSpace", "SpaceToDepth", "ReduceMax", "ReduceMin", "Relu", "Clip",
    "Neg", "Abs",
})

# Elementwise ops that are affine maps of one input when the other is a constant: input index
# -> the other input, per op (Div only maps its dividend).
_AFFINE: dict[str, dict[int, int]] = {
    "Add": {0: 1, 1: 0}, "Sub": {0: 1, 1: 0}, "Mul": {0: 1, 1: 0}, "Div": {0: 1},
}

_MAX_DEPTH = 32  # grid-keeping ops followed from one value

OVERFLOWING_OPS: frozenset[str] = frozenset({
    "Exp", "Softplus", "Cosh", "Sinh", "Tan", "Acos", "Asin", "Acosh", "Atanh", "LogSoftmax",
    "ReduceLogSum", "ReduceLogSumExp",
})
"""Ops that can turn finite inputs into NaN/Inf by overflow or outside their domain, besides
the singular inputs of :data:`~onnxquant.static.rules.SINGULAR_INPUTS`."""


def _constant_without_zeros(value: ir.Value | None) -> bool:
    if value is None or value.const_value is None:
        return False
    return bool((read_array(value.const_value) != 0).all())


def _may_turn_nonfinite(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return node.domain != "com.microsoft" or node.op_type.startswith("Q")  # unknown math
    if node.op_type in OVERFLOWING_OPS:
        return True
    if node.op_type in ("Div", "Mod"):  # a constant divisor without zeros is harmless
        return not _constant_without_zeros(node.inputs[1] if len(node.inputs) > 1 else None)
    if node.op_type not in ("Log", "Reciprocal", "Sqrt", "Pow") or not node.inputs:
        return False
    value = node.inputs[0]
    return value is not None and value.const_value is None \
        and singular_input(node, 0) is not None


def may_turn_nonfinite(model: ir.Model) -> bool:
    """Whether any op of ``model`` (subgraphs included) can give NaN/Inf for finite inputs: a
    singular-domain input that is not a safe constant, an overflowing op, or an op of an
    unknown domain. Models without one cannot gain NaN/Inf from quantization (every
    dequantized value is finite and bounded), so the check after emission is skipped for them.
    """
    return any(_may_turn_nonfinite(node)
               for node in ir.traversal.RecursiveGraphIterator(model.graph))


def _keeps_grid(node: ir.Node, index: int) -> bool:
    """Whether input ``index`` of ``node`` reaches its outputs as a grid (moved, picked,
    clipped, or mapped by a constant affine map)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    other = _AFFINE.get(node.op_type, {}).get(index)
    if other is not None:
        value = node.inputs[other] if other < len(node.inputs) else None
        return value is not None and value.const_value is not None
    if node.op_type not in GRID_KEEPING_OPS:
        return False
    return index == 0 or node.op_type == "Concat"


def singular_reach(value: ir.Value) -> str | None:
    """Why ``value`` must not carry a grid (None when it may): the singular-domain input it
    reaches, directly or through grid-keeping ops."""
    stack, seen = [(value, 0)], {value}
    while stack:
        current, depth = stack.pop()
        for node, index in current.uses():
            why = singular_input(node, index)
            if why is not None:
                return why
            if depth < _MAX_DEPTH and _keeps_grid(node, index):
                for out in node.outputs:
                    if out not in seen:
                        seen.add(out)
                        stack.append((out, depth + 1))
    return None


def grid_keeping_nodes(nodes: Iterable[ir.Node]) -> dict[ir.Node, str]:
    """The grid-keeping nodes among ``nodes`` whose outputs reach a singular-domain input;
    they stay float (with the reason)."""
    found = {}
    for node in nodes:
        if not any(_keeps_grid(node, i) for i in range(len(node.inputs))):
            continue
        for out in node.outputs:
            why = singular_reach(out)
            if why is not None:
                found[node] = f"its output reaches a singular-domain input: {why}"
                break
    return found
