"""Which Convs/MatMuls/Gemms stay float because their integer form is measured slower.

The nodes are walked in topological order. For every Conv, MatMul or Gemm with a constant
weight, the cost model (:mod:`onnxquant.core.costs`) gives its float and integer kernel times
and the transitions the integer form causes:

- a node whose input is float anyway (a graph input, or computed only by float nodes) opens
  an integer region: its integer form pays a QuantizeLinear of its input;
- a node inside an integer region that stays float pays a DequantizeLinear of its input
  (re-entering is charged to the next integer node, which then opens a region);
- a node no selected node reads (a graph output, or only float readers) pays a
  DequantizeLinear of its output when it is integer.

With ``Objective.SPEED`` the node stays float when its integer total is larger;
``BALANCED`` quantizes some of those anyway (:func:`onnxquant.core.objective.balanced_accepts`);
``SIZE`` keeps none float. A node staying float keeps its elementwise tail float too (see
:func:`onnxquant.static.selection.slow_depthwise`). Nodes the user named are never kept
float; their costs still count in the estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

import onnx_ir as ir

from onnxquant.core.costs import CostModel, NodeSpec, default_cost_model, node_spec
from onnxquant.core.graph import is_constant, is_float
from onnxquant.core.objective import Budget, NodeCost, Objective, as_objective, summed
from onnxquant.core.qtypes import UINT8, QuantFormat
from onnxquant.static.config import StaticQuantConfig
from onnxquant.static.rules import rule_for
from onnxquant.static.selection import _add_tail

__all__ = ["CostChoice", "choose_by_cost", "node_cost", "speed_choice"]

_ANCHORS = frozenset({"Conv", "MatMul", "Gemm"})


@dataclasses.dataclass
class CostChoice:
    """What the cost model decided.

    Attributes:
        floats: Node -> why it stays float (slower anchors and their elementwise tails).
        costs: Every measured anchor with its cost and whether it is quantized.
        accepted: Slower nodes ``balanced`` quantized anyway (node -> note).
        objective: The objective decided for.
    """

    floats: dict[ir.Node, str] = dataclasses.field(default_factory=dict)
    costs: list[tuple[ir.Node, NodeCost, bool]] = dataclasses.field(default_factory=list)
    accepted: dict[ir.Node, str] = dataclasses.field(default_factory=dict)
    objective: Objective = Objective.BALANCED

    def estimate(self) -> dict[str, float | int | str | bool]:
        """The measured nodes' total time in float and as planned (for the plan's settings
        and the summary)."""
        float_ms, planned_ms = summed([(c, q) for _, c, q in self.costs])
        return {"objective": self.objective.value, "measured": True, "float_ms": round(float_ms, 4),
                "quantized_ms": round(planned_ms, 4), "nodes": len(self.costs),
                "kept_float": sum(1 for _, _, q in self.costs if not q),
                "accepted_slower": len(self.accepted)}


def node_cost(model: CostModel, spec: NodeSpec, *, entering: bool, exits: bool,
              form: str = "integer") -> NodeCost | None:
    """A node's float and integer totals with the transitions described in the module
    docstring (None when a kernel cannot be measured)."""
    float_ms, integer_ms = model.node_ms(spec, "float"), model.node_ms(spec, form)
    if float_ms is None or integer_ms is None:
        return None
    if form == "integer":
        direction, elements = ("quantize", spec.input_elements) if entering \
            else ("dequantize", spec.input_elements)
        step = model.transition_ms(direction, elements) or 0.0
        if entering:
            integer_ms += step
        else:
            float_ms += step
        if exits:
            integer_ms += model.transition_ms("dequantize", spec.output_elements) or 0.0
    return NodeCost(float_ms, integer_ms, spec.weight_elements * 3)


def _reason(cost: NodeCost, objective: Objective) -> str:
    return (f"integer form measured slower than float ({cost.describe()}; objective "
            f"{objective.value})")


def choose_by_cost(nodes: list[ir.Node], model: CostModel, objective: Objective, *,
                   qformat: QuantFormat = QuantFormat.QDQ,
                   forced: Collection[ir.Node] = (),
                   kept: Mapping[ir.Node, str] | None = None) -> CostChoice:
    """Decide which of ``nodes`` (selected, in topological order) stay float for speed.

    Args:
        nodes: The selected nodes.
        model: The cost model.
        objective: What to optimise (see :class:`onnxquant.core.costs.Objective`).
        qformat: The output format (only to look up op rules).
        forced: Nodes the user named: quantized whatever they cost.
        kept: Nodes already staying float for other reasons (read, not changed).
    """
    kept = kept or {}
    choice = CostChoice(objective=objective)
    selected = set(nodes)
    floating: set[ir.Value] = set()
    budget = Budget(objective)

    def float_anyway(value: ir.Value | None) -> bool:
        if value is None or not is_float(value) or is_constant(value):
            return False
        producer = value.producer()
        return (value in floating or producer is None
                or (producer not in selected and producer.op_type != "DequantizeLinear"))

    for node in nodes:
        if node in kept or node in choice.floats:
            floating.update(node.outputs)
            continue
        spec = node_spec(node) if node.op_type in _ANCHORS else None
        if spec is None:
            data = [v for v in node.inputs if v is not None and not is_constant(v)]
            rule = rule_for(node, qformat)
            if data and all(float_anyway(v) for v in data) and rule is not None \
                    and not rule.anchor:
                floating.update(node.outputs)
            continue
        cost = node_cost(model, spec, entering=float_anyway(node.inputs[0]),
                         exits=_exits(node, selected))
        if cost is None:
            continue
        quantize, accepted = budget.decide(cost, node in forced)
        if accepted:
            choice.accepted[node] = f"quantized although slower ({cost.describe()}): balanced"
        choice.costs.append((node, cost, quantize))
        if not quantize:
            choice.floats[node] = _reason(cost, objective)
            _add_tail(node, selected, choice.floats)
            floating.update(node.outputs)
    return choice


def _exits(node: ir.Node, selected: set[ir.Node]) -> bool:
    """Whether no selected node reads ``node``'s output (its integer form ends a region)."""
    out = node.outputs[0]
    return out.is_graph_output() or not any(c in selected for c, _ in out.uses())


def speed_choice(nodes: list[ir.Node], config: StaticQuantConfig, forced: Collection[ir.Node],
                 kept: Mapping[ir.Node, str]) -> CostChoice | None:
    """The cost model's choice for ``config`` (None when there is no cost model: measuring is
    off and none was given, or the types are not the uint8-activation, 8-bit-weight ones
    whose kernels it measures; the fixed rules decide then)."""
    if config.activation_type != UINT8 or config.weight_type.bits != 8 \
            or config.weight_type.is_float or any(o.quant_type is not None
                                                  for o in config.tensors.values()):
        return None
    model = config.cost_model if config.cost_model is not None \
        else default_cost_model(config.measure_costs)
    if model is None:
        return None
    choice = choose_by_cost(nodes, model, as_objective(config.objective), qformat=config.format,
                            forced=forced, kept=kept)
    save = getattr(model, "save", None)
    if callable(save):
        save()
    return choice
