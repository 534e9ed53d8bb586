"""Cross-layer equalization (CLE): even out the per-channel weight ranges of consecutive layers.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
section 4.1. For two layers ``h = f(W1 x + b1)`` and ``y = W2 h + b2`` where ``f`` is positively
homogeneous (``f(z / s) = f(z) / s`` for ``s > 0``: ReLU, LeakyReLU, PReLU with one slope,
identity), and any positive ``s`` per intermediate channel,

    y = W2 · diag(s) · f(diag(1/s) · (W1 x + b1)) + b2,

so dividing output channel ``i`` of ``W1`` and ``b1`` by ``s_i`` and multiplying input channel
``i`` of ``W2`` by ``s_i`` keeps the float function. With ``r1_i = max|W1 out-channel i|`` and
``r2_i = max|W2 in-channel i|``, ``s_i = sqrt(r1_i / r2_i)`` makes both ranges
``sqrt(r1_i · r2_i)``: a channel with a tiny range in one layer no longer gets a handful of
levels of a per-tensor weight grid. Chains (a layer second of one pair and first of the next)
are equalized by repeating the pass over all pairs. It needs no data.

Layers: Conv with group 1 or depthwise (channel ``i`` of its input is ``W[:, i]``, or ``W[i]``
when depthwise), MatMul/Gemm with a constant 2-D weight (input channel = row of ``[K, N]``; a
MatMul's bias is a constant ``[N]`` Add right after it). Convs pair with Convs, MatMul/Gemm
with MatMul/Gemm, so the channel axis of the tensor between them is the same for both.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxquant.static.corrections._layers import (
    Channels,
    constant,
    conv_weight,
    is_onnx,
    last_axis_vector,
    linear_weight,
    sole_reader,
)

__all__ = ["equalize_layers", "equalization_scales"]

logger = logging.getLogger(__name__)

_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity")


@dataclasses.dataclass(frozen=True)
class _First:
    """The first layer of a pair: its out-channel constants, the tensor it hands on, and the
    tensors on the way."""

    family: str
    weight: Channels
    bias: Channels | None
    output: ir.Value
    changed: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Pair:
    first: _First
    second: Channels
    changed: tuple[str, ...]


def _bias(value: ir.Value | None, reader: ir.Node, channels: int) -> Channels | None:
    data = constant(value)
    if value is None or data is None or sole_reader(value) is not reader:
        return None
    return Channels(value, -1) if last_axis_vector(data, channels) else None


def _first_conv(node: ir.Node) -> _First | None:
    found = conv_weight(node)
    if found is None or sole_reader(found[0]) is not node:
        return None
    weight = Channels(found[0], 0)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _bias(node.inputs[2], node, weight.count())
        if bias is None or len(bias.data().shape) != 1:
            return None
    out = node.outputs[0]
    return _First("conv", weight, bias, out, (out.name or "",))


def _first_linear(node: ir.Node) -> _First | None:
    found = linear_weight(node)
    if found is None or sole_reader(found.value) is not node:
        return None
    weight, out = found.outputs, node.outputs[0]
    channels = weight.count()
    bias = None
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _bias(node.inputs[2], node, channels)
        if bias is None:
            return None
    changed = [out.name or ""]
    add = sole_reader(out)
    if node.op_type == "MatMul" and is_onnx(add, "Add") and add is not None:
        index = 1 if add.inputs[0] is out else 0
        bias = _bias(add.inputs[index], add, channels)
        if bias is not None and add.inputs[1 - index] is out:
            out = add.outputs[0]
            changed.append(out.name or "")
        else:
            bias = None
    return _First("linear", weight, bias, out, tuple(changed))


def _first(node: ir.Node) -> _First | None:
    if is_onnx(node, "Conv"):
        return _first_conv(node)
    if is_onnx(node, "MatMul", "Gemm"):
        return _first_linear(node)
    return None


def _homogeneous(node: ir.Node, value: ir.Value) -> bool:
    """Whether ``node`` applies a positively homogeneous function to ``value``."""
    if not is_onnx(node, *_HOMOGENEOUS) or node.inputs[0] is not value:
        return False
    if node.op_type != "PRelu":
        return True
    slope = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    return slope is not None and slope.size == 1


def _second(node: ir.Node, value: ir.Value, family: str) -> Channels | None:
    """The weight of ``node`` by input channel, when ``node`` reads ``value`` as input 0."""
    if node.inputs[0] is not value:
        return None
    if family == "conv":
        found = conv_weight(node)
        if found is None or sole_reader(found[0]) is not node:
            return None
        return Channels(found[0], 0 if found[1] else 1)
    weight = linear_weight(node)
    if weight is None or sole_reader(weight.value) is not node:
        return None
    return weight.inputs


def _pair(node: ir.Node) -> _Pair | None:
    first = _first(node)
    if first is None:
        return None
    value, changed = first.output, list(first.changed)
    reader = sole_reader(value)
    if reader is not None and _homogeneous(reader, value):
        value = reader.outputs[0]
        changed.append(value.name or "")
        reader = sole_reader(value)
    if reader is None:
        return None
    second = _second(reader, value, first.family)
    if second is None or second.count() != first.weight.count():
        return None
    return _Pair(first, second, tuple(changed))


def equalization_scales(first_range: np.ndarray, second_range: np.ndarray) -> np.ndarray:
    """``s_i = sqrt(r1_i / r2_i)``, 1 where either range is 0 or not finite (float64)."""
    r1 = np.asarray(first_range, dtype=np.float64)
    r2 = np.asarray(second_range, dtype=np.float64)
    valid = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    scales = np.ones_like(r1)
    scales[valid] = np.sqrt(r1[valid] / r2[valid])
    scales[~np.isfinite(scales) | (scales <= 0)] = 1.0
    return scales


def _equalize(pair: _Pair) -> bool:
    scales = equalization_scales(pair.first.weight.absmax(), pair.second.absmax())
    if np.all(scales == 1.0):
        return False
    pair.first.weight.rescale(1.0 / scales)
    if pair.first.bias is not None:
        pair.first.bias.rescale(1.0 / scales)
    pair.second.rescale(scales)
    return True


def equalize_layers(model: ir.Model, iterations: int = 4) -> list[str]:
    """Cross-layer equalization of every eligible pair in ``model``'s main graph, in place.

    A pair is ``first -> [activation] -> second`` (see the module docstring) where each tensor
    between the two has one reader and is no graph output, and no weight or bias involved is
    read by another node. The float function is kept (up to float rounding).

    Args:
        model: The float model; its weights and biases are rewritten.
        iterations: Passes over all pairs (chains converge over passes).

    Returns:
        Names of the tensors between the layers whose float values changed.
    """
    pairs = [p for p in (_pair(node) for node in model.graph) if p is not None]
    changed: dict[str, None] = {}
    for _ in range(iterations):
        for pair in pairs:
            if _equalize(pair):
                changed.update(dict.fromkeys(pair.changed))
    if pairs:
        logger.debug("equalized %d layer pairs over %d passes", len(pairs), iterations)
    return list(changed)
