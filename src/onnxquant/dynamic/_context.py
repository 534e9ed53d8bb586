"""State shared by the dynamic rewrites of one run: config, names, weights, runtime notes."""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxquant.core.external_data import read_array
from onnxquant.core.graph import is_constant
from onnxquant.core.graph import is_float32 as is_float  # float16: not yet
from onnxquant.core.qtypes import QuantType
from onnxquant.core.weight_grid import (
    GridQuality,
    meaningless_reason,
    min_grid_sqnr_db,
    weight_grid_quality,
)
from onnxquant.dynamic._builder import Builder, Names
from onnxquant.dynamic._weights import WeightStore, per_tensor_sqnr_db
from onnxquant.dynamic.config import DynamicQuantConfig
from onnxquant.dynamic.runtime import RuntimeSupport

__all__ = ["Context", "Granularity", "Outcome", "operand_problem"]

Outcome = tuple[bool, str]
"""What a rewrite did: (True, what was emitted) or (False, why the node stays float)."""


def operand_problem(node: ir.Node, config: DynamicQuantConfig) -> str | None:
    """Why MatMul/Gemm/Conv ``node`` cannot be quantized dynamically from its first two
    inputs (None when it can): they must be float32, not both constant, and the weight must be
    a constant for Conv and, with ``matmul_const_b_only``, for MatMul/Gemm."""
    a, w = node.inputs[0], node.inputs[1]
    if not is_float(a) or not is_float(w):
        return "inputs are not float32"
    assert a is not None and w is not None
    if is_constant(a) and is_constant(w):
        return f"both inputs are constants (constant folding removes this {node.op_type})"
    if not is_constant(w):
        if node.op_type == "Conv":
            return "the weight is not a constant"
        if config.matmul_const_b_only:
            return "B is not a constant (matmul_const_b_only)"
    return None


@dataclasses.dataclass(frozen=True)
class Granularity:
    """How a constant weight is quantized.

    Attributes:
        per_channel: One scale per channel.
        why: Why per channel, when the config did not ask for it.
        required: The per-tensor grid is meaningless: per channel or float, nothing else.
        float_reason: Non-empty when the weight must stay float (no grid means anything).
    """

    per_channel: bool
    why: str = ""
    required: bool = False
    float_reason: str = ""


