"""QOperator form of dynamic quantization: MatMul, Gemm and Conv on integer kernels.

Each quantized node becomes::

    DynamicQuantizeLinear(A) -> (A_q uint8, A_scale, A_zp)
    MatMulInteger(A_q, W_q, A_zp, W_zp) | ConvInteger(...)  -> int32
    Cast(float) -> Mul(., Mul(A_scale, W_scale)) [-> Add(bias)]

which is exactly the pattern onnxruntime fuses into ``MatMulIntegerToFloat`` and then, with a
constant weight, ``DynamicQuantizeMatMul``; the fusion needs the scale product to be a ``Mul``
node with A's scale first, the DynamicQuantizeLinear to feed only this node, and a constant
1-D bias as the Add's *second* input, so that is what is emitted. Gemm is lowered to the same
form (transposed weight stored transposed, alpha folded into the weight scale, beta into the
bias, transA as a Transpose node). Conv weights are per channel only where the runtime can run
it (see :mod:`onnxquant.dynamic.runtime`); biases stay float, reshaped offline to [C,1,...].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxquant.core.external_data import read_array
from onnxquant.core.graph import is_constant
from onnxquant.core.graph import is_float32 as is_float  # float16: not yet
from onnxquant.dynamic._builder import Builder
from onnxquant.dynamic._context import Context, Granularity, Outcome, operand_problem
from onnxquant.dynamic.runtime import WeightForm

__all__ = ["rewrite_matmul", "rewrite_gemm", "rewrite_conv", "dynamic_quantize"]

_FLOAT, _UINT8, _INT32 = ir.DataType.FLOAT, ir.DataType.UINT8, ir.DataType.INT32


def dynamic_quantize(b: Builder, value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``DynamicQuantizeLinear(value)``: (quantized uint8, scale, zero point)."""
    stem = value.name or "input"
    q, scale, zp = b.op("DynamicQuantizeLinear", [value], f"{stem}_quantized", num_outputs=3,
                        dtypes=(_UINT8, _FLOAT, _UINT8))
    scale.name = b.names(f"{stem}_scale")
    zp.name = b.names(f"{stem}_zero_point")
    scale.shape = zp.shape = ir.Shape([])
    return q, scale, zp


def _finish(ctx: Context, b: Builder, node: ir.Node, y: ir.Value) -> None:
    """Replace ``node``'s output by ``y`` and remove ``node``."""
    b.replace(node.outputs[0], y)
    assert node.graph is not None
    node.graph.remove(node, safe=True)
    _bias_second(y)


def _bias_second(y: ir.Value) -> None:
    """Turn a following ``Add(bias, y)`` into ``Add(y, bias)`` so onnxruntime fuses the bias."""
    uses = list(y.uses())
    if len(uses) != 1:
        return
    consumer, index = uses[0]
    if consumer.op_type != "Add" or consumer.domain not in ("", "ai.onnx") or index != 1:
        return
    other = consumer.inputs[0]
    if other is not None and is_constant(other) and other.const_value is not None \
            and other.const_value.shape.rank() == 1:
        consumer.replace_input_with(0, y)
        consumer.replace_input_with(1, other)


def _scaled(b: Builder, stem: str, acc: ir.Value, a_scale: ir.Value, w_scale: ir.Value,
            bias: ir.Value | None) -> ir.Value:
    """Cast(acc) * (a_scale * w_scale) [+ bias]."""
    (as_float,) = b.op("Cast", [acc], f"{stem}_float", attributes={"to": _FLOAT},
                       dtypes=(_FLOAT,))
    (scales,) = b.op("Mul", [a_scale, w_scale], f"{stem}_scales", dtypes=(_FLOAT,))
    (y,) = b.op("Mul", [as_float, scales], f"{stem}_scaled", dtypes=(_FLOAT,))
    if bias is not None:
        (y,) = b.op("Add", [y, bias], f"{stem}_biased", dtypes=(_FLOAT,))
    return y


def _describe(qtype_name: str, per_channel: bool, scalar_zp: bool = False, why: str = "") -> str:
    if not per_channel:
        return f"{qtype_name} per-tensor weights"
    details = [d for d in ("one shared zero point" if scalar_zp else "", why) if d]
    return f"{qtype_name} per-channel weights" + (f" ({'; '.join(details)})" if details else "")


