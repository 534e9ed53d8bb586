"""Settle which selected nodes are quantized, before any parameter is computed.

Anchor ops (Conv, ConvTranspose, Gemm, MatMul) are quantized when every float input is
constant, already dequantized, or has a calibrated range. All other ops (Add, Mul, pools,
Reshape, Relu, LayerNormalization, ...) are quantized only when they touch a quantized node:
on their own they would only add QuantizeLinear/DequantizeLinear pairs to a float region, and
elementwise math outside the compute path (the variance of a decomposed LayerNorm, attention
masks) is where 8-bit grids do the most harm.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

import onnx_ir as ir

from onnxquant.core.graph import from_dequantize, is_constant, is_float
from onnxquant.core.qtypes import QuantFormat
from onnxquant.static.rules import OpRule, OutputMode, rule_for

__all__ = ["Chosen", "choose_nodes", "params_from_producer", "shallow_convs"]


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
    weights = [node.inputs[i] for i in rule.weights if i < len(node.inputs)]
    return any(w is not None and is_constant(w) and is_float(w) for w in weights)


LARGE_CONSTANT = 256  # elements


def _large_constant(value: ir.Value) -> bool:
    return is_constant(value) and is_float(value) and value.const_value.size >= LARGE_CONSTANT  # type: ignore[union-attr]


def params_from_producer(value: ir.Value, qformat: QuantFormat = QuantFormat.QDQ) -> bool:
    """Whether a quantized producer of ``value`` would give it parameters without a range
    (shared with the producer's input, or fixed like Softmax's)."""
    producer = value.producer()
    rule = rule_for(producer, qformat) if producer is not None else None
    return rule is not None and rule.output in (OutputMode.SHARED, OutputMode.FIXED)


NO_NEIGHBOUR = "no quantized neighbour (it would only add Q/DQ to float code)"


def _is_follower(rule: OpRule) -> bool:
    return not rule.anchor


def choose_nodes(nodes: Iterable[ir.Node], ranges: Mapping[str, object],
                 qformat: QuantFormat = QuantFormat.QDQ, *,
                 float_depthwise_multiple: int | None = None,
                 float_conv_depth: int | None = None,
                 keep_float: Mapping[ir.Node, str] | None = None,
                 forced: Collection[ir.Node] = (),
                 speed_floats: Mapping[ir.Node, str] | None = None) -> Chosen:
    """Decide which of ``nodes`` are quantized (see the module docstring).

    Nodes in ``forced`` (named explicitly by the user, see
    ``StaticQuantConfig.force_op_types``) are quantized whenever their inputs have ranges:
    they need no quantized neighbour and the QOperator speed rules below skip them.

    Nodes in ``keep_float`` stay float with the reason given there (extreme weights, nodes a
    finiteness check took out).

    With ``float_depthwise_multiple`` (QOperator only), depthwise Convs whose channel count is
    not a multiple of it stay float, with their elementwise tail (see :func:`slow_depthwise`).
    With ``float_conv_depth`` (QOperator only), Convs whose reduction depth is below it stay
    float, with their elementwise tail (see :func:`shallow_convs`).

    ``speed_floats`` (node -> reason, from the measured cost model, any format) replaces both
    rules when given.
    """
    nodes = list(nodes)
    chosen = Chosen()
    kept: dict[ir.Node, str] = dict(keep_float or {})
    forced = set(forced)
    if speed_floats is not None:
        kept = {**{n: r for n, r in speed_floats.items() if n not in forced}, **kept}
    elif qformat is QuantFormat.QOPERATOR:
        speed: dict[ir.Node, str] = {}
        if float_depthwise_multiple is not None:
            speed.update(slow_depthwise(nodes, float_depthwise_multiple))
        if float_conv_depth is not None:
            speed.update(shallow_convs(nodes, float_conv_depth, {**speed, **kept}))
        kept = {**{n: r for n, r in speed.items() if n not in forced}, **kept}
    followers, unranged = [], []
    for node in nodes:
        rule = rule_for(node, qformat)
        assert rule is not None
        if node in kept:
            chosen.reasons[node] = kept[node]
            continue
        if rule.weight_only:
            chosen.weight_only.add(node)
            continue
        missing = _missing_input(node, rule, ranges, qformat)
        if missing and rule.anchor and _has_constant_weight(node, rule):
            chosen.weight_only.add(node)
            chosen.reasons[node] = missing
        elif missing and _is_follower(rule):
            unranged.append((node, missing))
        elif missing:
            chosen.reasons[node] = missing
        elif _is_follower(rule) and node not in forced:
            followers.append(node)
        else:
            chosen.nodes.add(node)
    _grow(chosen, followers, qformat)
    for node, missing in unranged:  # calibration leaves out followers it would not choose
        chosen.reasons[node] = missing if _has_quantized_neighbour(node, chosen, qformat) \
            else NO_NEIGHBOUR
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
        chosen.reasons[node] = NO_NEIGHBOUR


def _has_quantized_neighbour(node: ir.Node, chosen: Chosen, qformat: QuantFormat) -> bool:
    rule = rule_for(node, qformat)
    assert rule is not None
    data = node.inputs[0] if node.inputs else None
    if data is not None and _large_constant(data) and rule.output is OutputMode.SHARED:
        return True  # an embedding table or a sliced weight is worth storing quantized
    for index, value in enumerate(node.inputs):
        # Input 0 always counts (Softmax's float input too). In QOperator form other quantized
        # inputs count too (Mul(c, x)): integer chains avoid Q/DQ transitions there. In QDQ form
        # they do not: quantizing every step of decomposed activations (HardSwish = x+3, Clip,
        # Mul, Div) compounds requantization error (rapidocr_rec_v4: 67 % -> 58 % CTC match).
        if value is None or (index and (qformat is QuantFormat.QDQ
                                        or not rule.is_quantized_input(index))):
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


_TAIL_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Clip", "Relu", "LeakyRelu", "HardSigmoid",
                       "HardSwish", "Sigmoid", "Tanh"})


def _depthwise_channels(node: ir.Node) -> int | None:
    """Channels of a depthwise Conv (one input channel per group, group > 1), else None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    group = node.attributes.get("group")
    if weight is None or weight.shape is None or group is None or group.as_int() <= 1:
        return None
    dims = list(weight.shape)
    if len(dims) < 3 or dims[1] != 1 or dims[0] != group.as_int():
        return None
    return group.as_int()