@dataclasses.dataclass
class Context:
    """Everything a rewrite handler needs besides the node itself.

    Attributes:
        model: The model being rewritten (a private copy).
        config: The run's settings.
        names: Model-wide unique name allocator.
        support: What the runtime executes (see :mod:`onnxquant.dynamic.runtime`).
        weights: Cache of quantized constant weights.
        opset: The model's default-domain opset.
        notes: Runtime note -> names of the nodes it applies to (for the summary).
        memo: Values a rewrite created that later rewrites may reuse (keyed by the rewrite).
        cost_estimate: The cost model's estimate for this run (see :mod:`._cost`); None when
            costs were not measured.
    """

    model: ir.Model
    config: DynamicQuantConfig
    names: Names
    support: RuntimeSupport
    weights: WeightStore
    opset: int
    notes: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    memo: dict[tuple, ir.Value] = dataclasses.field(default_factory=dict)
    cost_estimate: dict[str, float | int | str | bool] | None = None
    _sqnr: dict[tuple, float] = dataclasses.field(default_factory=dict)
    _grids: dict[tuple, GridQuality | None] = dataclasses.field(default_factory=dict)

    def builder(self, node: ir.Node) -> Builder:
        """A builder inserting new nodes right before ``node`` in its graph."""
        assert node.graph is not None
        return Builder(node.graph, node, self.names)

    def note(self, text: str, node: ir.Node) -> None:
        """Record a runtime note (which form was chosen and why) for ``node``."""
        if text:
            self.notes[text].append(node.name or "")

    def per_channel(
        self, weight: ir.Value, axis: int | None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None, *,
        qtype: QuantType | None = None, sqnr_fallback: bool = True,
        reduce_range: bool | None = None,
    ) -> Granularity:
        """How ``weight`` is quantized: per channel along ``axis`` (of the transformed weight)
        or per tensor, and why when only the SQNR fallbacks ask for it; or kept float when its
        range makes every grid meaningless (see :mod:`onnxquant.core.weight_grid`).

        Args:
            weight: The constant weight.
            axis: Its channel axis (after ``transform``); None when there is none.
            transform: Applied to the weight before quantizing (a transpose).
            qtype: Stored type (default: the config's weight type).
            sqnr_fallback: Apply ``per_channel_fallback_db`` (off for Gather tables).
            reduce_range: 7-bit grid (default: the config's).
        """
        wanted, why = self._wanted(weight, axis, transform, sqnr_fallback)
        reduce = self.config.reduce_range if reduce_range is None else reduce_range
        return self._checked(weight, axis, transform, qtype or self.config.weight_type,
                             reduce, wanted, why)

    def _checked(self, weight: ir.Value, axis: int | None,
                 transform: Callable[[np.ndarray], np.ndarray] | None, qtype: QuantType,
                 reduce_range: bool, wanted: bool, why: str) -> Granularity:
        min_db = min_grid_sqnr_db(qtype.bits)
        measure = functools.partial(self._grid, weight, transform=transform, qtype=qtype,
                                    reduce_range=reduce_range)
        quality = measure(axis if wanted else None)
        if quality is None or quality.passes(min_db):
            return Granularity(wanted, why)
        array = read_array(weight.const_value)  # type: ignore[arg-type]
        name = weight.name or ""
        if wanted or axis is None:
            grid = f"per-channel {qtype}" if wanted else str(qtype)
            return Granularity(False, float_reason=meaningless_reason(name, array, grid, quality))
        channels = measure(axis)
        assert channels is not None
        if channels.passes(min_db):
            return Granularity(True, meaningless_reason(
                name, array, f"per-tensor {qtype}", quality,
                f"per channel instead ({channels.text()})"), required=True)
        return Granularity(False, float_reason=meaningless_reason(
            name, array, str(qtype), quality, f"per channel {channels.text()}; kept float"))

    def _grid(self, weight: ir.Value, axis: int | None, *,
              transform: Callable[[np.ndarray], np.ndarray] | None, qtype: QuantType,
              reduce_range: bool) -> GridQuality | None:
        key = (id(weight), axis, transform is not None, qtype.name, reduce_range)
        if key not in self._grids:
            array = read_array(weight.const_value)  # type: ignore[arg-type]
            self._grids[key] = weight_grid_quality(
                transform(array) if transform is not None else array, qtype, axis=axis,
                symmetric=self.symmetric, reduce_range=reduce_range)
        return self._grids[key]

    def _wanted(self, weight: ir.Value, axis: int | None,
                transform: Callable[[np.ndarray], np.ndarray] | None,
                sqnr_fallback: bool) -> tuple[bool, str]:
        if axis is None:
            return False, ""
        if self.config.per_channel:
            return True, ""
        threshold = self.config.per_channel_fallback_db
        if threshold is None or not sqnr_fallback:
            return False, ""
        key = ("per-tensor-sqnr", id(weight), self.config.weight_type.name)
        if key not in self._sqnr:
            array = read_array(weight.const_value)  # type: ignore[arg-type]
            self._sqnr[key] = per_tensor_sqnr_db(
                transform(array) if transform is not None else array, self.config.weight_type,
                symmetric=self.symmetric, reduce_range=self.config.reduce_range)
        sqnr = self._sqnr[key]
        if sqnr < threshold:
            return True, f"per-tensor SQNR {sqnr:.1f} dB < {threshold:g} dB"
        return False, ""

    @property
    def symmetric(self) -> bool:
        """Resolved weight symmetry."""
        return self.config.weights_symmetric
