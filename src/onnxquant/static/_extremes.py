"""Constant inputs whose grid would be meaningless: per channel where that fixes them, else
their node stays float.

A weight with one value of ``1e30`` (or ``3.4e38``) among ordinary ones quantizes per tensor
to a grid on which every ordinary value is 0: the output of its node is lost (relative error
about 1) without a word. Each constant input the planner would quantize is checked first with
:mod:`onnxquant.core.weight_grid` (SQNR over the bulk of the tensor, in float64): below the
threshold per tensor, a weight with a channel axis is tried per channel — kept per channel when
every channel that matters passes —, and otherwise its node stays float. The plan says why.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from onnxquant.core.external_data import read_array
from onnxquant.core.graph import is_constant, is_float
from onnxquant.core.weight_grid import (
    GridQuality,
    meaningless_reason,
    min_grid_sqnr_db,
    weight_grid_quality,
)
from onnxquant.static.config import StaticQuantConfig
from onnxquant.static.rules import rule_for, weight_axis

__all__ = ["Extremes", "check_constants"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Extremes:
    """What :func:`check_constants` found.

    Attributes:
        float_nodes: Nodes that stay float, with the reason.
        per_channel: Weight name -> why it is quantized per channel although per tensor was
            asked for.
    """

    float_nodes: dict[ir.Node, str] = dataclasses.field(default_factory=dict)
    per_channel: dict[str, str] = dataclasses.field(default_factory=dict)


def _group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return attr.as_int() if attr is not None else 1


class _Checker:
    def __init__(self, config: StaticQuantConfig) -> None:
        self.config = config
        self.cache: dict[tuple, GridQuality | None] = {}

    def quality(self, value: ir.Value, as_weight: bool, axis: int | None) -> GridQuality | None:
        cfg = self.config
        qtype = cfg.weight_type if as_weight else cfg.activation_type
        symmetric = cfg.weights_symmetric if as_weight else cfg.activation_symmetric
        reduce_range = cfg.reduce_range and as_weight
        key = (id(value), qtype.name, symmetric, reduce_range, axis)
        if key not in self.cache:
            data = read_array(value.const_value)  # type: ignore[arg-type]
            self.cache[key] = weight_grid_quality(data, qtype, axis=axis, symmetric=symmetric,
                                                  reduce_range=reduce_range)
        return self.cache[key]

    def verdict(self, node: ir.Node, index: int, value: ir.Value,
                as_weight: bool) -> tuple[str | None, str | None]:
        """(reason the node stays float, reason the weight goes per channel)."""
        cfg = self.config
        qtype = cfg.weight_type if as_weight else cfg.activation_type
        min_db = min_grid_sqnr_db(qtype.bits)
        rank = len(value.const_value.shape)  # type: ignore[union-attr]
        axis = weight_axis(node, index, rank) if as_weight else None
        if node.op_type == "ConvTranspose" and _group(node) > 1:
            axis = None
        data = read_array(value.const_value)  # type: ignore[arg-type]
        name = value.name or ""
        if cfg.per_channel and axis is not None:
            quality = self.quality(value, as_weight, axis)
            if quality is None or quality.passes(min_db):
                return None, None
            return meaningless_reason(name, data, f"per-channel {qtype}", quality), None
        quality = self.quality(value, as_weight, None)
        if quality is None or quality.passes(min_db):
            return None, None
        if axis is None:
            return meaningless_reason(name, data, str(qtype), quality), None
        channels = self.quality(value, as_weight, axis)
        if channels is not None and channels.passes(min_db):
            return None, meaningless_reason(
                name, data, f"per-tensor {qtype}", quality,
                f"quantized per channel ({channels.text()})")
        assert channels is not None
        return meaningless_reason(name, data, str(qtype), quality,
                                  f"per channel {channels.text()}; kept float"), None


def check_constants(nodes: list[ir.Node], config: StaticQuantConfig) -> Extremes:
    """Check every float constant input that the rules of ``config.format`` would quantize."""
    found = Extremes()
    checker = _Checker(config)
    for node in nodes:
        rule = rule_for(node, config.format)
        if rule is None:
            continue
        for index, value in enumerate(node.inputs):
            if (value is None or not is_float(value) or not is_constant(value)
                    or not rule.is_quantized_input(index)):
                continue
            kept, per_channel = checker.verdict(node, index, value, index in rule.weights)
            if kept is not None:
                found.float_nodes[node] = kept
                logger.info("node '%s': %s", node.name, kept)
                break
            if per_channel is not None:
                found.per_channel[value.name or ""] = per_channel
                logger.info("node '%s': %s", node.name, per_channel)
    return found
