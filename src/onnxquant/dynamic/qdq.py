"""QDQ form of dynamic quantization.

Activations of MatMul/Gemm/Conv go through ``QuantizeLinear -> DequantizeLinear`` whose scale
and zero point are computed at run time by a model-local ONNX function::

    onnxquant.ComputeQuantizationParameters(x) -> (scale: float, zero_point: uint8)

which does what DynamicQuantizeLinear does (ReduceMin/ReduceMax, range widened to contain 0,
``scale = (max - min) / 255`` — 1 when the range is empty —, ``zero_point =
saturate(round(-min / scale))``). Weights are stored as constant integers behind a
DequantizeLinear (per channel when configured). The float operators stay as they are, so any
runtime that understands QDQ and model-local functions can run — or fuse — the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from onnxquant.core.graph import is_constant
from onnxquant.dynamic._context import Context, Outcome, operand_problem

__all__ = ["FUNCTION_DOMAIN", "FUNCTION_NAME", "rewrite_matmul", "rewrite_gemm", "rewrite_conv",
           "compute_parameters_function"]

FUNCTION_DOMAIN = "onnxquant"
FUNCTION_NAME = "ComputeQuantizationParameters"
_FLOAT, _UINT8 = ir.DataType.FLOAT, ir.DataType.UINT8


def compute_parameters_function(opset: int) -> ir.Function:
    """The ``ComputeQuantizationParameters`` function for default-domain ``opset`` (>= 11:
    Round)."""
    x = ir.Value(name="x")
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], out: str, **attrs: Any) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attrs or None, name=f"{out}_{op_type}")
        node.outputs[0].name = out
        nodes.append(node)
        return node.outputs[0]

    def constant(name: str, number: float) -> ir.Value:
        # A tensor-valued Constant: value_float needs opset 12.
        return op("Constant", [], name, value=ir.tensor(np.array(number, np.float32)))

    zero, one, qmax = constant("zero", 0.0), constant("one", 1.0), constant("qmax", 255.0)
    rmin = op("Min", [op("ReduceMin", [x], "x_min", keepdims=0), zero], "range_min")
    rmax = op("Max", [op("ReduceMax", [x], "x_max", keepdims=0), zero], "range_max")
    raw = op("Div", [op("Sub", [rmax, rmin], "range"), qmax], "raw_scale")
    scale = op("Where", [op("Equal", [raw, zero], "empty_range"), one, raw], "scale")
    shifted = op("Round", [op("Div", [op("Neg", [rmin], "neg_min"), scale], "zp_float")],
                 "zp_rounded")
    clipped = op("Clip", [shifted, zero, qmax], "zp_clipped")
    zero_point = op("Cast", [clipped], "zero_point", to=int(_UINT8))
    graph = ir.Graph([x], [scale, zero_point], nodes=nodes, opset_imports={"": opset},
                     name=FUNCTION_NAME)
    return ir.Function(FUNCTION_DOMAIN, FUNCTION_NAME, graph=graph, attributes=[])


def _ensure_function(ctx: Context) -> None:
    key = (FUNCTION_DOMAIN, FUNCTION_NAME, "")
    if key not in ctx.model.functions:
        ctx.model.functions[key] = compute_parameters_function(ctx.opset)
        ctx.model.opset_imports[FUNCTION_DOMAIN] = 1


def _activation(ctx: Context, node: ir.Node, value: ir.Value) -> ir.Value:
    """The dequantized copy of ``value`` in ``node``'s graph (one per value and graph)."""
    assert node.graph is not None
    cache = ctx.memo
    key = ("qdq-activation", id(node.graph), id(value))
    if key not in cache:
        _ensure_function(ctx)
        b = ctx.builder(node)
        stem = value.name or "activation"
        scale, zero_point = b.op(FUNCTION_NAME, [value], f"{stem}_qparams", num_outputs=2,
                                 domain=FUNCTION_DOMAIN, dtypes=(_FLOAT, _UINT8))
        scale.name, zero_point.name = ctx.names(f"{stem}_scale"), ctx.names(f"{stem}_zero_point")
        scale.shape = zero_point.shape = ir.Shape([])
        (q,) = b.op("QuantizeLinear", [value, scale, zero_point], f"{stem}_quantized",
                    dtypes=(_UINT8,))
        (dq,) = b.op("DequantizeLinear", [q, scale, zero_point], f"{stem}_dequantized",
                     dtypes=(_FLOAT,))
        dq.shape = value.shape
        cache[key] = dq
    return cache[key]


