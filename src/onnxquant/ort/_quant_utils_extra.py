"""More names of ``onnxruntime.quantization.quant_utils``: block-wise parameters, quantizing an
initializer, the restricted-asymmetric uint8 zero point, opset and metadata helpers.

Re-exported by :mod:`onnxquant.ort.quant_utils`; the conventions are onnxruntime's
(``(zero_point, scale)`` order, ``TensorProto`` element types, 4-bit values packed two per byte,
the first in the low nibble).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from onnxquant.core import numerics
from onnxquant.ort._quant_numerics import (
    ONNX_TYPE_TO_NP_TYPE,
    get_qmin_qmax_for_qType,
    pack_bytes_to_4bit,
    quantize_nparray,
)

__all__ = [
    "ms_domain",
    "INFER_METADATA_KEY",
    "INFER_METADATA_VALUE",
    "add_infer_metadata",
    "model_has_infer_metadata",
    "model_has_external_data",
    "get_opset_version",
    "update_opset_version",
    "snap_zero_point_to_uint8",
    "compute_scale_zp_blocked",
    "quantize_onnx_initializer",
]

logger = logging.getLogger(__name__)

ms_domain = "com.microsoft"
INFER_METADATA_KEY = "onnx.infer"
INFER_METADATA_VALUE = "onnxruntime.quant"
_SIXTEEN_BIT = ("QInt16", "QUInt16")
_FOUR_BIT_TYPES = (TensorProto.INT4, TensorProto.UINT4)
_INTEGER_TYPES = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                  *_FOUR_BIT_TYPES)


def add_infer_metadata(model: onnx.ModelProto) -> None:
    """Record in ``model``'s metadata that ONNX shape inference ran on it (onnxruntime's key)."""
    for prop in model.metadata_props:
        if prop.key == INFER_METADATA_KEY:
            prop.value = INFER_METADATA_VALUE
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = INFER_METADATA_KEY, INFER_METADATA_VALUE


def model_has_infer_metadata(model: onnx.ModelProto) -> bool:
    """Whether :func:`add_infer_metadata` (or onnxruntime's loader) marked ``model``."""
    return any(p.key == INFER_METADATA_KEY and p.value == INFER_METADATA_VALUE
               for p in model.metadata_props)


def model_has_external_data(model: onnx.ModelProto | str | os.PathLike) -> bool:
    """Whether any initializer of the main graph is stored in an external file.

    Args:
        model: A path (read without its external data) or a loaded ``ModelProto``.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def get_opset_version(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) opset ``model`` imports.

    Raises:
        ValueError: The model imports the default domain zero or several times.
    """
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if len(versions) != 1:
        raise ValueError(f"the model must import the ai.onnx domain exactly once, found "
                         f"{len(versions)} imports")
    return versions[0]


def _type_name(qtype: Any) -> str:
    return str(getattr(qtype, "name", qtype))


def _override_types(overrides: Any) -> set[str]:
    """Names of the quant types (and convert types) named in TensorQuantOverrides."""
    names: set[str] = set()
    for entries in (overrides or {}).values():
        for entry in entries if isinstance(entries, list) else [entries]:
            if not isinstance(entry, dict):
                continue
            if "quant_type" in entry:
                names.add(_type_name(entry["quant_type"]))
            if isinstance(entry.get("convert"), dict) and "quant_type" in entry["convert"]:
                names.add(_type_name(entry["convert"]["quant_type"]))
    return names


def _target_opset(opset: int, types: set[str], block_size: int, float8: bool) -> int:
    if opset < 21 and (block_size > 0 or types & set(_SIXTEEN_BIT)):
        return 21
    if opset < 19 and float8:
        return 19
    if opset < 10:
        return 11
    if opset == 10:
        logger.warning("opset 10 is old: per-channel quantization needs opset 13 or newer; "
                       "convert the model with onnx.version_converter first")
    return opset


def update_opset_version(model: onnx.ModelProto, weight_type: Any, activation_type: Any = None,
                         tensor_quant_overrides: Any = None, block_size: int = 0
                         ) -> onnx.ModelProto:
    """The model at the opset its quantized form needs (onnxruntime's rules).

    Opset 21 for block-wise weights or any 16-bit type (arguments or overrides), 19 for float8
    weights, 11 below opset 10. The model is converted with ``onnx.version_converter`` (a new
    model; ``model`` is returned unchanged when no conversion is needed).

    Args:
        model: The float model.
        weight_type: ``QuantType`` of the weights (onnxquant's or onnxruntime's).
        activation_type: ``QuantType`` of the activations, if any.
        tensor_quant_overrides: ``extra_options["TensorQuantOverrides"]``.
        block_size: ``extra_options["BlockSize"]``.
    """
    types = {_type_name(weight_type)} | _override_types(tensor_quant_overrides)
    if activation_type is not None:
        types.add(_type_name(activation_type))
    float8 = _type_name(weight_type) == "QFLOAT8E4M3FN"
    opset = get_opset_version(model)
    target = _target_opset(opset, types, int(block_size or 0), float8)
    if target == opset:
        return model
    logger.warning("the model's opset %d is converted to %d for quantization", opset, target)
    converted = onnx.version_converter.convert_version(model, target)
    if target >= 21:
        converted.ir_version = max(converted.ir_version, 10)
    return converted


def snap_zero_point_to_uint8(rmin: Any, rmax: Any, qmin: Any = 0, qmax: Any = 255,
                             min_real_range: float | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """``(zero_point, scale)`` with the zero point restricted to ``qmin`` or the grid's middle.

    ``ActivationRestrictedAsymmetric``: the range is widened to contain 0; when it holds no
    negative value the zero point is ``qmin`` and ``scale = rmax / (qmax - qmin)``, else it is
    ``mid = (qmin + qmax + 1) // 2`` (128 for uint8) and the scale is the smallest that fits
    both sides, ``max(-rmin / (mid - qmin), rmax / (qmax - mid))``. The scale is at least
    ``min_real_range / (qmax - qmin)``; a zero scale becomes 1.
    """
    scale, zero_point = numerics.restricted_grid(
        float(np.asarray(rmin, dtype=np.float64)), float(np.asarray(rmax, dtype=np.float64)),
        int(qmin), int(qmax), min_real_range)
    return np.array(zero_point, dtype=np.uint8), np.array(scale, dtype=np.float32)


def _blocks_first(data: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """``data`` with ``axis`` first, zero-padded to whole blocks, as ``[blocks, size, rest]``."""
    moved = np.moveaxis(data, axis, 0)
    k = moved.shape[0]
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, *moved.shape[1:]), dtype=moved.dtype)
    padded[:k] = moved
    return padded.reshape(blocks, block_size, -1)


def compute_scale_zp_blocked(data: np.ndarray, quant_type: int, axis: int, block_size: int,
                             symmetric: bool = False, reduce_range: bool = False
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Per-block ``(zero_points, scales)`` of a 2-D weight, blocks of ``block_size`` along
    ``axis`` (the last block zero-padded).

    Both arrays have the weight's shape with ``shape[axis] = ceil(K / block_size)``. Each
    block's range is widened to contain 0 (and made symmetric when asked); a block whose scale
    would be below float32's smallest normal gets scale 1 and zero point 0. Scales have the
    weight's float dtype, zero points the quantized type's numpy dtype.

    Raises:
        ValueError: A weight that is not 2-D, a bad axis or block size, or a float8 type.
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"block-wise parameters need a 2-D weight, got shape {data.shape}")
    if axis not in (0, 1, -1, -2) or block_size <= 0:
        raise ValueError(f"bad axis {axis} or block_size {block_size} for a 2-D weight")
    axis %= 2
    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range, symmetric=symmetric)
    blocks = _blocks_first(data.astype(np.float64), axis, block_size)
    rmin = np.minimum(blocks.min(axis=1), 0.0)
    rmax = np.maximum(blocks.max(axis=1), 0.0)
    if symmetric:
        rmax = np.maximum(np.abs(rmin), rmax)
        rmin = -rmax
    scale = (rmax - rmin) / (float(qmax) - float(qmin))
    if symmetric:
        zero_point = np.full(scale.shape, np.round((float(qmin) + float(qmax)) / 2.0))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.round(float(qmin) - rmin / scale)
    degenerate = scale < np.finfo(np.float32).tiny
    scale = np.where(degenerate, 1.0, scale)
    zero_point = np.where(degenerate, 0.0, zero_point)
    shape = list(np.moveaxis(data, axis, 0).shape)
    shape[0] = blocks.shape[0]
    dtype = data.dtype if data.dtype.kind == "f" else np.dtype(np.float32)
    scales = np.moveaxis(scale.reshape(shape), 0, axis).astype(dtype)
    zero_points = np.moveaxis(zero_point.reshape(shape), 0, axis).astype(qmin.dtype)
    return zero_points, scales