def _grid_problem(ctx: Context, weight: ir.Value, choice: Granularity, form: WeightForm,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None) -> str:
    """Why the weight must stay float in the form onnxruntime runs (which may differ from the
    wanted one: another type, or per tensor where per channel was asked for)."""
    if form.per_channel == choice.per_channel and form.weight_type is ctx.config.weight_type:
        return ""
    assert form.weight_type is not None
    if choice.required and not form.per_channel:
        return (f"{choice.why}; onnxruntime runs this op only with per-tensor weights here, "
                "so it is kept float")
    actual = ctx.per_channel(weight, None, transform, qtype=form.weight_type) \
        if not form.per_channel else choice
    return actual.float_reason


# -- MatMul ------------------------------------------------------------------------------------
def _matmul_const(ctx: Context, node: ir.Node, b: Builder, a: ir.Value, weight: ir.Value, *,
                  transpose: bool = False, alpha: float = 1.0,
                  bias: ir.Value | None = None) -> Outcome:
    rank = weight.const_value.shape.rank()  # type: ignore[union-attr]
    config = ctx.config
    transform = np.transpose if transpose else None
    choice = ctx.per_channel(weight, 1 if rank == 2 else None, transform)
    if choice.float_reason:
        return False, choice.float_reason
    why = choice.why
    form = ctx.support.matmul_form(config.weight_type, choice.per_channel, ctx.symmetric)
    ctx.note(form.note, node)
    if form.weight_type is None:
        return False, form.note
    problem = _grid_problem(ctx, weight, choice, form, transform)
    if problem:
        return False, problem
    qw = ctx.weights.get(
        weight, b.graph, qtype=form.weight_type, axis=rank - 1 if form.per_channel else None,
        symmetric=ctx.symmetric, reduce_range=config.reduce_range,
        layout="T" if transpose else "", transform=transform,
        scalar_zero_point=form.per_channel and not form.channel_zero_points,
        scale_factor=alpha)
    q, a_scale, a_zp = dynamic_quantize(b, a)
    stem = node.name or "matmul"
    (acc,) = b.op("MatMulInteger", [q, qw.data, a_zp, qw.zero_point], f"{stem}_int32",
                  dtypes=(_INT32,))
    _finish(ctx, b, node, _scaled(b, stem, acc, a_scale, qw.scale, bias))
    what = _describe(form.weight_type.name, form.per_channel,
                     form.per_channel and not form.channel_zero_points, why)
    return True, f"MatMulInteger, {what}"


def _matmul_dynamic(ctx: Context, node: ir.Node, b: Builder, a: ir.Value, w: ir.Value, *,
                    alpha: float = 1.0, bias: ir.Value | None = None) -> Outcome:
    qa, a_scale, a_zp = dynamic_quantize(b, a)
    qb, b_scale, b_zp = dynamic_quantize(b, w)
    stem = node.name or "matmul"
    (acc,) = b.op("MatMulInteger", [qa, qb, a_zp, b_zp], f"{stem}_int32", dtypes=(_INT32,))
    y = _scaled(b, stem, acc, a_scale, b_scale, None)
    if alpha != 1.0:
        (y,) = b.op("Mul", [y, b.initializer(f"{stem}_alpha", np.float32(alpha))],
                    f"{stem}_alpha_scaled", dtypes=(_FLOAT,))
    if bias is not None:
        (y,) = b.op("Add", [y, bias], f"{stem}_biased", dtypes=(_FLOAT,))
    _finish(ctx, b, node, y)
    return True, "MatMulInteger, both inputs quantized at run time (uint8)"


def rewrite_matmul(ctx: Context, node: ir.Node) -> Outcome:
    """MatMul -> DynamicQuantizeLinear + MatMulInteger + Cast + Mul."""
    problem = operand_problem(node, ctx.config)
    if problem:
        return False, problem
    a, w = node.inputs[0], node.inputs[1]
    assert a is not None and w is not None
    b = ctx.builder(node)
    if is_constant(w):
        return _matmul_const(ctx, node, b, a, w)
    return _matmul_dynamic(ctx, node, b, a, w)


