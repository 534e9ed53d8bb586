"""onnxruntime's ``extra_options["TensorQuantOverrides"]``: :class:`TensorQuantOverridesHelper`
and the translation into ``StaticQuantConfig.tensors`` (:class:`onnxquant.TensorOverride`).

The overrides map a tensor name to a list of dicts: one dict for a per-tensor override, or (for
initializers) per-channel dicts whose first one holds ``axis`` — either one dict for every
channel or one per channel. Keys: ``quant_type``, ``scale`` + ``zero_point``, ``symmetric``,
``reduce_range`` (initializers), ``rmin``, ``rmax``, ``axis`` and ``convert``. Unlike
onnxruntime, :meth:`TensorQuantOverridesHelper.is_valid` checks every entry (onnxruntime stops
after the first tensor it validates) and also rejects unknown keys and values of the wrong type.

``convert`` (a second type for all consumers, or for the ``recv_nodes`` it names) becomes
:class:`onnxquant.TensorConvert`. Not supported yet (raise
:class:`~onnxquant.core.errors.QuantizationError`): per-channel lists where a key is given for
some channels only, and the ``QFLOAT8E4M3FN`` type.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, MutableMapping
from typing import Any

from onnxquant.core.errors import QuantizationError
from onnxquant.ort._errors import InvalidOptionError
from onnxquant.ort._override_values import _bool, _integer, _quant_type, _real
from onnxquant.ort.quant_utils import QuantType
from onnxquant.static.config import TensorConvert, TensorOverride

__all__ = ["TensorQuantOverridesHelper", "to_tensor_overrides"]

_KEYS = frozenset({"quant_type", "scale", "zero_point", "symmetric", "reduce_range", "rmin",
                   "rmax", "axis", "convert"})
_CONVERT_KEYS = frozenset({"quant_type", "scale", "zero_point", "symmetric", "rmin", "rmax",
                           "recv_nodes"})
_NOT_WITH_SCALE = ("symmetric", "reduce_range", "rmin", "rmax")
_PER_CHANNEL_SAME = ("quant_type", "axis", "symmetric", "reduce_range")
_VALUES = ("scale", "zero_point", "rmin", "rmax")


def _value_problems(where: str, entry: Mapping[str, Any], keys: frozenset[str]) -> list[str]:
    """Unknown keys, values of the wrong type and forbidden combinations in one dict."""
    found = [f"{where}: unknown key {k!r} (known: {', '.join(sorted(keys))})"
             for k in entry if k not in keys]
    if "quant_type" in entry and _quant_type(entry["quant_type"]) is None:
        found.append(f"{where}: quant_type must be a QuantType, got {entry['quant_type']!r}")
    if "scale" in entry:
        scale = _real(entry["scale"])
        if scale is None or scale <= 0:
            found.append(f"{where}: scale must be a finite number > 0, got {entry['scale']!r}")
    if "zero_point" in entry and _integer(entry["zero_point"]) is None:
        found.append(f"{where}: zero_point must be an integer, got {entry['zero_point']!r}")
    for key in ("symmetric", "reduce_range"):
        if key in entry and _bool(entry[key]) is None:
            found.append(f"{where}: {key} must be True or False, got {entry[key]!r}")
    for key in ("rmin", "rmax"):
        if key in entry and _real(entry[key]) is None:
            found.append(f"{where}: {key} must be a finite number, got {entry[key]!r}")
    if "axis" in entry and _integer(entry["axis"]) is None:
        found.append(f"{where}: axis must be an integer, got {entry['axis']!r}")
    if ("scale" in entry) != ("zero_point" in entry):
        # onnxruntime's wording, which code written for it may look for
        found.append(f"{where}: Must provide both 'scale' and 'zero_point' (one without the "
                     "other cannot define a grid)")
    elif "scale" in entry:
        clash = [k for k in _NOT_WITH_SCALE if k in entry]
        if clash:
            found.append(f"{where}: option(s) [{', '.join(clash)}] are invalid with 'scale' "
                         "and 'zero_point' (these fix the grid already)")
    low, high = _real(entry.get("rmin")), _real(entry.get("rmax"))
    if low is not None and high is not None and low > high:
        found.append(f"{where}: rmin {low} is above rmax {high}")
    return found


def _convert_problems(where: str, entry: Mapping[str, Any], default_qtype: Any) -> list[str]:
    convert = entry["convert"]
    if not isinstance(convert, Mapping):
        return [f"{where}: 'convert' must be a dict, got {type(convert).__name__}"]
    found = []
    if "reduce_range" in convert:
        found.append(f"{where}: 'convert' cannot use reduce_range (it is for initializers)")
    found += _value_problems(f"{where}['convert']", convert, _CONVERT_KEYS)
    nodes = convert.get("recv_nodes")
    if nodes is not None and (isinstance(nodes, (str, bytes)) or not isinstance(nodes, Collection)
                              or not all(isinstance(n, str) for n in nodes)):
        found.append(f"{where}: 'convert' recv_nodes must be a set of node names, got "
                     f"{nodes!r}")
    if "quant_type" not in convert:
        found.append(f"{where}: 'convert' must give a quant_type")
    else:
        original = _quant_type(entry.get("quant_type", default_qtype))
        if original is not None and _quant_type(convert["quant_type"]) is original:
            found.append(f"{where}: the 'convert' quant_type must differ from the tensor's "
                         f"own type ({original})")
    return found


def _shape(initializers: Any, name: str) -> tuple[int, ...] | None:
    if not isinstance(initializers, Mapping):
        return None
    tensor = initializers[name]
    dims = getattr(tensor, "dims", None)
    if dims is None:
        dims = getattr(tensor, "shape", None)
    return None if dims is None else tuple(int(d) for d in dims)


def _problems(overrides: Any, initializers: Collection[str] | None = None,
              activation_names: Collection[str] | None = None,
              default_activation_qtype: Any = None) -> list[str]:
    """Every problem of ``overrides``; the model checks only when ``initializers`` is given."""
    if not isinstance(overrides, Mapping):
        return [f"TensorQuantOverrides must be a dict of tensor name -> list of dicts, got "
                f"{type(overrides).__name__}"]
    found: list[str] = []
    model = initializers is not None
    inits = initializers if initializers is not None else ()
    acts = activation_names if activation_names is not None else ()
    for name, entries in overrides.items():
        where = f"tensor {name!r}"
        if model and name not in inits and name not in acts:
            found.append(f"{where} is not in the model")
            continue
        if not isinstance(entries, (list, tuple)):
            found.append(f"{where}: the overrides must be a list of dicts, got "
                         f"{type(entries).__name__}")
            continue
        bad = [i for i, e in enumerate(entries) if not isinstance(e, Mapping)]
        if bad:
            found.append(f"{where}: the overrides at index {bad} are not dicts")
            continue
        if not entries or (len(entries) == 1 and not entries[0]):
            continue
        first, is_init = entries[0], name in inits
        per_channel = len(entries) > 1 or "axis" in first
        for index, entry in enumerate(entries):
            label = f"{where} channel {index}" if per_channel else where
            found += _value_problems(label, entry, _KEYS)
            if "convert" in entry:
                if per_channel or (model and is_init):
                    found.append(f"{label}: 'convert' cannot be used on initializers")
                else:
                    found += _convert_problems(label, entry, default_activation_qtype)
            if not per_channel:
                continue
            if index == 0:
                if "axis" not in first:
                    found.append(f"{where}: per-channel overrides need 'axis' in the first dict")
                continue
            for key in _PER_CHANNEL_SAME:
                if key in entry and entry[key] != first.get(key):
                    found.append(f"{label}: {key} {entry[key]!r} differs from the first "
                                 f"channel's {first.get(key)!r} (all channels share it)")
        if model and not is_init:
            if per_channel:
                found.append(f"{where}: per-channel overrides are only for initializers")
            elif "reduce_range" in first:
                found.append(f"{where}: reduce_range is only for initializers, not for the "
                             "activation")
        if model and is_init and per_channel and _integer(first.get("axis")) is not None:
            shape = _shape(inits, name)
            axis = _integer(first["axis"])
            assert axis is not None
            if shape is not None and not -len(shape) <= axis < len(shape):
                found.append(f"{where}: axis {axis} is out of range for rank {len(shape)}")
            elif shape is not None and len(entries) not in (1, shape[axis]):
                found.append(f"{where}: {len(entries)} channel overrides for {shape[axis]} "
                             f"channels along axis {axis}; give 1 or {shape[axis]}")
    return found


class TensorQuantOverridesHelper(MutableMapping):
    """onnxruntime's ``TensorQuantOverridesHelper``: a dict-like view of the raw overrides.

    Args:
        raw_overrides: ``{tensor name: [dict, ...]}`` as in ``extra_options``.

    Attributes:
        overrides: The raw dict (not copied).
    """

    def __init__(self, raw_overrides: dict[str, list[dict[str, Any]]] | None) -> None:
        self.overrides = raw_overrides if raw_overrides is not None else {}
        self.quant_types: set[Any] | None = None

    def has_per_tensor_overrides(self, tensor_name: str) -> bool:
        """Whether the tensor has overrides whose first dict has no ``axis``."""
        entries = self.overrides.get(tensor_name)
        return bool(entries and "axis" not in entries[0])

    def has_per_channel_overrides(self, tensor_name: str) -> bool:
        """Whether the tensor has overrides whose first dict has an ``axis``."""
        entries = self.overrides.get(tensor_name)
        return bool(entries and "axis" in entries[0])

    def overrides_scale_zp(self, tensor_name: str) -> bool:
        """Whether the tensor's first dict gives both ``scale`` and ``zero_point``."""
        entries = self.overrides.get(tensor_name)
        return bool(entries and "scale" in entries[0] and "zero_point" in entries[0])

    def get_per_tensor_overrides(self, tensor_name: str,
                                 default_val: dict[str, Any] | None = None) -> dict[str, Any]:
        """The tensor's single override dict (``default_val`` or ``{}`` without one).

        Raises:
            ValueError: The tensor has per-channel (several) dicts.
        """
        entries = self.overrides.get(tensor_name, [default_val or {}])
        if len(entries) > 1:
            raise InvalidOptionError(
                f"Expected tensor '{tensor_name}' to use per-tensor quantization overrides, but "
                f"found {len(entries)} per-channel overrides.")
        return entries[0] if entries else {}

    def get_per_channel_overrides(self, tensor_name: str, default_val: dict[str, Any] | None
                                  = None) -> list[dict[str, Any]]:
        """The tensor's list of per-channel dicts (``[default_val or {}]`` without one)."""
        return self.overrides.get(tensor_name, [default_val or {}])

    def get_quant_types(self) -> set[Any]:
        """Every ``quant_type`` the overrides name, ``convert`` types included."""
        if self.quant_types is None:
            self.quant_types = set()
            for entries in self.overrides.values():
                for entry in entries:
                    if "quant_type" in entry:
                        self.quant_types.add(entry["quant_type"])
                    convert = entry.get("convert")
                    if isinstance(convert, Mapping) and "quant_type" in convert:
                        self.quant_types.add(convert["quant_type"])
        return self.quant_types

    def is_valid(self, initializers: Collection[str], activation_names: Collection[str],
                 default_activation_qtype: Any) -> tuple[bool, str | None]:
        """Check every override against the model.

        Args:
            initializers: Initializer names, or a mapping name -> ``TensorProto``/array (then
                per-channel axes and channel counts are checked too).
            activation_names: Names of the other tensors of the model.
            default_activation_qtype: The activation type (``convert`` must differ from it).

        Returns:
            ``(True, None)``, or ``(False, message)`` with every problem found, one per line.
        """
        self.quant_types = None
        found = _problems(self.overrides, initializers, activation_names,
                          default_activation_qtype)
        return (False, "\n".join(found)) if found else (True, None)

    def pprint_str(self, indent: int | str | None = None) -> str:
        """The overrides as JSON (enum members and arrays as strings)."""
        return json.dumps(self.overrides, default=str, indent=indent)

    def empty(self) -> bool:
        """Whether there are no overrides."""
        return not self.overrides

    def get_dict(self) -> dict[str, list[dict[str, Any]]]:
        """The raw overrides dict."""
        return self.overrides

    def __getitem__(self, key: str) -> list[dict[str, Any]]:
        return self.overrides[key]

    def __setitem__(self, key: str, value: list[dict[str, Any]]) -> None:
        self.quant_types = None
        self.overrides[key] = value

    def __delitem__(self, key: str) -> None:
        self.quant_types = None
        del self.overrides[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.overrides)

    def __len__(self) -> int:
        return len(self.overrides)

    def __contains__(self, key: object) -> bool:
        return key in self.overrides

    def __str__(self) -> str:
        return str(self.overrides)

    def __repr__(self) -> str:
        return f"TensorQuantOverridesHelper({self.overrides!r})"