def slow_depthwise(nodes: list[ir.Node], multiple: int) -> dict[ir.Node, str]:
    """Depthwise Convs whose channel count is not a multiple of ``multiple``, and their
    elementwise tails (activations computed only from the Conv's output and constants), with
    the reason they stay float in QOperator form.

    onnxruntime's u8s8 depthwise kernel (NHWC, AVX2) handles 16 channels per vector step and
    the rest one channel at a time: measured on rapidocr, 5x5 layers of 88/104/200 channels
    run 6-8x slower than the float NCHWc kernel, 48/240/480 channels 2x. The tail stays float
    too: a float Conv read through a DequantizeLinear and written straight into a
    QuantizeLinear is turned back into a QLinearConv by onnxruntime's QDQ fusion.
    """
    selected = set(nodes)
    kept: dict[ir.Node, str] = {}
    for node in nodes:
        channels = _depthwise_channels(node)
        if channels is None or channels % multiple == 0:
            continue
        kept[node] = (f"depthwise Conv with {channels} channels (not a multiple of {multiple}): "
                      "onnxruntime's 8-bit depthwise kernel is several times slower than its "
                      "float one there (float_depthwise_multiple)")
        _add_tail(node, selected, kept)
    return kept


def _conv_depth(node: ir.Node) -> int | None:
    """Reduction depth of a Conv that is not depthwise (input channels × kernel area: the K
    of its GEMM), else None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is None or weight.shape is None or _depthwise_channels(node) is not None:
        return None
    dims = list(weight.shape)
    inner = [d for d in dims[1:] if isinstance(d, int)]
    if len(dims) < 3 or len(inner) != len(dims) - 1:
        return None
    return math.prod(inner)


def shallow_convs(nodes: list[ir.Node], depth: int,
                  kept: dict[ir.Node, str]) -> dict[ir.Node, str]:
    """Convs (not depthwise) whose reduction depth (input channels per group × kernel area)
    is below ``depth`` and whose input is float anyway, and their elementwise tails, with the
    reason they stay float in QOperator form. ``nodes`` are in topological order; ``kept``
    holds the nodes already staying float (read, not changed).

    A Conv's input is float anyway when it is a graph input, the output of a node that stays
    float, or computed by followers (pools, reshapes, elementwise ops) from such values only.
    Quantizing the Conv there would open an integer region with a QuantizeLinear (and
    onnxruntime's NHWC Transpose), and with so few products per output onnxruntime's u8s8
    QLinearConv does not pay for it: the 3-channel 3x3 stem of rapidocr cls (depth 27) takes
    53 µs against 21 µs float, plus 11 µs for quantizing the graph input and 8 µs for the
    Transpose. Shallow Convs inside an integer region stay integer: their own kernel is about
    as fast as the float one, and leaving it would cost a DequantizeLinear/QuantizeLinear pair.
    """
    selected = set(nodes)
    found: dict[ir.Node, str] = {}
    floating: set[ir.Value] = set()

    def is_float_input(value: ir.Value | None) -> bool:
        if value is None or not is_float(value) or is_constant(value):
            return False
        producer = value.producer()
        return (value in floating or producer is None
                or (producer not in selected and producer.op_type != "DequantizeLinear"))

    for node in nodes:
        data = [v for v in node.inputs if v is not None and not is_constant(v)]
        if node in kept or node in found:
            floating.update(node.outputs)
            continue
        conv_depth = _conv_depth(node)
        if conv_depth is not None and conv_depth < depth and is_float_input(node.inputs[0]):
            found[node] = (f"Conv with reduction depth {conv_depth} (input channels × kernel "
                           f"area, below {depth}) on a float input: onnxruntime's 8-bit Conv "
                           "does not pay for quantizing its input (float_conv_depth)")
            _add_tail(node, selected, found)
            floating.update(node.outputs)
        elif conv_depth is None and data and all(is_float_input(v) for v in data):
            rule = rule_for(node, QuantFormat.QOPERATOR)
            if rule is not None and not rule.anchor:
                floating.update(node.outputs)
    return found


def _add_tail(node: ir.Node, selected: set[ir.Node], kept: dict[ir.Node, str]) -> None:
    """Adds the elementwise tail of ``node`` (ops computed only from its output and
    constants) to ``kept``."""
    inside = {node.outputs[0]}
    stack = [node.outputs[0]]
    while stack:
        for consumer, _ in stack.pop().uses():
            if consumer in kept or consumer not in selected or consumer.op_type not in _TAIL_OPS:
                continue
            if all(v is None or v in inside or is_constant(v) for v in consumer.inputs):
                kept[consumer] = f"elementwise tail of the float Conv '{node.name}'"
                inside.update(consumer.outputs)
                stack.extend(consumer.outputs)