# -- Gemm --------------------------------------------------------------------------------------
def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _gemm_bias(b: Builder, node: ir.Node, beta: float) -> ir.Value | None:
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None or beta == 0.0:
        return None
    if beta == 1.0:
        return c
    stem = f"{node.name or 'gemm'}_bias"
    if is_constant(c):
        array = read_array(c.const_value).astype(np.float32) * np.float32(beta)  # type: ignore[arg-type]
        return b.initializer(stem, array)
    (scaled,) = b.op("Mul", [c, b.initializer(f"{stem}_beta", np.float32(beta))], stem,
                     dtypes=(_FLOAT,))
    return scaled


def rewrite_gemm(ctx: Context, node: ir.Node) -> Outcome:
    """Gemm -> [Transpose(A)] + the MatMul form, bias added after the scale."""
    problem = operand_problem(node, ctx.config)
    if problem:
        return False, problem
    a, w = node.inputs[0], node.inputs[1]
    assert a is not None and w is not None
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    b = ctx.builder(node)
    stem = node.name or "gemm"
    if trans_a:
        (a,) = b.op("Transpose", [a], f"{stem}_A_transposed", attributes={"perm": [1, 0]},
                    dtypes=(_FLOAT,))
    bias = _gemm_bias(b, node, beta)
    if is_constant(w):
        done, what = _matmul_const(ctx, node, b, a, w, transpose=bool(trans_b), alpha=alpha,
                                   bias=bias)
    else:
        if trans_b:
            (w,) = b.op("Transpose", [w], f"{stem}_B_transposed", attributes={"perm": [1, 0]},
                        dtypes=(_FLOAT,))
        done, what = _matmul_dynamic(ctx, node, b, a, w, alpha=alpha, bias=bias)
    if not done:
        for new in reversed(b.nodes):
            b.graph.remove(new, safe=True)
    return done, what


# -- Conv --------------------------------------------------------------------------------------
def rewrite_conv(ctx: Context, node: ir.Node) -> Outcome:
    """Conv -> DynamicQuantizeLinear + ConvInteger + Cast + Mul [+ Add(bias [C,1,..])]."""
    problem = operand_problem(node, ctx.config)
    if problem:
        return False, problem
    x, w = node.inputs[0], node.inputs[1]
    assert x is not None and w is not None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not is_float(bias):
        return False, "the bias is not float32"
    config = ctx.config
    choice = ctx.per_channel(w, 0)
    if choice.float_reason:
        return False, choice.float_reason
    why = choice.why
    form = ctx.support.conv_form(config.weight_type, choice.per_channel, ctx.symmetric)
    ctx.note(form.note, node)
    if form.weight_type is None:
        return False, form.note
    problem = _grid_problem(ctx, w, choice, form)
    if problem:
        return False, problem
    rank = w.const_value.shape.rank()  # type: ignore[union-attr]
    channel_shape = (-1,) + (1,) * (rank - 2)
    b = ctx.builder(node)
    qw = ctx.weights.get(
        w, b.graph, qtype=form.weight_type, axis=0 if form.per_channel else None,
        symmetric=ctx.symmetric, reduce_range=config.reduce_range,
        scale_shape=channel_shape if form.per_channel else None,
        scalar_zero_point=form.per_channel and not form.channel_zero_points)
    stem = node.name or "conv"
    if bias is not None:
        if is_constant(bias):
            array = read_array(bias.const_value).astype(np.float32)  # type: ignore[arg-type]
            bias = b.initializer(f"{bias.name}_reshaped", array.reshape(channel_shape))
        else:
            shape = b.initializer(f"{stem}_bias_shape", np.array(channel_shape, np.int64))
            (bias,) = b.op("Reshape", [bias, shape], f"{stem}_bias_reshaped", dtypes=(_FLOAT,))
    q, x_scale, x_zp = dynamic_quantize(b, x)
    acc_node = ir.Node("", "ConvInteger", [q, qw.data, x_zp, qw.zero_point],
                       attributes=list(node.attributes.values()),
                       name=ctx.names(f"{stem}_ConvInteger"))
    acc = acc_node.outputs[0]
    acc.name, acc.type = ctx.names(f"{stem}_int32"), ir.TensorType(_INT32)
    b.graph.insert_before(node, acc_node)
    _finish(ctx, b, node, _scaled(b, stem, acc, x_scale, qw.scale, bias))
    ctx.note(ctx.support.conv_speed_note(), node)
    what = _describe(form.weight_type.name, form.per_channel,
                     form.per_channel and not form.channel_zero_points, why)
    return True, f"ConvInteger, {what}"
