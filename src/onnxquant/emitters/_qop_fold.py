"""Fold a multiplication by a positive constant into the output grid of an integer producer.

In QOperator form every integer node requantizes its result onto its output's grid, so
``y = x * c`` (or ``x / c``) with a constant scalar ``c > 0`` right after an integer node that
writes ``x`` for nobody else costs a whole QLinearMul for nothing: the producer can write ``y``
directly on y's grid by taking ``(scale_y / c, zero_point_y)`` as its output parameters
(``round(v / (scale_y / c)) = round(v * c / scale_y)``). This drops the ``/ 6`` of every
decomposed HardSwish (``x * relu6(x + 3) / 6``) and skips one rounding step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxquant.core.external_data import read_array
from onnxquant.core.graph import is_constant, is_float
from onnxquant.core.plan import NodeDecision, QuantPlan

__all__ = ["ScaleFold", "find_scale_fold", "apply_scale_fold", "fold_scales"]

# Integer producers whose output parameters are free: they requantize onto any (scale, zero
# point). Movement ops share their input's grid; QLinearSoftmax writes a fixed grid.
FREE_OUTPUT = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul", "Div", "AveragePool",
                         "GlobalAveragePool", "Sigmoid", "LeakyRelu"})


@dataclasses.dataclass(frozen=True)
class ScaleFold:
    """``node`` computes ``x * factor`` from the output ``x`` of ``producer``."""

    node: ir.Node
    producer: ir.Node
    x: ir.Value
    factor: float


def _constant_factor(node: ir.Node) -> tuple[int, float] | None:
    """``(index of the variable input, c)`` when ``node`` is ``x * c`` or ``x / c`` with a
    finite positive scalar constant ``c``."""
    if node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    candidates = (1,) if node.op_type == "Div" else (1, 0)
    for index in candidates:
        value = node.inputs[index]
        if value is None or not is_constant(value) or not is_float(value):
            continue
        data = read_array(value.const_value).astype(np.float64)  # type: ignore[arg-type]
        if data.size != 1 or not np.isfinite(data).all() or float(data.reshape(-1)[0]) <= 0:
            return None
        c = float(data.reshape(-1)[0])
        factor = 1.0 / c if node.op_type == "Div" else c
        return (1 - index, factor) if np.isfinite(factor) and factor > 0 else None
    return None


def find_scale_fold(node: ir.Node, integer: set[ir.Node],
                    decisions: dict[ir.Node, NodeDecision], plan: QuantPlan) -> ScaleFold | None:
    """The fold of ``node`` into its integer producer, or None when it cannot be folded."""
    found = _constant_factor(node)
    if found is None or node not in integer:
        return None
    index, factor = found
    x, y = node.inputs[index], node.outputs[0]
    producer = x.producer() if x is not None else None
    if x is None or producer is None or producer not in integer:
        return None
    if producer.op_type not in FREE_OUTPUT or producer.domain not in ("", "ai.onnx"):
        return None
    if len(x.uses()) != 1 or x.is_graph_output() or y.is_graph_output():
        return None
    x_tq, y_tq = plan.tensors.get(x.name or ""), plan.tensors.get(y.name or "")
    if x_tq is None or y_tq is None or y_tq.axis is not None or x_tq.qtype != y_tq.qtype:
        return None
    if x.name not in decisions[producer].outputs or y.name not in decisions[node].outputs:
        return None
    return ScaleFold(node, producer, x, factor)


def fold_scales(order: list[ir.Node], integer: set[ir.Node],
                decisions: dict[ir.Node, NodeDecision], plan: QuantPlan) -> dict[ir.Value, str]:
    """Fold every foldable Mul/Div of ``order`` (graph order) into its producer.

    Folded nodes leave the graph and ``integer``; their decisions become ``remove``. Returns,
    for each producer output that took a folded node's place, the plan tensor holding the grid
    its kernel writes on (readers see the folded node's output parameters).
    """
    kernel_grid: dict[ir.Value, str] = {}
    for node in order:
        fold = find_scale_fold(node, integer, decisions, plan)
        if fold is None or fold.x in kernel_grid:  # one fold per producer output
            continue
        kernel_grid[fold.x] = apply_scale_fold(fold, decisions, plan)
        integer.discard(node)
    return kernel_grid


def apply_scale_fold(fold: ScaleFold, decisions: dict[ir.Node, NodeDecision],
                     plan: QuantPlan) -> str:
    """Remove the Mul/Div node: the producer's output takes its place (and name), and keeps
    y's parameters for every reader; the producer's kernel writes on the grid recorded in the
    plan under x's old name, which is returned."""
    node, x = fold.node, fold.x
    y = node.outputs[0]
    x_name, y_name = x.name or "", y.name or ""
    y_tq = plan.tensors[y_name]
    plan.tensors[x_name] = dataclasses.replace(
        y_tq, name=x_name, scale=[s / fold.factor for s in y_tq.scale],
        source=f"folded:{node.name}",
        range=None if y_tq.range is None else (y_tq.range[0] / fold.factor,
                                               y_tq.range[1] / fold.factor))
    outputs = decisions[fold.producer].outputs
    outputs[outputs.index(x_name)] = y_name
    decision = decisions[node]
    decision.action = "remove"
    decision.reason = (f"the factor {fold.factor:.6g} is folded into the output scale of "
                       f"'{fold.producer.name}'")
    y.replace_all_uses_with(x)
    assert node.graph is not None
    node.graph.remove(node, safe=True)
    y.name = f"{y_name}_folded"
    x.name = y_name
    return x_name
