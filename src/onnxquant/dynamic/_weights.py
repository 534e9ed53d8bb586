"""Constant weights quantized offline, stored once per (weight, layout, parameters).

Two nodes reading the same float weight with the same settings read the same quantized
initializer; a weight used inside an If/Loop/Scan body but defined in an enclosing graph is
stored next to its float original, where every body can see it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.core.errors import NumericsError
from onnxquant.core.external_data import read_array
from onnxquant.core.qtypes import QuantType
from onnxquant.dynamic._builder import Names, new_initializer

__all__ = ["QuantizedWeight", "WeightStore", "per_tensor_sqnr_db"]


def per_tensor_sqnr_db(array: np.ndarray, qtype: QuantType, *, symmetric: bool,
                       reduce_range: bool) -> float:
    """SQNR (dB) of ``array`` quantized per tensor; inf for an exact (e.g. all-zero) weight."""
    w = np.asarray(array, dtype=np.float32)
    try:
        restored = numerics.quantize_weight(w, qtype, symmetric=symmetric,
                                            reduce_range=reduce_range).dequantize()
    except NumericsError:
        return float("inf")  # NaN/Inf weights: the real quantization reports it
    noise = float(np.sum((w.astype(np.float64) - restored) ** 2))
    signal = float(np.sum(w.astype(np.float64) ** 2))
    return float("inf") if noise == 0.0 else 10.0 * float(np.log10(max(signal, 1e-300) / noise))


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight stored quantized.

    Attributes:
        data: Initializer with the quantized values.
        scale: float32 scale initializer, shaped as requested (scalar, [C] or [C,1,...]).
        zero_point: Zero point initializer (scalar, or 1-D per channel).
        tensor: The numbers, for callers that need them.
    """

    data: ir.Value
    scale: ir.Value
    zero_point: ir.Value
    tensor: numerics.QuantizedTensor


class WeightStore:
    """Quantizes constant weights and caches the resulting initializers."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self._cache: dict[tuple, QuantizedWeight] = {}

    def get(
        self,
        source: ir.Value,
        graph: ir.Graph,
        *,
        qtype: QuantType,
        axis: int | None,
        symmetric: bool,
        reduce_range: bool,
        layout: str = "",
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        scale_shape: tuple[int, ...] | None = None,
        scalar_zero_point: bool = False,
        scale_factor: float = 1.0,
    ) -> QuantizedWeight:
        """The quantized form of the constant ``source``.

        Args:
            source: The float weight (an initializer).
            graph: The graph of the reading node (used when ``source`` has no graph).
            qtype: Stored element type.
            axis: Channel axis of the *transformed* weight, None for per-tensor.
            symmetric: Symmetric grid.
            reduce_range: 7-bit grid.
            layout: Cache key of ``transform`` (e.g. ``"T"`` for a transpose).
            transform: Applied to the float weight before quantizing (e.g. a transpose).
            scale_shape: Shape of the stored scale (default: 0-d or 1-D).
            scalar_zero_point: Store one zero point even per channel (all channels share it;
                true for symmetric grids).
            scale_factor: Multiplies the stored scale (Gemm's alpha), not the quantized values.

        Raises:
            NumericsError: The weight has NaN/Inf values; the message names it.
        """
        key = (id(source), qtype.name, axis, symmetric, reduce_range, layout, scale_shape,
               scalar_zero_point, scale_factor)
        if key in self._cache:
            return self._cache[key]
        assert source.const_value is not None
        array = read_array(source.const_value)
        if transform is not None:
            array = transform(array)
        try:
            tensor = numerics.quantize_weight(
                np.asarray(array, dtype=np.float32), qtype, axis=axis, symmetric=symmetric,
                reduce_range=reduce_range, name=source.name or "weight")
        except NumericsError as err:
            raise NumericsError(f"{err}; exclude the nodes that read '{source.name}' "
                                "(nodes_to_exclude) or fix the weight") from err
        if not np.all(np.isfinite(tensor.scale)):  # never store a scale of Inf/NaN
            raise NumericsError(f"weight '{source.name}' has a range whose {qtype} scale is not "
                                "finite; exclude the nodes that read it (nodes_to_exclude)")
        owner = source.graph if source.graph is not None else graph
        stem = source.name or "weight"
        scale = (tensor.scale * np.float32(scale_factor)).astype(np.float32)
        if scale_shape is not None:
            scale = scale.reshape(scale_shape)
        zero_point = tensor.zero_point
        if scalar_zero_point:
            zero_point = np.asarray(zero_point.reshape(-1)[0], dtype=zero_point.dtype)
        stored = QuantizedWeight(
            data=new_initializer(owner, self.names(f"{stem}_quantized"), tensor.data),
            scale=new_initializer(owner, self.names(f"{stem}_scale"), scale),
            zero_point=new_initializer(owner, self.names(f"{stem}_zero_point"), zero_point),
            tensor=tensor,
        )
        self._cache[key] = stored
        return stored
