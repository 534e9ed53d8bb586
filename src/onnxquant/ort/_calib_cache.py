"""onnxruntime's calibration cache (``save_tensors_data`` / ``load_tensors_data``: JSON with
numpy arrays as ``{"data", "dtype", "CLS": "numpy.array"}``) and its scipy-free KL helpers
(``entropy``, ``rel_entr``), written from the format's description."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onnxquant.ort._calib_enum import CalibrationMethod
from onnxquant.ort._tensors_data import TensorData, TensorsData

__all__ = ["save_tensors_data", "load_tensors_data", "cached_smooth_quant", "entropy", "rel_entr"]


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"data": value.tolist(), "dtype": str(value.dtype), "CLS": "numpy.array"}
    if isinstance(value, CalibrationMethod):
        return {"CLS": "CalibrationMethod", "value": str(value)}
    if isinstance(value, TensorData | TensorsData):
        return {k: _encode(v) for k, v in value.to_dict().items()}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(obj: dict) -> Any:
    kind = obj.get("CLS")
    if kind == "numpy.array":
        return np.array(obj["data"], dtype=obj["dtype"])
    if kind == "CalibrationMethod":
        return CalibrationMethod[str(obj["value"]).rsplit(".", 1)[-1]]
    if kind == "TensorData":
        return TensorData.from_dict(obj)
    if kind == "TensorsData":
        return TensorsData.from_dict(obj)
    return obj


def save_tensors_data(tensors_data: TensorsData, path: str | os.PathLike, *,
                      smooth_quant: bool = False) -> None:
    """Write ``tensors_data`` as onnxruntime's JSON calibration cache, atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = _encode(tensors_data)
    payload["smooth_quant"] = bool(smooth_quant)
    handle, temp = tempfile.mkstemp(prefix=".onnxquant-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_tensors_data(path: str | os.PathLike) -> TensorsData:
    """Read a cache written by :func:`save_tensors_data` (or by onnxruntime).

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: ``path`` is a folder, or the file holds no ``TensorsData``.
    """
    if Path(path).is_dir():
        raise ValueError(f"Calibration cache path is not a file: {path}")
    with open(path) as stream:
        loaded = json.load(stream, object_hook=_decode)
    if not isinstance(loaded, TensorsData):
        raise ValueError(f"'{path}' is not a calibration cache (no TensorsData in it)")
    return loaded


def cached_smooth_quant(path: str | os.PathLike) -> bool:
    """The ``smooth_quant`` flag a cache was saved with (False when absent: older caches)."""
    with open(path) as stream:
        raw = json.load(stream)
    return bool(raw.get("smooth_quant", False)) if isinstance(raw, dict) else False


def rel_entr(x: Any, y: Any) -> np.ndarray:
    """Elementwise ``x * log(x / y)``: 0 where ``x == 0 <= y``, inf where ``x > 0 >= y`` or
    either is negative (scipy.special.rel_entr's conventions)."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    out = np.full(x.shape, np.inf)
    both = (x > 0) & (y > 0)
    out[both] = x[both] * np.log(x[both] / y[both])
    out[(x == 0) & (y >= 0)] = 0.0
    return out


def entropy(pk: Any, qk: Any = None, base: float | None = None, axis: int = 0) -> Any:
    """Shannon entropy of ``pk``, or the KL divergence of ``pk`` from ``qk`` (both normalised
    along ``axis``), as scipy.stats.entropy computes it."""
    pk = np.asarray(pk, np.float64)
    pk = pk / np.sum(pk, axis=axis, keepdims=True)
    if qk is None:
        values = -np.where(pk > 0, pk * np.log(np.where(pk > 0, pk, 1.0)), 0.0)
    else:
        qk = np.asarray(qk, np.float64)
        qk = qk / np.sum(qk, axis=axis, keepdims=True)
        values = rel_entr(pk, qk)
    result = np.sum(values, axis=axis)
    return result / np.log(base) if base is not None else result
