"""Parameters of tensors with a :class:`~onnxquant.static.config.TensorOverride`.

The planner asks here for every tensor that ``StaticQuantConfig.tensors`` names. Checks that
need the model (is the tensor an activation or a constant, how many channels has it, does the
zero point fit its type) are made here and raise :class:`QuantizationError` naming the tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.core.errors import QuantizationError
from onnxquant.core.graph import is_constant
from onnxquant.core.plan import ConvertQuant, QuantPlan, TensorQuant
from onnxquant.core.qtypes import QuantType
from onnxquant.static.config import StaticQuantConfig, TensorOverride

__all__: list[str] = []

logger = logging.getLogger(__name__)


class UnknownTensorError(QuantizationError, ValueError):
    """A per-tensor override names a tensor the model does not have."""


def check_names(model: ir.Model, config: StaticQuantConfig) -> None:
    """Raise :class:`UnknownTensorError` for overrides naming tensors absent from ``model``
    (If/Loop/Scan bodies included): a typo would otherwise silently change nothing."""
    if not config.tensors:
        return
    graph = model.graph
    names = {v.name for v in (*graph.inputs, *graph.initializers.values()) if v.name}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.update(v.name for v in (*node.inputs, *node.outputs) if v is not None and v.name)
        for attr in node.attributes.values():
            for sub in attr.value if isinstance(attr.value, list) else [attr.value]:
                if isinstance(sub, ir.Graph):
                    names.update(v.name for v in (*sub.inputs, *sub.initializers.values())
                                 if v.name)
    absent = sorted(set(config.tensors) - names)
    if absent:
        raise UnknownTensorError(
            "tensor overrides: " + "; ".join(f"tensor '{n}' is not present in the model"
                                             for n in absent[:10])
            + " (check the names: a typo, or a tensor renamed by pre-processing)")


def _error(name: str, message: str) -> QuantizationError:
    return QuantizationError(f"tensor override '{name}': {message}")


def _per_channel(name: str, key: str, value: object, channels: int | None) -> np.ndarray:
    """``value`` as float64: 0-d per tensor, one value per channel otherwise."""
    if isinstance(value, Sequence):
        if channels is None or len(value) != channels:
            raise _error(name, f"{key} has {len(value)} values but '{name}' is quantized with "
                               f"{channels or 1} scale(s); give one value per channel")
        return np.asarray([float(v) for v in value], dtype=np.float64)
    array = np.asarray(float(value), dtype=np.float64)  # type: ignore[arg-type]
    return array if channels is None else np.full(channels, array)


def explicit(name: str, role: str, qtype: QuantType, override: TensorOverride,
             axis: int | None, channels: int | None, source: str) -> TensorQuant:
    """The parameters a ``scale``/``zero_point`` override gives (one pair, or one per channel)."""
    scale = _per_channel(name, "scale", override.scale, channels).astype(np.float32)
    zero_point = _per_channel(name, "zero_point", override.zero_point, channels)
    if qtype.is_float:
        if np.any(zero_point != 0):
            raise _error(name, f"a {qtype} tensor needs zero_point 0")
        rng = None
    else:
        if np.any(zero_point < qtype.qmin) or np.any(zero_point > qtype.qmax):
            raise _error(name, f"zero_point {override.zero_point} is outside the {qtype} grid "
                               f"[{qtype.qmin}, {qtype.qmax}]")
        low = scale.astype(np.float64) * (qtype.qmin - zero_point)
        high = scale.astype(np.float64) * (qtype.qmax - zero_point)
        rng = (float(np.min(low)), float(np.max(high)))
    return TensorQuant(name, role, qtype.name, [float(s) for s in np.atleast_1d(scale)],
                       [int(z) for z in np.atleast_1d(zero_point)], axis, source, rng)


def activation(name: str, rng: tuple[float, float], override: TensorOverride,
               config: StaticQuantConfig, source: str) -> TensorQuant:
    """Parameters of an activation with an override (``rng`` is its calibrated range)."""
    per_channel = [key for key in ("scale", "zero_point", "rmin", "rmax")
                   if isinstance(getattr(override, key), Sequence)]
    if override.axis is not None or override.per_channel or per_channel:
        raise _error(name, "per-channel parameters are for constant tensors (weights), and "
                           f"'{name}' is an activation; give one value per tensor")
    if override.reduce_range is not None:
        raise _error(name, f"reduce_range is for constant tensors (weights), and '{name}' is "
                           "an activation; use quant_type or rmin/rmax instead")
    qtype = override.quant_type or config.activation_type
    source = f"{source} (override)"
    if override.scale is not None:
        return explicit(name, "activation", qtype, override, None, None, source)
    symmetric = config.activation_symmetric if override.symmetric is None else override.symmetric
    low = rng[0] if override.rmin is None else float(override.rmin)  # type: ignore[arg-type]
    high = rng[1] if override.rmax is None else float(override.rmax)  # type: ignore[arg-type]
    low, high = min(low, 0.0), max(high, 0.0)  # a one-sided override cannot invert the range
    scale, zp = numerics.compute_scale_zero_point(
        low, high, qtype, symmetric=symmetric, min_real_range=config.min_real_range)
    return TensorQuant(name, "activation", qtype.name, [float(scale)], [int(zp)], None, source,
                       (float(low), float(high)))


def constant_axis(name: str, override: TensorOverride, rank: int,
                  default_axis: int | None, node_name: str) -> int | None:
    """The per-channel axis an override chooses for a constant (None: per tensor)."""
    if override.axis is not None:
        if not -rank <= override.axis < rank:
            raise _error(name, f"axis {override.axis} is out of range for '{name}' of rank "
                               f"{rank}")
        return override.axis % rank
    if override.per_channel:
        if default_axis is None:
            raise _error(name, f"node '{node_name}' has no per-channel axis for '{name}'; "
                               "give the axis")
        return default_axis
    return None


def constant(name: str, data: np.ndarray, axis: int | None, as_weight: bool,
             override: TensorOverride, config: StaticQuantConfig) -> TensorQuant:
    """Parameters of a constant (a weight when ``as_weight``) with an override."""
    qtype = override.quant_type or (config.weight_type if as_weight else config.activation_type)
    channels = data.shape[axis] if axis is not None else None
    if override.scale is not None:
        return explicit(name, "weight", qtype, override, axis, channels, "constant (override)")
    if not as_weight:
        default_symmetric = config.activation_symmetric
    elif config.weight_symmetric is not None:
        default_symmetric = config.weight_symmetric
    else:
        default_symmetric = qtype.signed
    symmetric = default_symmetric if override.symmetric is None else override.symmetric
    reduce_range = (config.reduce_range and as_weight if override.reduce_range is None
                    else override.reduce_range)
    low, high = numerics.tensor_range(data, axis, name=name)
    if override.rmin is not None:
        low = _per_channel(name, "rmin", override.rmin, channels)
    if override.rmax is not None:
        high = _per_channel(name, "rmax", override.rmax, channels)
    low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    scale, zp = numerics.compute_scale_zero_point(low, high, qtype, symmetric=symmetric,
                                                  reduce_range=reduce_range)
    return TensorQuant(name, "weight", qtype.name, [float(s) for s in np.atleast_1d(scale)],
                       [int(z) for z in np.atleast_1d(zp).astype(np.int64)], axis,
                       "constant (override)", (float(np.min(low)), float(np.max(high))))


def plan_converts(nodes: Sequence[ir.Node], plan: QuantPlan,
                  ranges: Mapping[str, tuple[float, float]], config: StaticQuantConfig) -> None:
    """Attach the second grid (:class:`ConvertQuant`) of every planned activation whose
    override has a ``convert``; called once every node is decided, so that no output sharing
    its input's grid copies it.

    Raises:
        QuantizationError: naming the tensor, for a convert on a constant, ``recv_nodes`` that
            do not read the tensor, or a second grid without a range.
    """
    values = {v.name: v for node in nodes for v in (*node.inputs, *node.outputs)
              if v is not None and v.name}
    for name, override in config.tensors.items():
        convert = override.convert
        if convert is None:
            continue
        value, tq = values.get(name), plan.tensors.get(name)
        if value is not None and is_constant(value) or tq is not None and tq.role != "activation":
            raise _error(name, f"convert is for activations, and '{name}' is a constant "
                               "(initializer); remove the convert")
        if value is None or tq is None:
            logger.warning("tensor override '%s': its convert is ignored, the tensor is not "
                           "quantized", name)
            continue
        readers = None
        if convert.recv_nodes is not None:
            consumers = {node.name or "" for node, _ in value.uses()}
            absent = sorted(convert.recv_nodes - consumers)
            if absent:
                raise _error(name, f"convert recv_nodes {absent} do not read '{name}' (its "
                                   f"readers: {sorted(consumers)}); name readers of the tensor")
            readers = sorted(convert.recv_nodes)
        rng = ranges.get(name, tq.range)
        second = convert.as_override()
        if rng is None and not second.fixes_params:
            raise _error(name, "the tensor has no calibrated range for its convert grid; give "
                               "the convert rmin and rmax, or scale and zero_point")
        params = activation(name, rng or (0.0, 0.0), second, config, "convert")
        tq.convert = ConvertQuant(params, readers)


def convert_tensors(nodes: Sequence[ir.Node], config: StaticQuantConfig) -> set[str]:
    """Activations the selected nodes read or write whose override has a ``convert``: their
    second grid needs their own calibrated range, also where the first one is shared with the
    producer's input (Transpose, Reshape, ...)."""
    wanted = {name for name, o in config.tensors.items() if o.convert is not None}
    if not wanted:
        return set()
    return {v.name for node in nodes for v in (*node.inputs, *node.outputs)
            if v is not None and v.name in wanted and not is_constant(v)}
