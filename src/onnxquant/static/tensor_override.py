"""Per-tensor overrides of static quantization: :class:`TensorOverride` and the second grid
that some readers of a tensor read it in, :class:`TensorConvert` (mixed precision).

Both are re-exported by :mod:`onnxquant.static.config` and :mod:`onnxquant`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Collection, Sequence

from onnxquant.core.qtypes import QuantType

__all__ = ["TensorConvert", "TensorOverride"]


@dataclasses.dataclass(frozen=True)
class TensorConvert:
    """A second element type in which readers of an activation read it (``TensorOverride.convert``).

    The producer quantizes the tensor to its own grid (the override's ``quant_type``, or the
    config's activation type); the readers named in ``recv_nodes`` (every reader when None, and
    the graph output when the tensor is one) read it requantized to this second grid::

        producer -> Q1 -> DQ1 -> Q2 -> DQ2 -> readers of the second grid
                           +-> readers of the first grid (when ``recv_nodes`` leaves some out)

    e.g. an 8-bit tensor read by a 16-bit region of the model. The second grid is computed from
    the tensor's calibrated range unless ``rmin``/``rmax`` or ``scale``/``zero_point`` are given.
    Activations only, QDQ format only (onnxruntime's ``TensorQuantOverrides`` ``convert``).

    Attributes:
        quant_type: The second element type; it must differ from the tensor's own type.
        rmin: Lower end of the second grid's range instead of the calibrated one.
        rmax: Upper end of the second grid's range instead of the calibrated one.
        symmetric: Symmetric second grid or not (None: ``StaticQuantConfig.activation_symmetric``).
        scale: The second grid's scale (> 0), given together with ``zero_point``.
        zero_point: The second grid's zero point, an integer of ``quant_type``'s grid.
        recv_nodes: Names of the nodes that read the second grid (a subset of the tensor's
            readers; any collection of names, stored as a frozenset); None: every reader.
    """

    quant_type: QuantType
    rmin: float | None = None
    rmax: float | None = None
    symmetric: bool | None = None
    scale: float | None = None
    zero_point: int | None = None
    recv_nodes: frozenset[str] | None = None

    def __post_init__(self) -> None:
        nodes = self.recv_nodes
        if isinstance(nodes, Collection) and not isinstance(nodes, (str, bytes, frozenset)):
            object.__setattr__(self, "recv_nodes", frozenset(nodes))

    def as_override(self) -> TensorOverride:
        """The second grid's settings as a per-tensor :class:`TensorOverride`."""
        return TensorOverride(quant_type=self.quant_type, rmin=self.rmin, rmax=self.rmax,
                              symmetric=self.symmetric, scale=self.scale,
                              zero_point=self.zero_point)

    def problems(self) -> list[str]:
        """What is wrong with this convert on its own (empty when it is valid)."""
        if not isinstance(self.quant_type, QuantType):
            return [f"convert needs a quant_type, an onnxquant QuantType (UINT16, ...), got "
                    f"{self.quant_type!r}"]
        found: list[str] = []
        many = [key for key in ("rmin", "rmax", "scale", "zero_point")
                if isinstance(getattr(self, key), Sequence)]
        if many:
            found.append(f"convert {', '.join(many)} must be one value (a converted tensor is "
                         "an activation, quantized per tensor)")
        else:
            found.extend(self.as_override().problems())
        nodes = self.recv_nodes
        if nodes is not None:
            if not isinstance(nodes, frozenset) or not all(isinstance(n, str) for n in nodes):
                found.append(f"convert recv_nodes must be a set of node names, got {nodes!r}")
            elif not nodes:
                found.append("convert recv_nodes is empty; give None for every reader")
        return [f"convert: {problem}" if not problem.startswith("convert") else problem
                for problem in found]


@dataclasses.dataclass(frozen=True)
class TensorOverride:
    """What one tensor gets instead of the config's defaults (``StaticQuantConfig.tensors``).

    Values left None follow the config. ``scale``, ``zero_point``, ``rmin`` and ``rmax`` may be
    sequences with one value per channel when ``axis`` is given (constant tensors only); a
    single value with ``axis`` applies to every channel.

    Attributes:
        quant_type: Its element type (e.g. ``UINT16`` for a sensitive activation next to 8-bit
            ones; QDQ format only when it differs from the config's types). A 16-bit activation
            takes its calibrated min/max range: histogram methods choose clip ranges for the
            config's 8-bit grid, which a 65536-level grid does not need.
        rmin: Lower end of its range instead of the calibrated (or the weight's) one.
        rmax: Upper end of its range instead of the calibrated (or the weight's) one.
        symmetric: Symmetric parameters (zero point at the midpoint) or not. A weight whose
            ``quant_type`` differs from the config's weight type defaults to symmetric when
            that type is signed (unless ``StaticQuantConfig.weight_symmetric`` is set).
        scale: Its quantization scale (> 0), given together with ``zero_point``: the range
            (calibrated or the weight's) is then not used, and a constant without ``axis`` is
            quantized per tensor.
        zero_point: Its zero point, an integer of ``quant_type``'s grid; with ``scale``.
        reduce_range: Constant tensors: one bit less (7-bit int8/uint8) instead of
            ``StaticQuantConfig.reduce_range``.
        axis: Constant tensors: one scale per slice along this axis (per channel), whatever
            ``StaticQuantConfig.per_channel`` says.
        per_channel: Constant tensors: True quantizes a weight per channel along its op's
            output-channel axis, False per tensor (no SQNR fallback to per channel); None
            follows the config. ``axis`` implies True.
        convert: Activations in the QDQ format: a second type in which all readers, or the
            ``recv_nodes`` it names, read the tensor (:class:`TensorConvert`: the tensor is
            quantized to ``quant_type`` by its producer and requantized for those readers,
            Q1→DQ1→Q2→DQ2), e.g. ``TensorOverride(quant_type=UINT8,
            convert=TensorConvert(UINT16, recv_nodes={"head"}))`` where an 8-bit tensor
            enters a 16-bit region.
    """

    quant_type: QuantType | None = None
    rmin: float | Sequence[float] | None = None
    rmax: float | Sequence[float] | None = None
    symmetric: bool | None = None
    scale: float | Sequence[float] | None = None
    zero_point: int | Sequence[int] | None = None
    reduce_range: bool | None = None
    axis: int | None = None
    per_channel: bool | None = None
    convert: TensorConvert | None = None

    @property
    def fixes_params(self) -> bool:
        """Whether the override alone determines the parameters (no calibrated range needed)."""
        return self.scale is not None or (self.rmin is not None and self.rmax is not None)

    @property
    def decides_granularity(self) -> bool:
        """Whether the override, not the config, chooses per tensor or per channel."""
        return self.axis is not None or self.per_channel is not None or self.scale is not None

    def problems(self) -> list[str]:
        """What is wrong with this override on its own (empty when it is valid)."""
        found: list[str] = []
        if self.quant_type is not None and not isinstance(self.quant_type, QuantType):
            found.append(f"quant_type must be an onnxquant QuantType (INT8, UINT16, ...), "
                         f"got {self.quant_type!r}")
        for key in ("symmetric", "reduce_range", "per_channel"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                found.append(f"{key} must be True, False or None, got {value!r}")
        if self.axis is not None and (isinstance(self.axis, bool)
                                      or not isinstance(self.axis, int)):
            found.append(f"axis must be an int, got {self.axis!r}")
        if self.axis is not None and self.per_channel is False:
            found.append("axis asks for per-channel parameters but per_channel is False")
        if (self.scale is None) != (self.zero_point is None):
            found.append("scale and zero_point must be given together")
        if self.scale is not None:
            clash = [k for k in ("rmin", "rmax", "symmetric", "reduce_range")
                     if getattr(self, k) is not None]
            if clash:
                found.append(f"scale/zero_point fix the parameters, so {', '.join(clash)} "
                             "cannot be given with them; remove one or the other")
        found.extend(self._convert_problems())
        for key, kind in (("scale", "number"), ("zero_point", "int"), ("rmin", "number"),
                          ("rmax", "number")):
            found.extend(self._value_problems(key, kind))
        if not found:
            low, high = _values(self.rmin), _values(self.rmax)
            if low is not None and high is not None:
                low, high = low * (len(high) if len(low) == 1 else 1), high * (
                    len(low) if len(high) == 1 else 1)
            if low is not None and high is not None and len(low) == len(high) and any(
                    lo > hi for lo, hi in zip(low, high, strict=True)):
                found.append(f"rmin {self.rmin} is above rmax {self.rmax}")
        return found

    def _convert_problems(self) -> list[str]:
        if self.convert is None:
            return []
        if not isinstance(self.convert, TensorConvert):
            return [f"convert must be a TensorConvert, got {type(self.convert).__name__}"]
        found = self.convert.problems()
        constant_keys = [k for k in ("axis", "per_channel", "reduce_range")
                         if getattr(self, k) is not None and getattr(self, k) is not False]
        if constant_keys:
            found.append(f"convert is for activations, and {', '.join(constant_keys)} for "
                         "constant tensors; remove one or the other")
        if self.quant_type is not None and self.convert.quant_type == self.quant_type:
            found.append(f"the convert quant_type must differ from the tensor's own "
                         f"quant_type ({self.quant_type})")
        return found

    def _value_problems(self, key: str, kind: str) -> list[str]:
        value = getattr(self, key)
        if value is None:
            return []
        many = isinstance(value, Sequence) and not isinstance(value, str)
        if many and self.axis is None:
            return [f"{key} has one value per channel, which needs an axis"]
        items = list(value) if many else [value]
        if many and not items:
            return [f"{key} is empty"]
        for item in items:
            if kind == "int":
                if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                    return [f"zero_point must be an integer, got {item!r}"]
            elif (isinstance(item, bool) or not isinstance(item, numbers.Real)
                  or not math.isfinite(float(item))):
                return [f"{key} must be a finite number, got {item!r}"]
            elif key == "scale" and not float(item) > 0:
                return [f"scale must be > 0, got {item!r}"]
        return []


def _values(value: object) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, Sequence):
        return [float(v) for v in value]
    return [float(value)]  # type: ignore[arg-type]
