"""The moves of the accuracy-target search, each a named change of a :class:`State`.

- *config* moves on the whole model: another calibration method (MSE chooses each tensor's
  clip range by that tensor's own expected error — the per-tensor choice of method), per-channel
  weights;
- *corrections*: SmoothQuant, cross-layer equalization, bias correction
  (:mod:`onnxquant.static.corrections`);
- *node* moves from the debugging report of the best model so far
  (:func:`onnxquant.debug.compare`): an activation whose own quantization error is large gets 16
  bits (QDQ) — or stays float with its producer and readers (QOperator, one element type per
  kernel); every layer of an op type, when that gains clearly more than any single layer; the
  layers of the sensitivity ranking: 16-bit inputs first (weights stay 8-bit, so the size
  barely changes), then float, then float with the quantized layers that write its inputs
  (left out alone, a layer still reads quantized inputs);
- 16-bit activations everywhere as a probe (QDQ: every activation overridden); when that meets
  the target, the fewest activations (worst own error first) that still meet it are found by
  bisection — the rest go back to 8 bits and their integer kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from onnxquant.core.plan import QuantPlan
from onnxquant.core.qtypes import QuantFormat
from onnxquant.static.config import CalibrationMethod
from onnxquant.target.candidates import State, wide_type

__all__ = ["Move", "config_moves", "correction_moves", "node_moves", "last_resort",
           "widening_order", "widen_worst", "EVERYWHERE", "TENSOR_MOVES", "LAYER_MOVES",
           "GROUP_MARGIN_DB"]

EVERYWHERE = "16-bit activations everywhere"
"""The description of the 16-bit probe."""
TENSOR_MOVES = 3
"""Activations (worst own quantization SQNR first) tried as tensor moves."""
GROUP_MARGIN_DB = 3.0
"""An op-type group is tried when its gain beats the best single layer's by this much."""
LAYER_MOVES = 8
"""Layers of the sensitivity ranking tried as layer moves."""


@dataclasses.dataclass(frozen=True)
class Move:
    """A named change of the search state (``apply(state) -> state``)."""

    description: str
    apply: Callable[[State], State]


def config_moves(state: State) -> list[Move]:
    """Another calibration method, then per-channel weights."""
    config = state.config
    moves = []
    if not config.moving_average:
        for method in (CalibrationMethod.MSE, CalibrationMethod.PERCENTILE,
                       CalibrationMethod.ENTROPY):
            if method is not config.calibration_method:
                moves.append(Move(f"calibration {method.value}", _with_config(
                    calibration_method=method)))
    if not config.per_channel:
        moves.append(Move("per-channel weights", _with_config(per_channel=True)))
    return moves


CORRECTIONS = {"smooth_quant": "SmoothQuant", "equalize_layers": "cross-layer equalization",
               "bias_correction": "bias correction"}
"""Config fields of the corrections, with the name a move shows."""


def correction_moves(state: State, applicable: Callable[[str], bool]) -> list[Move]:
    """The corrections that find something to change in the model."""
    return [Move(name, _with_config(**{field: True}))
            for field, name in CORRECTIONS.items()
            if not getattr(state.config, field) and applicable(field)]


def last_resort(state: State) -> list[Move]:
    """16-bit activations everywhere, for formats that cannot mix widths (QOperator): slow,
    onnxruntime runs them in float."""
    narrow = state.config.activation_type
    if narrow.bits >= 16 or narrow.is_float or state.config.format is QuantFormat.QDQ:
        return []
    wide = wide_type(narrow)
    return [Move(f"{wide.name} activations everywhere", _with_config(activation_type=wide))]


def widening_order(report: Any, plan: QuantPlan) -> list[str]:
    """The activations ``plan`` quantizes on its own grid, worst own quantization SQNR first
    (those the report could not measure last)."""
    own = [name for name, t in plan.tensors.items()
           if t.role == "activation" and not t.source.startswith("shared:")]
    measured = {name: a.quantization_sqnr_db for name, a in report.activations.items()
                if a.quantization_sqnr_db is not None}
    return sorted(own, key=lambda n: (n not in measured, measured.get(n, 0.0)))


def widen_worst(order: list[str], count: int) -> Move:
    """16 bits for the first ``count`` activations of ``order`` (QDQ)."""
    every = count == len(order)
    description = EVERYWHERE if every else \
        f"16-bit for the {count} worst activations"
    reason = "accuracy target (16-bit probe)" if every else \
        f"accuracy target (among the {count} activations with the worst own error)"
    return Move(description, _widening(set(order[:count]), reason))