def _expand(params: np.ndarray, data: np.ndarray, axis: int | None,
            block_size: int | None) -> np.ndarray:
    """Parameters broadcast against ``data`` (per tensor, per axis or per block)."""
    params = np.asarray(params)
    if axis is None or params.size == 1:
        return params.reshape(())
    axis %= data.ndim
    if block_size:
        return np.repeat(params, block_size, axis=axis).take(range(data.shape[axis]), axis=axis)
    shape = [1] * data.ndim
    shape[axis] = data.shape[axis]
    return params.reshape(shape)


def _quantize_elementwise(quant_type: int, data: np.ndarray, scales: np.ndarray,
                          zero_points: np.ndarray) -> np.ndarray:
    """``clip(round_half_even(data / scale) + zero_point)`` with parameters broadcast against
    ``data`` (float32 arithmetic, the full grid of the type)."""
    qmin, qmax = get_qmin_qmax_for_qType(quant_type)
    scaled = np.rint(data.astype(np.float32) / scales.astype(np.float32))
    shifted = scaled.astype(np.float64) + zero_points.astype(np.float64)
    return np.clip(shifted, float(qmin), float(qmax)).astype(qmin.dtype)


def quantize_onnx_initializer(weight: onnx.TensorProto, quant_type: int, zero_point: Any,
                              scale: Any, axis: int | None = None,
                              quant_data_name: str | None = None,
                              block_size: int | None = None) -> onnx.TensorProto:
    """The quantized form of an initializer, as a new ``TensorProto``.

    Args:
        weight: The float initializer.
        quant_type: ``TensorProto`` element type of the result.
        zero_point: Zero point(s): one, one per slice along ``axis``, or per block.
        scale: Scale(s), shaped like ``zero_point``.
        axis: The per-channel or block axis; ``None`` for per-tensor parameters.
        quant_data_name: Name of the result (default ``<weight>_quantized``).
        block_size: Block size along ``axis`` for block-wise parameters.

    Returns:
        The quantized tensor (4-bit types packed two per byte, as raw data).
    """
    data = onnx.numpy_helper.to_array(weight)
    name = quant_data_name or f"{weight.name}_quantized"
    scales = _expand(scale, data, axis, block_size)
    zero_points = _expand(zero_point, data, axis, block_size)
    if scales.ndim == 0 or quant_type not in _INTEGER_TYPES:
        quantized = quantize_nparray(quant_type, data, scales, zero_points)
    else:
        quantized = _quantize_elementwise(quant_type, data, scales, zero_points)
    if quant_type in _FOUR_BIT_TYPES:
        packed = bytes(pack_bytes_to_4bit(quantized.tobytes()))
        return onnx.helper.make_tensor(name, quant_type, list(data.shape), packed, raw=True)
    tensor = onnx.numpy_helper.from_array(
        np.asarray(quantized, dtype=ONNX_TYPE_TO_NP_TYPE[quant_type]), name)
    if quant_type != tensor.data_type:  # float8 arrays may come back as another dtype
        tensor = onnx.helper.make_tensor(name, quant_type, list(data.shape),
                                         np.asarray(quantized).tobytes(), raw=True)
    return tensor
