"""SmoothQuant: move activation outliers into the weights of the MatMuls that read them.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models". A few input channels ``j`` of an activation ``X`` (in transformers, after a
LayerNorm) are much larger than the rest, so a per-tensor activation grid wastes its levels on
them. For ``Y = X @ W`` (``W`` of shape ``[K, N]``) and any positive ``s`` of length ``K``,

    Y = (X · diag(1/s)) @ (diag(s) · W),

so dividing channel ``j`` of ``X`` by ``s_j`` and multiplying row ``j`` of ``W`` by ``s_j``
leaves the float function unchanged. With ``s_j = max|X_j|^α / max|W_j,:|^(1-α)`` the channel
ranges of ``X`` and ``W`` meet in between (α = 0.5 balances them), and both quantize better.

The division of ``X`` is folded into the node producing it, which must scale its last axis per
channel exactly: a LayerNormalization over the last axis (its scale and bias), the decomposed
form ``Add(Mul(Z, γ), β)`` with last-axis vectors γ, β, or a MatMul/Gemm with a constant weight
(its output columns, and the constant bias of the Gemm or of an Add right after a MatMul). The
multiplication goes into the constant weights of every MatMul/Gemm reading ``X``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxquant.static.corrections._layers import (
    Channels,
    constant,
    is_onnx,
    last_axis_vector,
    linear_weight,
    only_read_by,
    sole_reader,
)
from onnxquant.static.corrections.channel_stats import ChannelStats

__all__ = ["SmoothSite", "smoothing_sites", "smoothing_tensors", "smooth_quant",
           "smoothing_scales"]

logger = logging.getLogger(__name__)

_MIN_SCALE, _MAX_SCALE = 1e-4, 1e4


@dataclasses.dataclass(frozen=True)
class SmoothSite:
    """An activation whose channels can be rescaled between its producer and its readers.

    Attributes:
        activation: Name of the activation ``X``.
        kind: The producer: ``"layernorm"``, ``"mul_add"`` or ``"linear"`` (MatMul/Gemm).
        channels: ``K``, the number of channels on the last axis of ``X``.
        producer_params: Constants divided by ``s`` (channel axis given with each).
        consumer_weights: Weights of the MatMul/Gemm readers, multiplied by ``s`` per input
            channel (each weight once, also when readers share it).
        changed: Tensors whose float values change (``X`` and the tensors between the
            producer's constants and ``X``).
    """

    activation: str
    kind: str
    channels: int
    producer_params: tuple[Channels, ...]
    consumer_weights: tuple[Channels, ...]
    changed: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Producer:
    kind: str
    params: tuple[Channels, ...]
    changed: tuple[str, ...]


def _consumers(x: ir.Value) -> tuple[list[Channels], int] | None:
    """The weights (by input channel) of the MatMul/Gemm nodes reading ``x`` as input 0, and
    their common ``K``; None when any reader is something else."""
    uses = list(x.uses())
    readers = [u.node for u in uses]
    weights: dict[int, Channels] = {}
    for use in uses:
        found = linear_weight(use.node) if use.idx == 0 else None
        if found is None or not only_read_by(found.value, readers):
            return None
        seen = weights.setdefault(id(found.value), found.inputs)
        if seen.axis != found.in_axis:
            return None
    counts = {w.count() for w in weights.values()}
    if len(counts) != 1:
        return None
    return list(weights.values()), counts.pop()


def _vector(value: ir.Value | None, reader: ir.Node, channels: int) -> Channels | None:
    """``value`` as a last-axis channel vector of length ``channels`` that only ``reader``
    reads."""
    data = constant(value)
    if value is None or data is None or not last_axis_vector(data, channels):
        return None
    return Channels(value, -1) if sole_reader(value) is reader else None


def _layernorm(node: ir.Node, x: ir.Value, channels: int) -> _Producer | None:
    axis = node.attributes.get_int("axis", -1)
    rank = len(x.shape) if x.shape is not None else None
    if node.outputs[0] is not x or (axis != -1 and (rank is None or axis != rank - 1)):
        return None
    inputs = [v for v in node.inputs[1:3] if v is not None]
    params = [_vector(v, node, channels) for v in inputs]
    if not inputs or any(p is None for p in params):
        return None
    return _Producer("layernorm", tuple(p for p in params if p is not None), (x.name or "",))


def _linear(node: ir.Node, y: ir.Value, channels: int, extra: tuple[Channels, ...] = ()
            ) -> _Producer | None:
    """A MatMul/Gemm producing ``y``: its weight's output columns and constant bias."""
    weight = linear_weight(node)
    if weight is None or node.outputs[0] is not y or sole_reader(weight.value) is not node:
        return None
    if weight.outputs.count() != channels:
        return None
    params = [weight.outputs, *extra]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _vector(node.inputs[2], node, channels)
        if bias is None:
            return None
        params.append(bias)
    return _Producer("linear", tuple(params), ())


def _mul(node: ir.Node, add: ir.Node, beta: Channels, channels: int) -> _Producer | None:
    """``Mul(Z, γ)`` feeding ``add``: γ and β are divided."""
    for index in (0, 1):
        gamma = _vector(node.inputs[index], node, channels)
        if gamma is not None and constant(node.inputs[1 - index]) is None:
            return _Producer("mul_add", (gamma, beta), ())
    return None


def _add(add: ir.Node, x: ir.Value, channels: int) -> _Producer | None:
    """``Add(Y, β)`` where ``Y`` comes from a Mul with a constant γ or from a MatMul/Gemm."""
    for index in (0, 1):
        y = add.inputs[index]
        beta = _vector(add.inputs[1 - index], add, channels)
        if y is None or beta is None or sole_reader(y) is not add:
            continue
        node = y.producer()
        found = None
        if is_onnx(node, "Mul") and node is not None:
            found = _mul(node, add, beta, channels)
        elif is_onnx(node, "MatMul", "Gemm") and node is not None:
            found = _linear(node, y, channels, (beta,))
        if found is not None:
            changed = (x.name or "", y.name or "")
            return dataclasses.replace(found, changed=changed)
    return None


def _producer(x: ir.Value, channels: int) -> _Producer | None:
    node = x.producer()
    if node is None:
        return None
    if is_onnx(node, "LayerNormalization"):
        return _layernorm(node, x, channels)
    if is_onnx(node, "Add"):
        return _add(node, x, channels)
    if is_onnx(node, "MatMul", "Gemm"):
        found = _linear(node, x, channels)
        return dataclasses.replace(found, changed=(x.name or "",)) if found else None
    return None


def _site(x: ir.Value) -> SmoothSite | None:
    if not x.name or x.is_graph_output() or x.is_graph_input() or not x.uses():
        return None
    consumers = _consumers(x)
    if consumers is None:
        return None
    weights, channels = consumers
    producer = _producer(x, channels)
    if producer is None:
        return None
    if {id(p.value) for p in producer.params} & {id(w.value) for w in weights}:
        return None  # a weight both divided and multiplied: leave it alone
    return SmoothSite(x.name, producer.kind, channels, producer.params, tuple(weights),
                      producer.changed)


def smoothing_sites(model: ir.Model) -> list[SmoothSite]:
    """Every activation of the main graph that SmoothQuant can rescale exactly.

    A site is a tensor ``X`` (no graph input or output) that only MatMul/Gemm nodes read, as
    their first input, with constant 2-D weights (Gemm: ``transA=0``; ``transB`` handled), and
    whose producer can divide its last axis per channel (see the module docstring). Weights
    shared with nodes that do not read ``X`` are never rescaled: such sites are left out.
    """
    sites = []
    for node in model.graph:
        for value in node.outputs:
            site = _site(value)
            if site is not None:
                sites.append(site)
    return sites


def smoothing_tensors(model: ir.Model) -> dict[str, int]:
    """The statistics :func:`smooth_quant` needs: ``{X: -1}`` (last axis) for every site."""
    return {site.activation: -1 for site in smoothing_sites(model)}


def smoothing_scales(activation_absmax: np.ndarray, weight_absmax: np.ndarray,
                     alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j,:|^(1-α)``, 1 where either maximum is 0 or not finite,
    clipped to ``[1e-4, 1e4]`` (float64)."""
    act = np.asarray(activation_absmax, dtype=np.float64)
    wgt = np.asarray(weight_absmax, dtype=np.float64)
    valid = (act > 0) & (wgt > 0) & np.isfinite(act) & np.isfinite(wgt)
    scales = np.ones_like(act)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scales[valid] = act[valid] ** alpha / wgt[valid] ** (1.0 - alpha)
    scales[~np.isfinite(scales)] = 1.0
    return np.clip(scales, _MIN_SCALE, _MAX_SCALE)


def smooth_quant(model: ir.Model, stats: Mapping[str, ChannelStats], alpha: float = 0.5
                 ) -> list[str]:
    """Apply SmoothQuant to every site of ``model`` (changed in place) that has statistics.

    Args:
        model: The float model; its constants are rewritten, its float function is kept.
        stats: Per-channel statistics of the sites' activations over the last axis
            (:func:`smoothing_tensors` names them); sites without them, or with another
            channel count, are skipped.
        alpha: Migration strength in ``[0, 1]``: 0 leaves activations as they are (only the
            weights' ranges matter), 1 moves their whole range into the weights.

    Returns:
        Names of the tensors whose float values changed (their calibrated ranges are stale).

    Raises:
        ValueError: ``alpha`` is outside ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    changed: list[str] = []
    for site in smoothing_sites(model):
        found = stats.get(site.activation)
        if found is None or found.absmax.shape != (site.channels,):
            continue
        weight_max = np.max([w.absmax() for w in site.consumer_weights], axis=0)
        scales = smoothing_scales(found.absmax, weight_max, alpha)
        if np.all(scales == 1.0):
            continue
        for param in site.producer_params:
            param.rescale(1.0 / scales)
        for weight in site.consumer_weights:
            weight.rescale(scales)
        changed.extend(site.changed)
        logger.debug("smoothed %s (%s, largest factor %.3g)", site.activation, site.kind,
                     float(scales.max()))
    return changed
