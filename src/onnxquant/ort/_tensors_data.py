"""``TensorData`` and ``TensorsData``: what onnxruntime's calibrators return.

Same keys, validation and dict-like behaviour as ``onnxruntime.quantization.calibrate``: a
:class:`TensorData` holds some of ``lowest``, ``highest``, ``avg``, ``std``, ``hist``,
``hist_edges`` and ``bins`` (the float ones as float16/float32 arrays); a :class:`TensorsData`
maps tensor names to them and records the calibration method that produced them.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any

import numpy as np

__all__ = ["TensorData", "TensorsData"]

_ALLOWED = frozenset(["avg", "std", "lowest", "highest", "hist", "hist_edges", "bins"])
_FLOATS = frozenset(["avg", "std", "lowest", "highest", "hist_edges"])


class TensorData:
    """Calibration statistics of one tensor.

    Args:
        **kwargs: Any of ``avg, std, lowest, highest, hist, hist_edges, bins``. ``avg``, ``std``,
            ``lowest``, ``highest`` and ``hist_edges`` must be float16 or float32 numpy values.

    Raises:
        ValueError: An unknown key, or a float key whose value is not float16/float32.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._attrs = list(kwargs)
        for key, value in kwargs.items():
            if key not in _ALLOWED:
                raise ValueError(f"Unexpected value {key!r} not in {sorted(_ALLOWED)}.")
            if key in _FLOATS:
                if not hasattr(value, "dtype"):
                    raise ValueError(
                        f"Unexpected type {type(value)} for k={key!r}: give a float32 numpy "
                        "value, e.g. np.float32(x) or np.array([x], dtype=np.float32)")
                if value.dtype not in (np.float16, np.float32):
                    raise ValueError(f"Unexpected dtype {value.dtype} for k={key!r}; "
                                     "use float16 or float32")
            setattr(self, key, value)

    @property
    def range_value(self) -> tuple[Any, Any]:
        """``(lowest, highest)``.

        Raises:
            AttributeError: This tensor has no range (e.g. Distribution data without one).
        """
        if not hasattr(self, "lowest") or not hasattr(self, "highest"):
            raise AttributeError(f"Attributes 'lowest' and/or 'highest' missing in {self!r}.")
        return (self.lowest, self.highest)  # type: ignore[attr-defined]

    @property
    def avg_std(self) -> tuple[Any, Any]:
        """``(avg, std)`` (Distribution calibration).

        Raises:
            AttributeError: This tensor has no mean/std.
        """
        if not hasattr(self, "avg") or not hasattr(self, "std"):
            raise AttributeError(f"Attributes 'avg' and/or 'std' missing in {self!r}.")
        return (self.avg, self.std)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """The stored values by key, plus ``"CLS": "TensorData"``."""
        data = {key: getattr(self, key) for key in self._attrs}
        data["CLS"] = type(self).__name__
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorData:
        """Inverse of :meth:`to_dict`."""
        cls_name = data.get("CLS", cls.__name__)
        if cls_name != cls.__name__:
            raise ValueError(f"Unexpected class {cls_name!r}, expected {cls.__name__!r}.")
        return cls(**{k: v for k, v in data.items() if k != "CLS"})

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._attrs)
        return f"TensorData({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorData) or set(self._attrs) != set(other._attrs):
            return NotImplemented if not isinstance(other, TensorData) else False
        return all(np.array_equal(getattr(self, k), getattr(other, k)) for k in self._attrs)

    __hash__ = None  # type: ignore[assignment]


class TensorsData:
    """Calibration statistics per tensor name, and the method that produced them.

    Args:
        calibration_method: A ``CalibrationMethod`` member.
        data: Tensor name -> :class:`TensorData`, or a tuple: ``(lowest, highest)`` (MinMax)
            or ``(lowest, highest, hist, bins)``.

    Raises:
        TypeError: A key that is not a string, or a value of another kind.
    """

    def __init__(self, calibration_method: Any, data: Mapping[str, Any]) -> None:
        self.calibration_method = calibration_method
        self.data: dict[str, TensorData] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise TypeError(f"Keys must be strings not {type(key)}.")
            self.data[key] = _tensor_data(calibration_method, key, value)

    def __iter__(self) -> Iterator[str]:
        yield from self.data

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: str) -> TensorData:
        return self.data[key]

    def __setitem__(self, key: str, value: TensorData) -> None:
        """Replace the data of an existing tensor (as in onnxruntime, no new keys).

        Raises:
            RuntimeError: ``key`` is not a calibrated tensor.
        """
        if key not in self.data:
            raise RuntimeError(f"Only an existing tensor can be modified, {key!r} is not.")
        self.data[key] = value

    def keys(self) -> KeysView[str]:
        """Tensor names."""
        return self.data.keys()

    def values(self) -> ValuesView[TensorData]:
        """The :class:`TensorData` of every tensor."""
        return self.data.values()

    def items(self) -> ItemsView[str, TensorData]:
        """``(name, TensorData)`` pairs."""
        return self.data.items()

    def to_dict(self) -> dict[str, Any]:
        """``{"data": ..., "calibration_method": ..., "CLS": "TensorsData"}``."""
        return {"data": self.data, "calibration_method": self.calibration_method,
                "CLS": type(self).__name__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorsData:
        """Inverse of :meth:`to_dict`."""
        cls_name = data.get("CLS", cls.__name__)
        if cls_name != cls.__name__:
            raise ValueError(f"Unexpected class {cls_name!r}, expected {cls.__name__!r}.")
        return cls(data["calibration_method"], data["data"])

    def __repr__(self) -> str:
        return f"TensorsData({self.calibration_method!r}, {len(self.data)} tensors)"


def _tensor_data(method: Any, key: str, value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, tuple):
        if len(value) == 2 and getattr(method, "name", None) == "MinMax":
            return TensorData(lowest=value[0], highest=value[1])
        if len(value) == 4:
            return TensorData(lowest=value[0], highest=value[1], hist=value[2], bins=value[3])
        raise TypeError(f"Unexpected tuple for {key!r}, it has {len(value)} elements: {value}.")
    raise TypeError(f"Values must be TensorData not {type(value)} (tensor {key!r}).")
