"""Static quantization with ranges given by the caller instead of calibration: the engine behind
:class:`onnxquant.ort.QDQQuantizer` and the static mode of
:class:`onnxquant.ort.onnx_quantizer.ONNXQuantizer`.

The steps are those of :func:`onnxquant.quantize_static` after calibration (open the model,
convert it to the opset the config needs, prepare it, select nodes, plan with the ranges, emit),
without the finiteness check and the accuracy measurement, which need data. The result is an
``onnx.ModelProto`` held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxquant.core import front_door, model_io
from onnxquant.ort.onnx_model import ONNXModel
from onnxquant.preprocess import passes as preprocess
from onnxquant.static.config import StaticQuantConfig as NativeStaticQuantConfig
from onnxquant.static.planner import build_plan, select_nodes
from onnxquant.static.verify import emit

__all__ = ["ranges_from_tensors_range", "quantize_with_ranges", "RangesQuantizer"]

logger = logging.getLogger(__name__)


def _bound(value: Any, pick: Any) -> float | None:
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        return None
    return float(pick(array))


def _pair(name: str, entry: Any) -> tuple[float, float] | None:
    """``(low, high)`` of a ``TensorData``, a ``(low, high)`` pair or a longer tuple."""
    if entry is None:
        return None
    if hasattr(entry, "range_value"):
        try:
            low, high = entry.range_value
        except (AttributeError, KeyError, TypeError, ValueError):
            logger.warning("tensor '%s' has no lowest/highest range and is not used", name)
            return None
    elif isinstance(entry, (tuple, list)) and len(entry) >= 2:
        low, high = entry[0], entry[1]
    else:
        raise TypeError(f"tensors_range['{name}'] must be a TensorData or a (low, high) pair, "
                        f"got {type(entry).__name__}")
    lo, hi = _bound(low, np.min), _bound(high, np.max)
    if lo is None or hi is None:
        return None
    return lo, hi


def ranges_from_tensors_range(tensors_range: Mapping[str, Any] | None
                              ) -> dict[str, tuple[float, float]]:
    """The native range table (name -> ``(low, high)``) from onnxruntime's ``tensors_range``
    (a ``TensorsData`` or a dict of ``TensorData`` / pairs); per-channel bounds are reduced to
    their overall minimum and maximum.

    Raises:
        TypeError: An entry that is neither a ``TensorData`` nor a pair.
    """
    ranges: dict[str, tuple[float, float]] = {}
    for name, entry in (tensors_range or {}).items():
        pair = _pair(name, entry)
        if pair is not None:
            ranges[name] = pair
    return ranges


def _open(model: onnx.ModelProto, config: NativeStaticQuantConfig) -> ir.Model:
    loaded, _ = front_door.open_model(model, upgrade_opset=config.upgrade_opset)
    required = config.required_opset()
    if model_io.default_opset(loaded) < required:
        loaded = model_io.convert_opset(loaded, required)
    return loaded


def quantize_with_ranges(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]],
                         config: NativeStaticQuantConfig) -> onnx.ModelProto:
    """Quantize ``model`` with ``ranges`` as the activation ranges (nothing is calibrated).

    Args:
        model: The float model (not modified).
        ranges: ``(low, high)`` by tensor name; nodes whose activations have no range stay float.
        config: The native config (``format`` selects QDQ or QOperator).

    Returns:
        The quantized model, every tensor in memory.
    """
    if config.smooth_quant:
        logger.warning("SmoothQuant needs calibration data and is skipped when the ranges are "
                       "given")
    work = _open(model, config)
    annotated = preprocess.prepare_for_quantization(work, fold_bn=config.fold_batchnorm)
    nodes = select_nodes(work, config)
    plan = build_plan(nodes, ranges, config)
    emit(work, plan, config.format)
    preprocess.drop_inferred_shapes(work, annotated)
    model_io.load_external_tensors(work)
    return ir.serde.serialize_model(work)


def _as_list(names: Collection[str] | None) -> list[str]:
    """onnxruntime's convention: ``None`` lists are empty lists."""
    return list(names) if names else []


class RangesQuantizer:
    """What onnxruntime's quantizer classes share: the arguments, kept as attributes with
    onnxruntime's names, and :attr:`model`, an :class:`~onnxquant.ort.onnx_model.ONNXModel`
    holding the float model until :meth:`quantize_model` replaces it with the quantized one."""

    def __init__(self, model: onnx.ModelProto, per_channel: bool, reduce_range: bool,
                 weight_qType: Any, activation_qType: Any,  # noqa: N803 - onnxruntime's names
                 tensors_range: Mapping[str, Any] | None,
                 nodes_to_quantize: Collection[str] | None,
                 nodes_to_exclude: Collection[str] | None,
                 op_types_to_quantize: Collection[str] | None,
                 extra_options: Mapping[str, Any] | None = None) -> None:
        self.model = ONNXModel(model)
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.weight_qType = weight_qType  # noqa: N815
        self.activation_qType = activation_qType  # noqa: N815
        self.tensors_range = tensors_range
        self.nodes_to_quantize = _as_list(nodes_to_quantize)
        self.nodes_to_exclude = _as_list(nodes_to_exclude)
        self.op_types_to_quantize = _as_list(op_types_to_quantize)
        self.extra_options = dict(extra_options or {})

    def _set_model(self, quantized: onnx.ModelProto) -> onnx.ModelProto:
        self.model = ONNXModel(quantized)
        return quantized