def node_moves(report: Any, model: ir.Model, plan: QuantPlan, state: State) -> list[Move]:
    """Tensor, group and layer moves from a debugging report of the best model so far, in
    the order they are tried."""
    widen = state.config.format is QuantFormat.QDQ and state.config.activation_type.bits < 16
    nodes = {n.name: n for n in model.graph if n.name}
    planned = {name for name, d in plan.nodes.items() if d.action == "quantize"}
    moves = _tensor_moves(report, model, planned, plan, widen, state)
    moves += _group_moves(report, nodes, planned, plan, widen, state)
    for layer in report.ranked_layers()[:LAYER_MOVES]:
        name = layer.quantized_node if layer.quantized_node in planned else layer.node
        if name not in planned:
            continue
        gain = f"{layer.sensitivity_db:+.1f} dB" if layer.sensitivity_db is not None \
            else f"isolated {layer.isolated_sqnr_db:.1f} dB"
        reason = f"accuracy target (layer {gain})"
        if widen and (tensors := _activations(plan, {name}, outputs=False) - set(state.wide)):
            moves.append(Move(f"16-bit inputs of {name}", _widening(tensors, reason)))
        moves.append(Move(f"float layer {name}", _floating({name: reason})))
        node = nodes.get(name)
        feeders = {p.name for v in (node.inputs if node is not None else ())
                   if v is not None and (p := v.producer()) is not None and p.name in planned}
        if feeders:
            moves.append(Move(f"float layer {name} and its inputs", _floating(
                {name: reason, **dict.fromkeys(feeders, f"input of {name}")})))
    return moves


def _tensor_moves(report: Any, model: ir.Model, planned: set[str], plan: QuantPlan,
                  widen: bool, state: State) -> list[Move]:
    values = {v.name: v for n in model.graph for v in n.outputs if v.name}
    values.update({v.name: v for v in model.graph.inputs if v.name})
    moves = []
    worst = sorted((a for a in report.activations.values()
                    if a.quantization_sqnr_db is not None),
                   key=lambda a: a.quantization_sqnr_db)[:TENSOR_MOVES]
    for act in worst:
        why = f"own quantization SQNR {act.quantization_sqnr_db:.1f} dB"
        if widen and act.name in plan.tensors:
            if act.name not in state.wide:
                moves.append(Move(f"16-bit tensor {act.name}", _widening({act.name}, why)))
            continue
        value = values.get(act.name)
        if value is None:
            continue
        producer = value.producer()
        touching = [producer] if producer is not None else []
        touching += [n for n, _ in value.uses()]
        names = {n.name for n in touching if n.name in planned}
        if names:
            moves.append(Move(f"float tensor {act.name}", _floating(
                dict.fromkeys(names, f"tensor '{act.name}' stays float ({why})"))))
    return moves


def _group_moves(report: Any, nodes: dict[str, ir.Node], planned: set[str], plan: QuantPlan,
                 widen: bool, state: State) -> list[Move]:
    """Every layer of an op type, for the op types whose group gain clearly beats the best
    single layer's (the error is spread over that kind of layer)."""
    best_layer = max((x.sensitivity_db or 0.0 for x in report.layers), default=0.0)
    moves = []
    for op, gain in sorted(report.op_type_sensitivity.items(), key=lambda kv: -kv[1]):
        if gain < best_layer + GROUP_MARGIN_DB:
            break
        names = {n for n, node in nodes.items() if node.op_type == op and n in planned}
        reason = f"accuracy target (every {op}: {gain:+.1f} dB)"
        if widen and (tensors := _activations(plan, names, outputs=False) - set(state.wide)):
            moves.append(Move(f"16-bit every {op}", _widening(tensors, reason)))
        if names:
            moves.append(Move(f"float every {op}", _floating(dict.fromkeys(names, reason))))
    return moves


def _activations(plan: QuantPlan, nodes: set[str], outputs: bool = True) -> set[str]:
    """The activations the plan quantizes as inputs (and outputs) of ``nodes``.

    A layer move widens only the inputs: with a 16-bit input and output around an 8-bit
    weight, onnxruntime 1.32 turns DequantizeLinear + MatMul into MatMulNBits with
    ``accuracy_level`` 4, which quantizes the activation to 8 bits per block again.
    """
    names: set[str] = set()
    for node in nodes:
        decision = plan.nodes.get(node)
        if decision is not None:
            names.update(decision.inputs.values())
            if outputs:
                names.update(decision.outputs)
    return {t for t in names if t in plan.tensors and plan.tensors[t].role == "activation"}


def _with_config(**changes: Any) -> Callable[[State], State]:
    return lambda s: dataclasses.replace(s, config=dataclasses.replace(s.config, **changes))


def _floating(nodes: dict[str, str]) -> Callable[[State], State]:
    return lambda s: dataclasses.replace(s, keep_float={**s.keep_float, **nodes})


def _widening(tensors: set[str], reason: str) -> Callable[[State], State]:
    return lambda s: dataclasses.replace(
        s, wide={**s.wide, **dict.fromkeys(sorted(tensors), reason)})
