"""Which dynamic candidates stay float because their dynamic form is measured slower.

Dynamic quantization replaces a Conv by DynamicQuantizeLinear + ConvInteger + Cast + Mul
(+ Add) and a MatMul/Gemm by the MatMulInteger form that onnxruntime fuses into
DynamicQuantizeMatMul. Both read and write float, so there are no region transitions: the
cost model (:mod:`onnxquant.core.costs`) compares the whole dynamic form with the float node,
for Convs between float neighbours (see :func:`_times`).
ConvInteger has no fused kernel in onnxruntime's CPU provider, so most Convs are slower.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxquant.core.costs import ConvSpec, CostModel, NodeSpec, default_cost_model, node_spec
from onnxquant.core.objective import Budget, NodeCost, Objective, as_objective, summed
from onnxquant.core.qtypes import QuantFormat
from onnxquant.dynamic.config import DynamicQuantConfig

__all__ = ["DynamicCosts", "dynamic_costs"]

_MEASURED = frozenset({"Conv", "MatMul", "Gemm"})


@dataclasses.dataclass
class DynamicCosts:
    """What the cost model decided for one dynamic run.

    Attributes:
        floats: Node -> why it stays float.
        costs: Measured candidates with their cost and whether they are quantized.
        objective: The objective decided for.
    """

    objective: Objective
    floats: dict[ir.Node, str] = dataclasses.field(default_factory=dict)
    costs: list[tuple[ir.Node, NodeCost, bool]] = dataclasses.field(default_factory=list)
    accepted: int = 0

    def estimate(self) -> dict[str, float | int | str | bool]:
        """Float vs planned time of the measured nodes (before rewriting; a node a handler
        then keeps float for another reason still counts as quantized)."""
        float_ms, planned_ms = summed([(c, q) for _, c, q in self.costs])
        return {"objective": self.objective.value, "measured": True,
                "float_ms": round(float_ms, 4), "quantized_ms": round(planned_ms, 4),
                "nodes": len(self.costs), "kept_float": len(self.floats),
                "accepted_slower": self.accepted}


def _named(node: ir.Node, config: DynamicQuantConfig) -> bool:
    """Whether the user named ``node`` (its op type in ``op_types``, its name in
    ``nodes_to_quantize``)."""
    return ((config.op_types is not None and node.op_type in config.op_types)
            or (config.nodes_to_quantize is not None
                and (node.name or "") in config.nodes_to_quantize))


def _times(model: CostModel, spec: NodeSpec) -> tuple[float | None, float | None]:
    """Float and dynamic time of a node. A Conv's dynamic time is its float time plus the
    difference the dynamic form makes between float neighbours (``"dynamic@float"`` vs
    ``"float@float"``): a ConvInteger also makes the float Convs around it reorder their
    data out of and into onnxruntime's NCHWc layout."""
    float_ms = model.node_ms(spec, "float")
    if not isinstance(spec, ConvSpec) or float_ms is None:
        return float_ms, model.node_ms(spec, "dynamic")
    inside, dynamic = model.node_ms(spec, "float@float"), model.node_ms(spec, "dynamic@float")
    if inside is None or dynamic is None:
        return float_ms, model.node_ms(spec, "dynamic")
    return float_ms, float_ms + dynamic - inside


def dynamic_costs(candidates: list[ir.Node], config: DynamicQuantConfig,
                  model: CostModel | None = None) -> DynamicCosts | None:
    """Decide which ``candidates`` stay float for ``config.objective`` (None without a cost
    model, or in QDQ form, whose float kernels this model does not describe).

    Args:
        candidates: The nodes dynamic quantization would rewrite, in graph order.
        config: The run's settings (objective, measuring, what the user named).
        model: The cost model; default ``config.cost_model`` or this machine's.
    """
    if config.format is not QuantFormat.QOPERATOR:
        return None
    model = model or config.cost_model or default_cost_model(config.measure_costs)
    if model is None:
        return None
    objective = as_objective(config.objective)
    result = DynamicCosts(objective)
    budget = Budget(objective)
    for node in candidates:
        spec = node_spec(node) if node.op_type in _MEASURED else None
        if spec is None:
            continue
        float_ms, dynamic_ms = _times(model, spec)
        if float_ms is None or dynamic_ms is None:
            continue
        cost = NodeCost(float_ms, dynamic_ms, spec.weight_elements * 3)
        quantize, accepted = budget.decide(cost, _named(node, config))
        result.accepted += accepted
        result.costs.append((node, cost, quantize))
        if not quantize:
            form = "ConvInteger" if node.op_type == "Conv" else "MatMulInteger"
            result.floats[node] = (
                f"{form} form measured slower than float (dynamic {dynamic_ms * 1e3:.0f} µs vs "
                f"float {float_ms * 1e3:.0f} µs; objective {objective.value})")
    save = getattr(model, "save", None)
    if callable(save):
        save()
    return result