def _native_value(name: str, key: str, entries: list[Mapping[str, Any]]) -> Any:
    """One value, one per channel, or None; a key given for some channels only raises."""
    given = [key in e for e in entries]
    if not any(given):
        return None
    if not all(given):
        raise QuantizationError(
            f"TensorQuantOverrides for '{name}': '{key}' is given for some channels only, which "
            f"onnxquant does not support yet; give '{key}' for every channel or for none")
    convert = _integer if key == "zero_point" else _real
    values = [convert(e[key]) for e in entries]
    return values[0] if len(values) == 1 else tuple(values)


def _native(name: str, entries: list[Mapping[str, Any]]) -> TensorOverride:
    first = entries[0]
    qtype = _native_type(name, first)
    per_channel = "axis" in first
    symmetric, reduce_range = _bool(first.get("symmetric")), _bool(first.get("reduce_range"))
    return TensorOverride(
        quant_type=qtype.qtype if qtype is not None else None,
        rmin=_native_value(name, "rmin", entries),
        rmax=_native_value(name, "rmax", entries),
        symmetric=symmetric,
        scale=_native_value(name, "scale", entries),
        zero_point=_native_value(name, "zero_point", entries),
        reduce_range=reduce_range,
        axis=_integer(first["axis"]) if per_channel else None,
        # onnxruntime quantizes an initializer with overrides but no axis per tensor
        per_channel=None if per_channel else False,
        convert=_native_convert(name, first["convert"]) if "convert" in first else None,
    )


