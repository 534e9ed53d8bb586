"""TensorRT calibration tables: ``write_calibration_table`` and a reader for its flatbuffer.

``calibration.flatbuffers`` follows TensorRT's ``TrtTable`` schema (onnxruntime's
``CalTableFlatBuffers``)::

    namespace CalTableFlatBuffers;
    table KeyValue { key:string; value:string; }
    table TrtTable { dict:[KeyValue]; }
    root_type TrtTable;

and is built here with the ``flatbuffers`` package's ``Builder`` directly (no generated code).
The value of each tensor is ``max(|lowest|, |highest|)`` as a Python float string: TensorRT
reads it as the symmetric dynamic range ``±value``. onnxruntime writes ``max(highest, lowest)``,
which is too small for tensors whose negative side dominates. The entries are stored in sorted
key order (onnxruntime stores them reversed; readers look keys up, so the order carries no
meaning).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
from flatbuffers import encode, number_types, packer, table

from onnxquant.core.errors import OutputPathError, QuantizationError

__all__ = ["write_calibration_table", "read_calibration_flatbuffer", "dynamic_range"]

FLATBUFFER_NAME = "calibration.flatbuffers"
JSON_NAME = "calibration.json"
CACHE_NAME = "calibration.cache"


def _low_high(name: str, value: Any) -> tuple[Any, Any]:
    if hasattr(type(value), "range_value"):
        try:
            return value.range_value
        except AttributeError as err:
            raise QuantizationError(f"tensor {name!r} has no calibrated range (lowest/highest); "
                                    "calibrate it with MinMax, Entropy or Percentile") from err
    if isinstance(value, (tuple, list)) and len(value) >= 2:
        return value[0], value[1]
    raise QuantizationError(f"tensor {name!r}: expected a TensorData or a (low, high) pair, "
                            f"got {type(value).__name__}")


def dynamic_range(name: str, value: Any) -> float:
    """``max(|lowest|, |highest|)`` of one entry (over all channels of per-channel ranges).

    Raises:
        QuantizationError: The entry has no range, or it is not finite.
    """
    low, high = _low_high(name, value)
    both = np.abs(np.concatenate([np.asarray(low, np.float64).ravel(),
                                  np.asarray(high, np.float64).ravel()]))
    if both.size == 0 or not np.all(np.isfinite(both)):
        raise QuantizationError(f"tensor {name!r} has an empty or non-finite range "
                                f"({low!r}, {high!r}); check the calibration data")
    return float(both.max())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        array = np.asarray(obj)
        return {"data": array.tolist(), "dtype": str(array.dtype), "CLS": "numpy.array"}
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot write {type(obj).__name__} to calibration.json")


def _json_entry(value: Any, low: Any, high: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return {"lowest": np.asarray(low), "highest": np.asarray(high), "CLS": "TensorData"}


def _flatbuffer(entries: list[tuple[str, str]]) -> bytes:
    builder = flatbuffers.Builder(1024)
    offsets = []
    for key, value in entries:
        key_offset, value_offset = builder.CreateString(key), builder.CreateString(value)
        builder.StartObject(2)  # KeyValue
        builder.PrependUOffsetTRelativeSlot(0, key_offset, 0)
        builder.PrependUOffsetTRelativeSlot(1, value_offset, 0)
        offsets.append(builder.EndObject())
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):  # prepending: the last one goes in first
        builder.PrependUOffsetTRelative(offset)
    vector = builder.EndVector()
    builder.StartObject(1)  # TrtTable
    builder.PrependUOffsetTRelativeSlot(0, vector, 0)
    builder.Finish(builder.EndObject())
    return bytes(builder.Output())


def read_calibration_flatbuffer(data: bytes) -> dict[str, str]:
    """The ``key -> value`` entries of a ``TrtTable`` flatbuffer (in stored order)."""
    buf = bytearray(data)
    root = table.Table(buf, encode.Get(packer.uoffset, buf, 0))
    entries: dict[str, str] = {}
    vector_field = root.Offset(4)  # vtable slot 0: dict
    if not vector_field:
        return entries
    start = root.Vector(vector_field)
    for i in range(root.VectorLen(vector_field)):
        position = start + i * number_types.UOffsetTFlags.bytewidth
        entry = table.Table(buf, root.Indirect(position))
        key_field, value_field = entry.Offset(4), entry.Offset(6)
        key = entry.String(key_field + entry.Pos).decode() if key_field else ""
        value = entry.String(value_field + entry.Pos).decode() if value_field else ""
        entries[key] = value
    return entries


def write_calibration_table(calibration_cache: Mapping[str, Any] | Any,
                            dir: str | os.PathLike = ".") -> None:  # noqa: A002
    """Write ``calibration.flatbuffers``, ``calibration.json`` and ``calibration.cache`` to
    ``dir`` for TensorRT (``trt_int8_calibration_table_name``).

    Args:
        calibration_cache: Tensor name -> ``TensorData`` or ``(low, high)``; or a
            ``TensorsData``.
        dir: An existing folder. The three files are written to temporary files first and
            renamed into place, so a failure leaves no partial table.

    Raises:
        OutputPathError: ``dir`` does not exist or is not a folder.
        QuantizationError: An entry has no finite range.
    """
    folder = Path(dir)
    if not folder.is_dir():
        raise OutputPathError(f"calibration table folder '{folder}' does not exist or is not a "
                              "folder; create it first (write_calibration_table does not)")
    names = sorted(calibration_cache.keys())
    ranges = {name: dynamic_range(name, calibration_cache[name]) for name in names}
    entries = [(name, str(ranges[name])) for name in names]
    json_data = {name: _json_entry(calibration_cache[name],
                                   *_low_high(name, calibration_cache[name])) for name in names}
    contents = {
        FLATBUFFER_NAME: _flatbuffer(entries),
        JSON_NAME: json.dumps(json_data, default=_json_default).encode(),
        CACHE_NAME: "".join(f"{key} {value}\n" for key, value in entries).encode(),
    }
    _write_all(folder, contents)


def _write_all(folder: Path, contents: dict[str, bytes]) -> None:
    temps: dict[str, str] = {}
    try:
        for name, data in contents.items():
            fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            temps[name] = temp
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        for name, temp in temps.items():
            os.replace(temp, folder / name)
    except OSError as err:
        raise OutputPathError(f"could not write the calibration table to '{folder}': {err}"
                              ) from err
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.unlink(temp)