def _weight(ctx: Context, node: ir.Node, value: ir.Value, axis: int | None) -> ir.Value:
    """The dequantized constant weight ``value`` (stored quantized) in ``node``'s graph."""
    assert node.graph is not None
    cache = ctx.memo
    key = ("qdq-weight", id(node.graph), id(value), axis)
    if key not in cache:
        config = ctx.config
        b = ctx.builder(node)
        qw = ctx.weights.get(value, b.graph, qtype=config.weight_type, axis=axis,
                             symmetric=ctx.symmetric, reduce_range=config.reduce_range)
        (dq,) = b.op("DequantizeLinear", [qw.data, qw.scale, qw.zero_point],
                     f"{value.name or 'weight'}_dequantized",
                     attributes={"axis": axis} if axis is not None else None, dtypes=(_FLOAT,))
        dq.shape = value.shape
        cache[key] = dq
    return cache[key]


def _quantize_inputs(ctx: Context, node: ir.Node, weight_axis: int | None) -> Outcome:
    problem = operand_problem(node, ctx.config)
    if problem:
        return False, problem
    a, w = node.inputs[0], node.inputs[1]
    assert a is not None and w is not None
    if is_constant(w):
        rank = w.const_value.shape.rank()  # type: ignore[union-attr]
        if node.op_type != "Conv" and rank != 2:
            weight_axis = None
        choice = ctx.per_channel(w, weight_axis)
        if choice.float_reason:
            return False, choice.float_reason
        per_channel, why = choice.per_channel, choice.why
        if per_channel and ctx.opset < 13:
            if choice.required:
                return False, (f"{why}; but per-channel DequantizeLinear needs opset 13 and "
                               f"the model is opset {ctx.opset} (set per_channel=True to "
                               "convert the model to opset 13)")
            ctx.note(f"per-channel DequantizeLinear needs opset 13 and the model is opset "
                     f"{ctx.opset}: per-tensor weights (set per_channel=True to convert the "
                     "model to opset 13)", node)
            per_channel, why = False, ""
        axis = weight_axis if per_channel else None
        node.replace_input_with(1, _weight(ctx, node, w, axis))
        what = f"{ctx.config.weight_type} {'per-channel' if axis is not None else 'per-tensor'}"
        what += " weights" + (f" ({why})" if why else "")
    else:
        node.replace_input_with(1, _activation(ctx, node, w))
        what = "B quantized at run time"
    node.replace_input_with(0, _activation(ctx, node, a))
    return True, f"QDQ: uint8 activations from {FUNCTION_NAME}, {what}"


def rewrite_matmul(ctx: Context, node: ir.Node) -> Outcome:
    """MatMul: dynamic Q/DQ on A, DequantizeLinear of the stored weight B (per channel: N)."""
    w = node.inputs[1]
    rank = w.const_value.shape.rank() if w is not None and w.const_value is not None else 0
    return _quantize_inputs(ctx, node, rank - 1 if rank == 2 else None)


def rewrite_gemm(ctx: Context, node: ir.Node) -> Outcome:
    """Gemm: same as MatMul; the weight's channel axis follows transB."""
    attr = node.attributes.get("transB")
    return _quantize_inputs(ctx, node, 0 if attr is not None and attr.value else 1)


def rewrite_conv(ctx: Context, node: ir.Node) -> Outcome:
    """Conv: dynamic Q/DQ on X, DequantizeLinear of the stored weight (per channel: axis 0)."""
    return _quantize_inputs(ctx, node, 0)
