"""Settle which selected nodes are quantized, before any parameter is computed.

Anchor ops (Conv, ConvTranspose, Gemm, MatMul) are quantized when every float input is
constant, already dequantized, or has a calibrated range. All other ops (Add, Mul, pools,
Reshape, Relu, LayerNormalization, ...) are quantized only when they touch a quantized node:
on their own they would only add QuantizeLinear/DequantizeLinear pairs to a float region, and
elementwise math outside the compute path (the variance of a decomposed LayerNorm, attention
masks) is where 8-bit grids do the most harm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx_ir as ir

from onnxquant._graph import from_dequantize, is_constant, is_float
from onnxquant.config import QuantFormat
from onnxquant.rules import OpRule, OutputMode, rule_for

__all__ = ["Chosen", "choose_nodes", "params_from_producer"]


class Chosen:
    """The set of nodes to quantize, with the reason for every node left float."""

    def __init__(self) -> None:
        self.nodes: set[ir.Node] = set()
        self.weight_only: set[ir.Node] = set()  # anchors whose activations were not observed
        self.reasons: dict[ir.Node, str] = {}

    def __contains__(self, node: object) -> bool:
        return node in self.nodes

    def reason(self, node: ir.Node) -> str:
        """Why ``node`` stays float."""
        return self.reasons.get(node, "")


def _missing_input(node: ir.Node, rule: OpRule, ranges: Mapping[str, object],
                   qformat: QuantFormat) -> str | None:
    usable = False
    for index, value in enumerate(node.inputs):
        if value is None or not rule.is_quantized_input(index) or not is_float(value):
            continue
        if from_dequantize(value):
            continue
        if (not is_constant(value) and value.name not in ranges
                and not params_from_producer(value, qformat)):
            return f"input '{value.name}' has no calibrated range"
        usable = True
    if not rule.activations and not rule.weights:
        return None  # output-only rule (Softmax)
    return None if usable else "no float input to quantize"


def _has_constant_weight(node: ir.Node, rule: OpRule) -> bool:
    return any(
        i < len(node.inputs) and node.inputs[i] is not None and is_constant(node.inputs[i])
        and is_float(node.inputs[i])
        for i in rule.weights
    )


LARGE_CONSTANT = 256  # elements


def _large_constant(value: ir.Value) -> bool:
    return is_constant(value) and is_float(value) and value.const_value.size >= LARGE_CONSTANT  # type: ignore[union-attr]


def params_from_producer(value: ir.Value, qformat: QuantFormat = QuantFormat.QDQ) -> bool:
    """Whether a quantized producer of ``value`` would give it parameters without a range
    (shared with the producer's input, or fixed like Softmax's)."""
    producer = value.producer()
    rule = rule_for(producer, qformat) if producer is not None else None
    return rule is not None and rule.output in (OutputMode.SHARED, OutputMode.FIXED)


def _is_follower(rule: OpRule) -> bool:
    return not rule.anchor


def choose_nodes(nodes: Iterable[ir.Node], ranges: Mapping[str, object],
                 qformat: QuantFormat = QuantFormat.QDQ) -> Chosen:
    """Decide which of ``nodes`` are quantized (see the module docstring)."""
    chosen = Chosen()
    followers = []
    for node in nodes:
        rule = rule_for(node, qformat)
        assert rule is not None
        if rule.weight_only:
            chosen.weight_only.add(node)
            continue
        missing = _missing_input(node, rule, ranges, qformat)
        if missing and rule.anchor and _has_constant_weight(node, rule):
            chosen.weight_only.add(node)
            chosen.reasons[node] = missing
        elif missing:
            chosen.reasons[node] = missing
        elif _is_follower(rule):
            followers.append(node)
        else:
            chosen.nodes.add(node)
    _grow(chosen, followers, qformat)
    return chosen


def _grow(chosen: Chosen, followers: list[ir.Node], qformat: QuantFormat) -> None:
    pending = list(followers)
    changed = True
    while changed and pending:
        changed = False
        for node in list(pending):
            if _has_quantized_neighbour(node, chosen, qformat):
                chosen.nodes.add(node)
                pending.remove(node)
                changed = True
    for node in pending:
        chosen.reasons[node] = "no quantized neighbour (it would only add Q/DQ to float code)"


def _has_quantized_neighbour(node: ir.Node, chosen: Chosen, qformat: QuantFormat) -> bool:
    rule = rule_for(node, qformat)
    assert rule is not None
    data = node.inputs[0] if node.inputs else None
    if data is not None and _large_constant(data) and rule.output is OutputMode.SHARED:
        return True  # an embedding table or a sliced weight is worth storing quantized
    for index, value in enumerate(node.inputs):
        # Input 0 always counts (Softmax's float input too); others when quantized (Mul(c, x)).
        if value is None or (index and not rule.is_quantized_input(index)):
            continue
        producer = value.producer()
        if producer is not None and producer in chosen.nodes:
            return True
    for out in node.outputs:
        for consumer, index in out.uses():
            reader = rule_for(consumer, qformat)
            if consumer in chosen.nodes and reader is not None and reader.is_quantized_input(index):
                return True
    return False
