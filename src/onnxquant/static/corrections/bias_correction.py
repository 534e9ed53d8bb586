"""Empirical bias correction: remove the mean output shift that weight rounding causes.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
section 4.2, and Banner et al. 2019, "Post training 4-bit quantization of convolutional networks
for rapid-deployment". Rounding a weight to its grid, ``W_q = W + ΔW``, shifts a layer's output
by ``ΔW · x``; its expectation ``E[ΔW · x] = ΔW · E[x]`` is not zero when the inputs have a
nonzero mean (after ReLU they always do), so the quantized layer is biased. Subtracting the
expected shift from the layer's bias removes it:

    b_corrected = b - ΔW · E[x].

``E[x]`` is the per-channel mean of the layer's input over calibration data (the *empirical*
variant; the paper's data-free variant estimates it from BatchNorm statistics). Contractions:
Conv ``shift_o = Σ_i (Σ_k ΔW[o, i, k]) · E[x_i]`` (every kernel position sees the same channel
mean; zero padding at the borders is ignored), depthwise Conv ``shift_o = (Σ_k ΔW[o, 0, k]) ·
E[x_o]``, MatMul ``shift = E[x] @ ΔW``, Gemm ``alpha · E[x] @ ΔB`` (``ΔB^T`` with ``transB``)
corrected through ``C`` divided by ``beta``.

``W_q`` is the grid the plan chose for the weight, so the caller plans first, corrects, then
plans again (the int32 bias parameters are computed from the corrected bias).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxquant.core.plan import QuantPlan, TensorQuant
from onnxquant.static.corrections._layers import (
    constant,
    conv_weight,
    is_onnx,
    last_axis_vector,
    linear_weight,
    new_constant,
    sole_reader,
)
from onnxquant.static.corrections.channel_stats import ChannelStats

__all__ = ["bias_correction_tensors", "correct_biases", "weight_rounding_error"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Target:
    """A quantized layer whose bias can absorb the expected shift.

    ``kind``: ``conv``, ``depthwise``, ``matmul`` or ``gemm``. ``bias_node``/``bias_input``:
    where the bias is (the Add after a MatMul; input 2 of a Conv/Gemm, possibly absent).
    """

    node: ir.Node
    kind: str
    activation: str
    weight: ir.Value
    params: TensorQuant
    bias_node: ir.Node
    bias_input: int

    @property
    def axis(self) -> int:
        return 1 if self.kind in ("conv", "depthwise") else -1


def _matmul_bias(node: ir.Node, channels: int) -> tuple[ir.Node, int] | None:
    """The Add right after a MatMul with a constant ``[N]`` operand, and that operand's index."""
    add = sole_reader(node.outputs[0])
    if add is None or not is_onnx(add, "Add"):
        return None
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    data = constant(add.inputs[index])
    if data is None or add.inputs[1 - index] is not node.outputs[0]:
        return None
    return (add, index) if last_axis_vector(data, channels) else None


def _kind(node: ir.Node) -> str | None:
    if is_onnx(node, "Conv"):
        found = conv_weight(node)
        return None if found is None else ("depthwise" if found[1] else "conv")
    if is_onnx(node, "MatMul", "Gemm") and linear_weight(node) is not None:
        return node.op_type.lower()
    return None


def _target(node: ir.Node, plan: QuantPlan) -> _Target | None:
    decision = plan.nodes.get(node.name or "")
    if decision is None or decision.action != "quantize" or len(node.inputs) < 2:
        return None
    kind, weight, activation = _kind(node), node.inputs[1], node.inputs[0]
    params = plan.tensors.get(weight.name or "") if weight is not None else None
    if kind is None or weight is None or params is None or params.role != "weight":
        return None
    if activation is None or not activation.name:
        return None
    if kind != "matmul":
        return _Target(node, kind, activation.name, weight, params, node, 2)
    data = constant(weight)
    found = _matmul_bias(node, data.shape[1]) if data is not None else None
    if found is None:
        return None
    return _Target(node, kind, activation.name, weight, params, *found)


def _targets(model: ir.Model, plan: QuantPlan) -> list[_Target]:
    return [t for t in (_target(node, plan) for node in model.graph) if t is not None]


def bias_correction_tensors(model: ir.Model, plan: QuantPlan) -> dict[str, int]:
    """The statistics :func:`correct_biases` needs: ``{input activation: channel axis}``.

    For every node the plan quantizes whose weight (input 1) the plan stores as a ``"weight"``:
    Conv with group 1 or depthwise (axis 1), MatMul with a constant 2-D weight followed by an
    Add of a constant ``[N]`` bias, and Gemm with ``transA=0`` (axis -1).
    """
    return {t.activation: t.axis for t in _targets(model, plan)}


def weight_rounding_error(weight: np.ndarray, params: TensorQuant) -> np.ndarray:
    """``ΔW = dequantize(quantize(W)) - W`` on the grid of ``params``, float64."""
    restored = params.dequantize(params.quantize(weight))
    return restored.astype(np.float64) - np.asarray(weight, dtype=np.float64)