def _native_type(name: str, entry: Mapping[str, Any]) -> QuantType | None:
    qtype = _quant_type(entry["quant_type"]) if "quant_type" in entry else None
    if qtype is QuantType.QFLOAT8E4M3FN:
        raise QuantizationError(
            f"TensorQuantOverrides for '{name}': QuantType.QFLOAT8E4M3FN is not supported yet "
            "by onnxquant; use an integer type")
    return qtype


def _native_convert(name: str, convert: Mapping[str, Any]) -> TensorConvert:
    """``TensorConvert`` from a (validated) ``convert`` dict."""
    qtype = _native_type(name, convert)
    assert qtype is not None
    nodes = convert.get("recv_nodes")
    return TensorConvert(
        quant_type=qtype.qtype,
        rmin=_real(convert["rmin"]) if "rmin" in convert else None,
        rmax=_real(convert["rmax"]) if "rmax" in convert else None,
        symmetric=_bool(convert.get("symmetric")),
        scale=_real(convert["scale"]) if "scale" in convert else None,
        zero_point=_integer(convert["zero_point"]) if "zero_point" in convert else None,
        recv_nodes=frozenset(nodes) if nodes is not None else None,
    )


def to_tensor_overrides(overrides: Any) -> dict[str, TensorOverride]:
    """``StaticQuantConfig.tensors`` from onnxruntime's ``TensorQuantOverrides`` value.

    Raises:
        InvalidOptionError: (a ``ValueError``) listing every invalid entry.
        QuantizationError: An entry asks for something not supported yet (a key given for
            some channels only, float8).
    """
    if overrides is None:
        return {}
    found = _problems(overrides)
    if found:
        raise InvalidOptionError(
            "extra_options['TensorQuantOverrides'] is invalid:\n  " + "\n  ".join(found))
    return {name: _native(name, list(entries))
            for name, entries in overrides.items() if entries}
