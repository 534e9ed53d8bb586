"""The QOperator op table: which quantized nodes have an integer form, and how to build it.

Each entry says when an op can run on 8-bit tensors in onnxruntime (CPU) and builds the integer
node from the plan; the emitter (:mod:`onnxquant.emitters.qoperator`) does the wiring. A node
whose check fails stays float, with the reason recorded in its plan decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.core.errors import NumericsError
from onnxquant.core.external_data import read_array
from onnxquant.core.graph import is_constant, is_float
from onnxquant.core.plan import BiasQuant, NodeDecision, QuantPlan, TensorQuant

__all__ = ["MS_DOMAIN", "IntNode", "OpForm", "FORMS", "unsupported", "gemm_bias"]

MS_DOMAIN = "com.microsoft"


class Builder(Protocol):
    """What the builders need from the emitter."""

    opset: int
    plan: QuantPlan

    def int_input(self, node: ir.Node, index: int, decision: NodeDecision, *,
                  rank: int = 0) -> list[ir.Value]:
        """``[x, scale, zero_point]`` of input ``index`` as an 8-bit tensor (a constant with
        leading 1s up to ``rank`` dimensions)."""

    def out_params(self, node: ir.Node, index: int) -> list[ir.Value]:
        """``[scale, zero_point]`` of output ``index``."""

    def constant(self, node: ir.Node, stem: str, array: np.ndarray) -> ir.Value:
        """A new initializer in the graph of ``node``."""

    def bias(self, node: ir.Node, bias: BiasQuant) -> ir.Value:
        """The int32 bias of ``node`` as planned."""


@dataclasses.dataclass
class IntNode:
    """An integer node to create in place of a float one."""

    op_type: str
    inputs: Sequence[ir.Value | None]
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    domain: str = ""


Check = Callable[[ir.Node, NodeDecision, QuantPlan, int], "str | None"]


@dataclasses.dataclass(frozen=True)
class OpForm:
    """The integer form of one op type.

    Attributes:
        build: Makes the integer node.
        inputs: Input indices that must be quantized in the plan (None: every float input).
        movement: The op moves 8-bit values unchanged (Reshape, MaxPool, ...): its outputs
            share the input's parameters.
        weight_inputs: Inputs that may be per-channel weights.
        float_output: The op can also write a float output (QGemm without y_scale).
        min_opset: Lowest default-domain opset whose version of the op accepts 8-bit tensors.
        check: Op-specific conditions; returns why the op cannot be integer.
    """

    build: Callable[[Builder, ir.Node, NodeDecision], IntNode]
    inputs: tuple[int, ...] | None = (0,)
    movement: bool = False
    weight_inputs: tuple[int, ...] = ()
    float_output: bool = False
    min_opset: int = 10
    check: Check | None = None


# -- helpers ---------------------------------------------------------------------------------
def _copy_attrs(node: ir.Node, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {a.name: ir.Attr(a.name, a.type, a.value)
            for a in node.attributes.values() if a.name not in drop}


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def _tq(node: ir.Node, index: int, decision: NodeDecision, plan: QuantPlan) -> TensorQuant | None:
    name = decision.inputs.get(index)
    return plan.tensors.get(name) if name is not None else None


# -- checks ----------------------------------------------------------------------------------
def _mixed_types(node: ir.Node, decision: NodeDecision, plan: QuantPlan, _: int) -> str | None:
    """Conv/MatMul/Gemm: onnxruntime has no kernel for int8 activations with uint8 weights."""
    a, b = _tq(node, 0, decision, plan), _tq(node, 1, decision, plan)
    if a is not None and b is not None and a.quant_type.signed and not b.quant_type.signed:
        return (f"onnxruntime has no {node.op_type} kernel for int8 activations with uint8 "
                "weights (use uint8 activations or int8 weights)")
    return None


def _conv_check(node: ir.Node, decision: NodeDecision, plan: QuantPlan, opset: int) -> str | None:
    if len(node.inputs) > 2 and node.inputs[2] is not None and decision.bias is None:
        return "its bias is not quantized to int32 (QLinearConv needs an int32 bias)"
    return _mixed_types(node, decision, plan, opset)


def _matmul_check(node: ir.Node, decision: NodeDecision, plan: QuantPlan,
                  opset: int) -> str | None:
    b = _tq(node, 1, decision, plan)
    value = node.inputs[1]
    if b is not None and b.axis is not None:
        rank = len(value.shape) if value is not None and value.shape is not None else 0
        if rank != 2 or b.axis != 1:
            return ("QLinearMatMul takes per-column weight scales only for 2-D weights "
                    f"(weight of rank {rank}, axis {b.axis})")
    return _mixed_types(node, decision, plan, opset)


def gemm_bias(node: ir.Node, decision: NodeDecision, plan: QuantPlan) -> np.ndarray | str | None:
    """QGemm's int32 C: ``beta * C / (alpha * a_scale * b_scale)`` (QGemm scales C with alpha),
    None without C, or why C cannot be int32."""
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return None
    if not is_constant(c) or not is_float(c):
        return f"its bias '{c.name}' is not a float constant (QGemm needs an int32 C)"
    a, b = _tq(node, 0, decision, plan), _tq(node, 1, decision, plan)
    if a is None or b is None:
        return "its inputs are not quantized"
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    data = read_array(c.const_value).astype(np.float64) * beta  # type: ignore[arg-type]
    scale = np.float32(alpha) * b.scale_array()
    if b.axis is not None and data.ndim != 1:
        return "a per-column weight needs a 1-D bias"
    try:
        q, _ = numerics.quantize_bias(data, a.scale_array(), scale, name=c.name or "C")
    except NumericsError as err:
        return f"its bias does not fit in int32 ({err})"
    return q


def _gemm_check(node: ir.Node, decision: NodeDecision, plan: QuantPlan, opset: int) -> str | None:
    found = gemm_bias(node, decision, plan)
    if isinstance(found, str):
        return found
    return _mixed_types(node, decision, plan, opset)


def _pool_check(node: ir.Node, decision: NodeDecision, plan: QuantPlan, _: int) -> str | None:
    dilations = node.attributes.get("dilations")
    if dilations is not None and any(d != 1 for d in dilations.value):
        return "QLinearAveragePool has no dilations"
    return None


def _pad_check(node: ir.Node, decision: NodeDecision, plan: QuantPlan, _: int) -> str | None:
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is not None and not is_constant(value):
        return "its constant value is not a constant (it cannot be re-quantized)"
    return None


# -- builders --------------------------------------------------------------------------------
def _conv(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
    inputs = [*b.int_input(node, 0, d), *b.int_input(node, 1, d), *b.out_params(node, 0)]
    if d.bias is not None:
        inputs.append(b.bias(node, d.bias))
    return IntNode("QLinearConv", inputs, _copy_attrs(node))


def _matmul(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
    tq = b.plan.tensors.get(d.inputs.get(0, ""))
    float8 = tq is not None and tq.quant_type.is_float  # float8: the com.microsoft schema
    return IntNode("QLinearMatMul",
                   [*b.int_input(node, 0, d), *b.int_input(node, 1, d), *b.out_params(node, 0)],
                   domain=MS_DOMAIN if float8 else "")


def _gemm(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
    plan_outputs = node.outputs[0].name in d.outputs
    inputs: list[ir.Value | None] = [*b.int_input(node, 0, d), *b.int_input(node, 1, d)]
    c = gemm_bias(node, d, b.plan)
    assert not isinstance(c, str)
    stem = f"{node.inputs[2].name}_int32" if c is not None else ""  # type: ignore[union-attr]
    inputs.append(b.constant(node, stem, c) if c is not None else None)
    if plan_outputs:
        inputs += b.out_params(node, 0)
    while inputs[-1] is None:
        inputs.pop()
    return IntNode("QGemm", inputs, _copy_attrs(node, drop=("beta",)), MS_DOMAIN)


def _rank(value: ir.Value | None) -> int:
    return len(value.shape) if value is not None and value.shape is not None else 0


def _binary(op_type: str) -> Callable[[Builder, ir.Node, NodeDecision], IntNode]:
    def build(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
        # A constant operand gets the other operand's rank (leading 1s, same broadcast):
        # onnxruntime's NHWC layout transformer stops at rank-mismatched operands.
        rank = max(_rank(node.inputs[0]), _rank(node.inputs[1]))
        return IntNode(op_type, [*b.int_input(node, 0, d, rank=rank),
                                 *b.int_input(node, 1, d, rank=rank),
                                 *b.out_params(node, 0)], {}, MS_DOMAIN)
    return build


def _reciprocal(node: ir.Node) -> np.ndarray | None:
    divisor = node.inputs[1] if len(node.inputs) > 1 else None
    if divisor is None or not is_constant(divisor) or not is_float(divisor):
        return None
    data = read_array(divisor.const_value).astype(np.float64)  # type: ignore[arg-type]
    if data.size == 0 or not np.all(np.isfinite(data)) or np.any(data == 0):
        return None
    return (1.0 / data).astype(np.float32)


def _div_check(node: ir.Node, decision: NodeDecision, plan: QuantPlan, _: int) -> str | None:
    if _reciprocal(node) is None:
        return "its divisor is not a finite non-zero constant"
    return None


def _div(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
    """``x / c`` as ``QLinearMul(x, 1/c)``; 1/c gets its own grid, on which the reciprocal of a
    scalar is exact (its end point)."""
    recip = _reciprocal(node)
    assert recip is not None
    qtype = b.plan.tensors[d.inputs[0]].quant_type
    low, high = numerics.tensor_range(recip)
    scale, zero_point = numerics.compute_scale_zero_point(low, high, qtype)
    q = numerics.quantize(recip, scale, zero_point, qtype)
    stem = node.inputs[1].name or node.name or "divisor"  # type: ignore[union-attr]
    rank = max(_rank(node.inputs[0]), q.ndim)
    q = q.reshape((1,) * (rank - q.ndim) + q.shape)
    inputs = [*b.int_input(node, 0, d), b.constant(node, f"{stem}_reciprocal_quantized", q),
              b.constant(node, f"{stem}_reciprocal_scale", np.asarray(scale, np.float32)),
              b.constant(node, f"{stem}_reciprocal_zero_point", np.asarray(zero_point)),
              *b.out_params(node, 0)]
    return IntNode("QLinearMul", inputs, {}, MS_DOMAIN)


def _unary(op_type: str, **extra: object) -> Callable[[Builder, ir.Node, NodeDecision], IntNode]:
    def build(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
        attrs = {**_copy_attrs(node), **extra}
        return IntNode(op_type, [*b.int_input(node, 0, d), *b.out_params(node, 0)], attrs,
                       MS_DOMAIN)
    return build


def _softmax(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
    axis = int(_attr(node, "axis", 1 if b.opset < 13 else -1))
    return IntNode("QLinearSoftmax", [*b.int_input(node, 0, d), *b.out_params(node, 0)],
                   {"axis": axis, "opset": b.opset}, MS_DOMAIN)


def _concat(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
    inputs: list[ir.Value | None] = list(b.out_params(node, 0))
    for index in range(len(node.inputs)):
        inputs += b.int_input(node, index, d)
    return IntNode("QLinearConcat", inputs, _copy_attrs(node), MS_DOMAIN)


def _where(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
    return IntNode("QLinearWhere", [node.inputs[0], *b.int_input(node, 1, d),
                                    *b.int_input(node, 2, d), *b.out_params(node, 0)],
                   {}, MS_DOMAIN)


def _movement(b: Builder, node: ir.Node, d: NodeDecision) -> IntNode:
    x, _, _ = b.int_input(node, 0, d)
    inputs: list[ir.Value | None] = [x, *node.inputs[1:]]
    if node.op_type == "Pad" and _attr(node, "mode", "constant") == "constant":
        tq = b.plan.tensors[d.inputs[0]]
        value = node.inputs[2] if len(node.inputs) > 2 else None
        fill = read_array(value.const_value) if value is not None else np.float32(0)  # type: ignore[arg-type]
        q = numerics.quantize(np.asarray(fill, np.float32).reshape(()), tq.scale_array(),
                              tq.zero_point_array(), tq.quant_type)
        inputs += [None] * (3 - len(inputs))
        inputs[2] = b.constant(node, f"{node.name}_constant_value", q)
    return IntNode(node.op_type, inputs, _copy_attrs(node), node.domain)


_MOVE = OpForm(_movement, movement=True)
_CONV_LIKE = {"inputs": (0, 1), "weight_inputs": (1,)}

FORMS: dict[str, OpForm] = {
    "Conv": OpForm(_conv, **_CONV_LIKE, check=_conv_check),  # type: ignore[arg-type]
    "MatMul": OpForm(_matmul, **_CONV_LIKE, check=_matmul_check),  # type: ignore[arg-type]
    "Gemm": OpForm(_gemm, **_CONV_LIKE, float_output=True, check=_gemm_check),  # type: ignore[arg-type]
    "Add": OpForm(_binary("QLinearAdd"), inputs=(0, 1)),
    "Mul": OpForm(_binary("QLinearMul"), inputs=(0, 1)),
    "Div": OpForm(_div, check=_div_check),
    "Concat": OpForm(_concat, inputs=None),
    "AveragePool": OpForm(_unary("QLinearAveragePool", channels_last=0), check=_pool_check),
    "GlobalAveragePool": OpForm(_unary("QLinearGlobalAveragePool", channels_last=0)),
    "Sigmoid": OpForm(_unary("QLinearSigmoid")),
    "LeakyRelu": OpForm(_unary("QLinearLeakyRelu")),
    "Softmax": OpForm(_softmax),
    "Where": OpForm(_where, inputs=(1, 2)),
    "MaxPool": OpForm(_movement, movement=True, min_opset=12),
    "Resize": OpForm(_movement, movement=True, min_opset=11),
    "Pad": OpForm(_movement, movement=True, min_opset=11, check=_pad_check),
    "ArgMax": _MOVE,
    "Reshape": _MOVE,
    "Transpose": _MOVE,
    "Squeeze": _MOVE,
    "Unsqueeze": _MOVE,
    "Flatten": _MOVE,
    "Split": _MOVE,
    "Slice": _MOVE,
    "Gather": _MOVE,
}


def unsupported(node: ir.Node, decision: NodeDecision, plan: QuantPlan, opset: int) -> str | None:
    """Why ``node`` cannot be an integer node (None when it can)."""
    form = FORMS.get(node.op_type)
    if form is None or node.domain not in ("", "ai.onnx"):
        return f"no integer {node.op_type} operator in onnxruntime"
    if opset < form.min_opset:
        return f"{node.op_type} takes 8-bit tensors from opset {form.min_opset} (model: {opset})"
    indices = form.inputs
    if indices is None:
        indices = tuple(i for i, v in enumerate(node.inputs) if v is not None)
    for index in indices:
        tq = _tq(node, index, decision, plan)
        if tq is None:
            return f"input {index} is not quantized"
        if tq.quant_type.bits != 8 or (tq.quant_type.is_float and node.op_type != "MatMul"):
            return f"no integer {node.op_type} kernel for {tq.qtype} tensors"
        if tq.axis is not None and index not in form.weight_inputs:
            return f"input {index} is quantized per channel"
    source = _tq(node, 0, decision, plan)
    for value in node.outputs:
        if not is_float(value):
            continue
        tq = plan.tensors.get(value.name or "") if value.name in decision.outputs else None
        if tq is None:
            if form.float_output:
                continue
            return f"output '{value.name}' has no quantization parameters"
        if tq.quant_type.bits != 8 or (tq.quant_type.is_float and node.op_type != "MatMul"):
            return f"no integer {node.op_type} kernel for {tq.qtype} tensors"
        if form.movement and (source is None or not tq.same_params(
                dataclasses.replace(source, name=tq.name))):
            return f"output '{value.name}' does not share the input's parameters"
    return form.check(node, decision, plan, opset) if form.check is not None else None