def _contract(target: _Target, weight: np.ndarray, means: np.ndarray) -> np.ndarray | None:
    """``weight`` applied to a constant input of per-channel values ``means`` (before any Gemm
    alpha), or None when the channel counts differ."""
    node, kind = target.node, target.kind
    if kind == "depthwise":
        sums = weight.reshape(weight.shape[0], -1).sum(axis=1)
        return sums * means if means.shape == sums.shape else None
    if kind == "conv":
        sums = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)
        return sums @ means if means.shape == (sums.shape[1],) else None
    if kind == "gemm" and node.attributes.get_int("transB", 0) != 0:
        weight = weight.T
    return means @ weight if means.shape == (weight.shape[0],) else None


def _gemm_factor(node: ir.Node) -> float | None:
    """How much of a shift in ``alpha · A @ B`` one unit of ``C`` removes: ``alpha / beta``."""
    beta = node.attributes.get_float("beta", 1.0)
    return None if beta == 0 else node.attributes.get_float("alpha", 1.0) / beta


def _new_bias(target: _Target, shift: np.ndarray) -> np.ndarray | None:
    """The corrected bias data, or None when the present bias is not a constant we can
    rewrite."""
    inputs = target.bias_node.inputs
    index = target.bias_input
    present = index < len(inputs) and inputs[index] is not None
    data = constant(inputs[index]) if present else None
    if present and data is None:
        return None
    if target.kind == "gemm":
        factor = _gemm_factor(target.node)
        if factor is None:
            return None
        shift = shift * factor
    if data is None:
        return -shift
    if target.kind in ("conv", "depthwise") and data.shape != shift.shape:
        return None
    if target.kind == "matmul":
        shift = shift.reshape(data.shape)
    return data.astype(np.float64) - shift


def _write_bias(graph: ir.Graph, target: _Target, data: np.ndarray) -> str:
    """Put ``data`` into the bias input: in place when only this node reads it, else as a new
    initializer ``<node>.corrected_bias``."""
    node, index = target.bias_node, target.bias_input
    old = node.inputs[index] if index < len(node.inputs) else None
    dtype = (old.const_value.dtype.numpy() if old is not None and old.const_value is not None
             else target.weight.dtype.numpy() if target.weight.dtype is not None
             else np.float32)
    data = np.asarray(data).astype(dtype)
    if old is not None and sole_reader(old) is node and old.const_value is not None:
        old.const_value = ir.tensor(data, name=old.name)
        old.shape = ir.Shape(data.shape)
        return old.name or ""
    value = new_constant(graph, f"{target.node.name}.corrected_bias", data)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    return value.name or ""


def _output_step(target: _Target, plan: QuantPlan) -> float:
    """The largest step of the grid the biased output is quantized to (0 without one)."""
    output = target.bias_node.outputs[0].name if target.bias_node.outputs else None
    params = plan.tensors.get(output or "")
    return float(np.max(params.scale_array())) if params is not None else 0.0


def _correct(model: ir.Model, target: _Target, stats: ChannelStats,
             min_shift_ratio: float, floor: float = 0.0) -> str | None:
    weight = constant(target.weight)
    if weight is None or not np.all(np.isfinite(stats.mean)):
        return None  # NaN/Inf in the calibration data: no trustworthy mean
    shift = _contract(target, weight_rounding_error(weight, target.params), stats.mean)
    if shift is None or not np.all(np.isfinite(shift)) or not np.any(shift):
        return None
    if np.max(np.abs(shift)) < floor:
        return None
    if min_shift_ratio > 0:
        bound = _contract(target, np.abs(weight.astype(np.float64)), stats.absmax)
        if bound is None or np.max(np.abs(shift)) < min_shift_ratio * np.max(bound):
            return None
    data = _new_bias(target, shift)
    return None if data is None else _write_bias(model.graph, target, data)


def correct_biases(model: ir.Model, plan: QuantPlan, stats: Mapping[str, ChannelStats],
                   min_shift_ratio: float = 0.0, *, grid_steps: float = 0.0) -> list[str]:
    """Subtract each quantized layer's expected output shift ``ΔW · E[x]`` from its bias.

    Args:
        model: The float model the plan was made for (changed in place).
        plan: The plan whose weight grids define ``ΔW``.
        stats: Per-channel statistics of the layers' inputs, on the axes
            :func:`bias_correction_tensors` names; layers without them are skipped.
        min_shift_ratio: Leave a layer alone when its largest shift is below this fraction of
            its largest output bound ``Σ_i |W_oi| · max|x_i|`` (0 corrects every nonzero shift).
        grid_steps: Leave a layer alone when its largest shift is below this many steps of
            the grid its biased output is quantized to (a shift the grid cannot show);
            layers whose output has no grid are corrected.

    Returns:
        Names of the bias tensors written (a Conv/Gemm without a bias gets a new one named
        ``<node>.corrected_bias``, as does a layer whose bias other nodes also read).
    """
    changed = []
    for target in _targets(model, plan):
        found = stats.get(target.activation)
        floor = grid_steps * _output_step(target, plan)
        name = _correct(model, target, found, min_shift_ratio, floor) \
            if found is not None else None
        if name is not None:
            changed.append(name)
    if changed:
        logger.debug("corrected %d biases for weight rounding", len(changed))
    return changed
