"""Fold a float HardSigmoid into the integer Conv that feeds it.

``HardSigmoid(y) = clip(alpha * y + beta, 0, 1)`` has no integer operator in onnxruntime, so
it would run as DequantizeLinear → HardSigmoid → QuantizeLinear (the gate of every
squeeze-excite block of a MobileNetV3). When ``y`` is written by an integer Conv for nobody
else, the Conv can write the HardSigmoid's output itself: ``alpha * (W x + b) + beta =
alpha * (W x + b + beta / alpha)``, so with ``beta / alpha`` added to its bias and the output
parameters ``(scale_h / alpha, zero_point_h)`` of the HardSigmoid's output grid, the Conv's
requantization computes ``round((alpha * y + beta) / scale_h) + zero_point_h``. Its 8-bit
saturation is the clip, as long as the output grid lies inside [0, 1] (the grid of a
calibrated HardSigmoid output always does: it holds 0 and its calibrated maximum is ≤ 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxquant.core.bias import quantize_bias
from onnxquant.core.errors import NumericsError
from onnxquant.core.external_data import read_array
from onnxquant.core.graph import is_constant, is_float
from onnxquant.core.plan import NodeDecision, QuantPlan, TensorQuant

__all__ = ["HardSigmoidFold", "find_hard_sigmoid_fold", "fold_hard_sigmoids"]

_GRID_SLACK = 1e-6  # relative: float32 scales put the grid's end a hair off 1.0


@dataclasses.dataclass(frozen=True)
class HardSigmoidFold:
    """``node`` (a HardSigmoid) reads the output ``y`` of the integer Conv ``producer``."""

    node: ir.Node
    producer: ir.Node
    y: ir.Value
    alpha: float
    beta: float
    bias: np.ndarray  # the Conv's new float bias, b + beta / alpha


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return float(attr.value) if attr is not None else default


def _inside_unit(tq: TensorQuant) -> bool:
    """Whether every value of the per-tensor grid ``tq`` lies in [0, 1]."""
    qtype, scale, zp = tq.quant_type, tq.scale[0], tq.zero_point[0]
    return (qtype.qmin - zp) * scale >= -_GRID_SLACK and \
        (qtype.qmax - zp) * scale <= 1.0 + _GRID_SLACK


def find_hard_sigmoid_fold(node: ir.Node, integer: set[ir.Node],
                           decisions: dict[ir.Node, NodeDecision],
                           plan: QuantPlan) -> HardSigmoidFold | None:
    """The fold of the HardSigmoid ``node`` into its integer Conv, or None."""
    if node.op_type != "HardSigmoid" or node.domain not in ("", "ai.onnx") or node in integer:
        return None
    y, h = node.inputs[0], node.outputs[0]
    producer = y.producer() if y is not None else None
    if y is None or producer is None or producer not in integer or producer.op_type != "Conv":
        return None
    if len(y.uses()) != 1 or y.is_graph_output() or h.is_graph_output():
        return None
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    if not (np.isfinite(alpha) and np.isfinite(beta) and alpha > 0):
        return None
    decision = decisions[producer]
    y_tq, h_tq = plan.tensors.get(y.name or ""), plan.tensors.get(h.name or "")
    if y_tq is None or h_tq is None or h_tq.axis is not None or h_tq.qtype != y_tq.qtype:
        return None
    if y.name not in decision.outputs or not _inside_unit(h_tq):
        return None
    bias = decision.bias
    value = producer.inputs[bias.input] if bias is not None else None
    if bias is None or value is None or not is_constant(value) or not is_float(value):
        return None
    scale = np.asarray(bias.scale, dtype=np.float64)
    if np.any(scale <= 0):
        return None  # a zero bias scale would drop beta / alpha
    new_bias = read_array(value.const_value).astype(np.float64) + beta / alpha  # type: ignore[arg-type]
    try:
        quantize_bias(new_bias, np.float32(1.0), scale.astype(np.float32), name=bias.tensor)
    except NumericsError:
        return None
    return HardSigmoidFold(node, producer, y, alpha, beta, new_bias.astype(np.float32))


def fold_hard_sigmoids(order: list[ir.Node], integer: set[ir.Node],
                       decisions: dict[ir.Node, NodeDecision], plan: QuantPlan,
                       constant: Callable[[ir.Node, str, np.ndarray], ir.Value], *,
                       kernel_grid: dict[ir.Value, str] | None = None) -> dict[ir.Value, str]:
    """Fold every foldable HardSigmoid of ``order`` into its Conv (see the module docstring).

    ``constant(node, stem, array)`` adds an initializer to the graph of ``node`` (the new
    bias). Folded HardSigmoids leave the graph. Returns, for each Conv output that took a
    HardSigmoid's place, the plan tensor holding the grid its kernel writes on, added to
    ``kernel_grid`` (outputs already there, e.g. from :func:`fold_scales`, are left alone).
    """
    kernel_grid = {} if kernel_grid is None else kernel_grid
    for node in order:
        if node.graph is None:
            continue
        fold = find_hard_sigmoid_fold(node, integer, decisions, plan)
        if fold is not None and fold.y not in kernel_grid:
            kernel_grid[fold.y] = _apply(fold, decisions, plan, constant)
    return kernel_grid


def _apply(fold: HardSigmoidFold, decisions: dict[ir.Node, NodeDecision], plan: QuantPlan,
           constant: Callable[[ir.Node, str, np.ndarray], ir.Value]) -> str:
    node, producer, y = fold.node, fold.producer, fold.y
    h = node.outputs[0]
    y_name, h_name = y.name or "", h.name or ""
    decision = decisions[producer]
    assert decision.bias is not None
    stem = f"{decision.bias.tensor}_hardsigmoid"
    new_bias = constant(producer, stem, fold.bias)
    producer.replace_input_with(decision.bias.input, new_bias)
    decision.bias = dataclasses.replace(decision.bias, tensor=new_bias.name or stem)
    h_tq = plan.tensors[h_name]
    plan.tensors[y_name] = dataclasses.replace(
        h_tq, name=y_name, scale=[s / fold.alpha for s in h_tq.scale],
        source=f"folded:{node.name}", range=None)
    decision.outputs[decision.outputs.index(y_name)] = h_name
    decision.reason = "; ".join(filter(None, [
        decision.reason, f"writes the output of the HardSigmoid '{node.name}' (alpha "
        f"{fold.alpha:.6g}, beta {fold.beta:.6g} folded into its bias and output scale)"]))
    h.replace_all_uses_with(y, replace_graph_outputs=True)
    assert node.graph is not None
    node.graph.remove(node, safe=True)
    h.name = f"{h_name}_folded"
    y.name = h_name
    return y_name
