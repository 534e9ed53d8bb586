"""onnxruntime's ``tensor_quant_overrides.QuantTypeInfo`` and the override look-ups the QNN
helpers need, as functions over a
:class:`~onnxquant.ort.tensor_quant_overrides.TensorQuantOverridesHelper`.

onnxruntime has them as helper methods (``update_tensor_overrides``,
``get_node_output_qtype_info``, ``get_node_input_qtype_info``); here they take the helper as
their first argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

from onnxquant.ort.tensor_quant_overrides import TensorQuantOverridesHelper

__all__ = ["QuantTypeInfo", "update_tensor_overrides", "get_node_output_qtype_info",
           "get_node_input_qtype_info"]


@dataclasses.dataclass
class QuantTypeInfo:
    """The quantization type of one tensor as the overrides give it.

    Equality treats ``symmetric=None`` as "either" (the quantizer's default applies).

    Attributes:
        quant_type: The ``QuantType`` (None: not given).
        symmetric: Symmetric range, or None for the default.
        reduce_range: 7-bit range (initializers), or None.
        axis: Per-channel axis (initializers), or None.
    """

    quant_type: Any
    symmetric: bool | None = None
    reduce_range: bool | None = None
    axis: int | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantTypeInfo):
            return NotImplemented
        same_symmetric = (self.symmetric is None or other.symmetric is None
                          or self.symmetric == other.symmetric)
        return (self.quant_type == other.quant_type and same_symmetric
                and self.reduce_range == other.reduce_range and self.axis == other.axis)

    __hash__ = None  # type: ignore[assignment]

    @staticmethod
    def load_from_dict(raw_dict: Mapping[str, Any], default_qtype: Any = None,
                       default_symmetric: bool | None = None,
                       default_reduce_range: bool | None = None) -> QuantTypeInfo:
        """The type an override dict gives, with defaults for what it leaves out."""
        return QuantTypeInfo(raw_dict.get("quant_type", default_qtype),
                             raw_dict.get("symmetric", default_symmetric),
                             raw_dict.get("reduce_range", default_reduce_range),
                             raw_dict.get("axis"))

    def save_to_dict(self, raw_dict: MutableMapping[str, Any]) -> None:
        """Write ``quant_type`` and the fields that are not None into ``raw_dict``."""
        raw_dict["quant_type"] = self.quant_type
        for key in ("symmetric", "reduce_range", "axis"):
            if getattr(self, key) is not None:
                raw_dict[key] = getattr(self, key)


def update_tensor_overrides(overrides: TensorQuantOverridesHelper, tensor_name: str,
                            new_vals: Mapping[str, Any], channels: Collection[int] | None = None,
                            overwrite: bool = True) -> bool:
    """Merge ``new_vals`` into the tensor's override dicts (all, or the ``channels`` given).

    Args:
        overrides: The overrides, edited in place.
        tensor_name: The tensor; it gets one empty dict first when it has none.
        new_vals: Keys and values to set.
        channels: Indices of the per-channel dicts to update (None: every dict).
        overwrite: False: change nothing when any key of ``new_vals`` is already set.

    Returns:
        Whether the overrides were updated.
    """
    if not new_vals:
        return False
    entries = overrides.get(tensor_name) or []
    chosen = [e for i, e in enumerate(entries) if channels is None or i in channels]
    if not overwrite and any(set(new_vals) & set(entry) for entry in chosen):
        return False
    if not entries:
        overrides[tensor_name] = entries = [{}]
        chosen = entries if channels is None or 0 in channels else []
    for entry in chosen:
        entry.update(new_vals)
    overrides.quant_types = None
    return True


def get_node_output_qtype_info(overrides: TensorQuantOverridesHelper, output_name: str,
                               default_qtype: Any, default_symmetric: bool | None = None
                               ) -> QuantTypeInfo:
    """The type the producer of ``output_name`` writes it with."""
    entries = overrides.get(output_name)
    if not entries:
        return QuantTypeInfo(default_qtype, default_symmetric)
    return QuantTypeInfo(entries[0].get("quant_type", default_qtype),
                         entries[0].get("symmetric", default_symmetric))


def get_node_input_qtype_info(overrides: TensorQuantOverridesHelper, input_name: str,
                              node_name: str, default_qtype: Any,
                              default_symmetric: bool | None = None,
                              default_reduce_range: bool | None = None) -> QuantTypeInfo:
    """The type node ``node_name`` reads ``input_name`` with (the ``convert`` type when the
    tensor is converted for that node)."""
    entries = overrides.get(input_name)
    if not entries:
        return QuantTypeInfo(default_qtype, default_symmetric, default_reduce_range)
    first = entries[0]
    convert = first.get("convert")
    if convert is not None and ("recv_nodes" not in convert
                                or node_name in convert["recv_nodes"]):
        return QuantTypeInfo(convert["quant_type"], convert.get("symmetric", default_symmetric))
    return QuantTypeInfo(first.get("quant_type", default_qtype),
                         first.get("symmetric", default_symmetric),
                         first.get("reduce_range", default_reduce_range), first.get("axis"))
