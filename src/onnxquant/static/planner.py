"""Turn op rules plus calibrated ranges into a QuantPlan (which nodes: :mod:`.select` and
:mod:`.selection`; int32 biases: :mod:`._biases`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxquant.core import numerics
from onnxquant.core.blocks import block_params
from onnxquant.core.errors import QuantizationError
from onnxquant.core.external_data import read_array
from onnxquant.core.float_scales import half_params, std_range, tensor_std
from onnxquant.core.graph import from_dequantize, is_constant, is_float, is_half
from onnxquant.core.objective import Objective
from onnxquant.core.plan import NodeDecision, QuantPlan, TensorQuant
from onnxquant.core.qtypes import QuantType
from onnxquant.preprocess import BATCHNORM_FOLDED
from onnxquant.static import _overrides
from onnxquant.static._biases import plan_biases
from onnxquant.static._clip_fold import clip_bounds, within_half_step
from onnxquant.static._cost_choice import speed_choice
from onnxquant.static._extremes import check_constants
from onnxquant.static._singular import grid_keeping_nodes, singular_reach
from onnxquant.static.config import QuantFormat, StaticQuantConfig
from onnxquant.static.rules import (
    SOFTMAX_MAX_INPUT_WIDTH,
    OpRule,
    OutputMode,
    float_input_ops,
    rule_for,
    weight_axis,
)
from onnxquant.static.select import forced_nodes, select_nodes, tensors_to_calibrate
from onnxquant.static.selection import choose_nodes

__all__ = ["select_nodes", "tensors_to_calibrate", "build_plan", "forced_nodes"]

logger = logging.getLogger(__name__)

class _Planner:
    def __init__(self, config: StaticQuantConfig, ranges: Mapping[str, tuple[float, float]]):
        self.config = config
        self.ranges = ranges
        self.plan = QuantPlan(settings=_settings(config))
        self.aliases: dict[ir.Value | None, ir.Value] = {}  # removed Relu output -> its input
        self.qoperator = config.format is QuantFormat.QOPERATOR
        self.float_input_ops = float_input_ops(config.format)
        self.float_softmax: set[str] = set()  # QOperator Softmax nodes whose input stays float
        self.per_channel_weights: dict[str, str] = {}  # weight -> why its grid is per channel
        self.half: set[str] = set()  # float16 activations: float16 scales

    def find_float_softmax(self, nodes: list[ir.Node]) -> None:
        """QOperator: Softmax nodes whose input range is too wide for an 8-bit grid (attention
        masks of -1e4) read a float input, as in QDQ."""
        if not self.qoperator:
            return
        for node in nodes:
            if node.op_type != "Softmax" or not node.inputs or node.inputs[0] is None:
                continue
            rng = self.ranges.get(node.inputs[0].name or "")
            if rng is None or rng[1] - rng[0] > SOFTMAX_MAX_INPUT_WIDTH:
                self.float_softmax.add(node.name or "")

    def feeds_float_ops(self, value: ir.Value) -> bool:
        """Whether every reader of ``value`` reads it as float (its producer's output then
        needs no parameters)."""
        uses = value.uses()
        return bool(uses) and all(
            n.op_type in self.float_input_ops or (n.name or "") in self.float_softmax
            for n, _ in uses)

    # -- Relu/Clip removal -----------------------------------------------------------------
    def try_remove(self, node: ir.Node) -> bool:
        """Drop a Relu/Clip whose producer's quantized output range already clips like it."""
        x, y = self.aliases.get(node.inputs[0], node.inputs[0]), node.outputs[0]
        producer = x.producer() if x is not None else None
        if x is None or producer is None or not is_float(x) or y.name not in self.ranges:
            return False
        decision = self.plan.nodes.get(producer.name or "")
        if decision is None or x.name not in decision.outputs:
            return False
        if len(x.uses()) != 1 or x.is_graph_output() or (y.is_graph_output() and self.qoperator):
            return False
        if any(o is not None and o.convert is not None
               for o in (self.config.tensors.get(x.name or ""),
                         self.config.tensors.get(y.name or ""))):
            return False  # its readers ask for a second grid of the tensor
        bounds = clip_bounds(node)
        if bounds is None or singular_reach(y) is not None:
            return False  # the grid would reach a singular-domain input
        params = self.activation(x.name or "", self.ranges[y.name or ""], f"fused:{node.name}")
        if not within_half_step(params, *bounds):
            return False
        self.plan.tensors[x.name or ""] = params
        self.aliases[y] = x
        self.plan.nodes[node.name or ""] = NodeDecision(
            node.name or "", node.op_type, "remove",
            f"the quantized range of '{x.name}' already clips to [{bounds[0]}, {bounds[1]}]")
        return True

    # -- parameters ------------------------------------------------------------------------
    def activation(self, name: str, rng: tuple[float, float], source: str) -> TensorQuant:
        cfg = self.config
        qtype, symmetric = cfg.activation_type, cfg.activation_symmetric
        override = cfg.tensors.get(name)
        if override is not None:
            return _overrides.activation(name, rng, override, cfg, source)
        if cfg.restricted_zero_points and not symmetric and not qtype.is_float:
            scale, zp = numerics.restricted_scale_zero_point(
                rng[0], rng[1], qtype, min_real_range=cfg.min_real_range)
            return _tensor(name, "activation", qtype, scale, zp, None, source, rng)
        params = half_params if name in self.half else numerics.compute_scale_zero_point
        scale, zp = params(
            rng[0], rng[1], qtype, symmetric=symmetric, min_real_range=cfg.min_real_range)
        return _tensor(name, "activation", qtype, scale, zp, None, source, rng)

    def constant(self, value: ir.Value, axis: int | None, as_weight: bool) -> TensorQuant:
        cfg = self.config
        data = read_array(value.const_value)  # type: ignore[arg-type]
        name = value.name or ""
        override = cfg.tensors.get(name)
        if override is not None:
            return _overrides.constant(name, data, axis, as_weight, override, cfg)
        qtype = cfg.weight_type if as_weight else cfg.activation_type
        symmetric = cfg.weights_symmetric if as_weight else cfg.activation_symmetric
        low, high = numerics.tensor_range(data, axis, name=name)
        if qtype.is_float and cfg.float8_from_std:  # onnxruntime: std / std(float8 grid)
            low, high = std_range(tensor_std(data, axis), qtype)
        params = half_params if is_half(value) else numerics.compute_scale_zero_point
        scale, zp = params(
            low, high, qtype, symmetric=symmetric, reduce_range=cfg.reduce_range and as_weight,
            min_real_range=cfg.min_real_range)
        rng = (float(np.min(low)), float(np.max(high))) if data.size else (0.0, 0.0)
        return _tensor(name, "weight", qtype, scale, zp, axis, "constant", rng)

    def _per_channel_fallback(self, node, index, value, params: TensorQuant) -> TensorQuant:
        data = read_array(value.const_value)  # type: ignore[arg-type]
        axis = weight_axis(node, index, data.ndim)
        if axis is None or data.ndim < 2 or (node.op_type == "ConvTranspose" and _group(node) > 1):
            return params
        if value.meta.get(BATCHNORM_FOLDED):
            why = "BatchNormalization folded into it"
        else:
            db = _sqnr_db(data, params)
            if db >= self.config.per_channel_fallback_db:  # type: ignore[operator]
                return params
            why = f"per-tensor SQNR {db:.1f} dB"
        fallback = self.constant(value, axis, True)
        fallback.source = f"constant: per channel ({why})"
        return fallback

    # -- inputs ----------------------------------------------------------------------------
    def plan_input(self, node: ir.Node, index: int, value: ir.Value, rule: OpRule) -> str | None:
        """Parameters for one activation input; returns the reason when it cannot be quantized."""
        name = value.name or ""
        if name in self.plan.tensors:
            return None
        if is_constant(value):
            rank = len(value.const_value.shape)  # type: ignore[union-attr]
            as_weight = index in rule.weights
            override = self.config.tensors.get(name)
            if override is not None and override.decides_granularity:
                default = weight_axis(node, index, rank) if as_weight else None
                axis = _overrides.constant_axis(name, override, rank, default, node.name or "")
                self.plan.tensors[name] = self.constant(value, axis, as_weight)
                return None
            if as_weight and self.config.weight_block_size and not self.qoperator:
                self.plan.tensors[name] = self.blocked(node, index, value)
                return None
            forced = self.per_channel_weights.get(name) if as_weight else None
            per_channel = as_weight and (self.config.per_channel or forced is not None)
            axis = weight_axis(node, index, rank) if per_channel else None
            if axis is not None and node.op_type == "ConvTranspose" and _group(node) > 1:
                axis = None
            params = self.constant(value, axis, as_weight)
            if forced is not None and axis is not None:
                params.source = f"constant: per channel ({forced})"
            elif as_weight and axis is None and self.config.per_channel_fallback_db is not None:
                params = self._per_channel_fallback(node, index, value, params)
            self.plan.tensors[name] = params
            return None
        rng = self._range(name)
        if rng is None:
            return f"input '{name}' has no calibrated range"
        self.plan.tensors[name] = self.activation(name, rng, "calibrated")
        return None

    def blocked(self, node: ir.Node, index: int, value: ir.Value) -> TensorQuant:
        """Block-wise parameters of a rank-2 weight: blocks of ``weight_block_size`` along its
        reduction axis (K of MatMul's ``[K, N]``, of Gemm's B by ``transB``)."""
        cfg = self.config
        data = read_array(value.const_value)  # type: ignore[arg-type]
        if data.ndim != 2:
            raise BlockSizeError(
                f"node '{node.name}': block-wise weights (BlockSize={cfg.weight_block_size}) "
                f"need a rank-2 weight, and '{value.name}' has rank {data.ndim}; quantize it "
                "per channel (per_channel=True) or exclude the node")
        axis = _reduction_axis(node, index)
        scale, zp = block_params(data, axis, cfg.weight_block_size,  # type: ignore[arg-type]
                                 cfg.weight_type, symmetric=cfg.weights_symmetric,
                                 reduce_range=cfg.reduce_range,
                                 min_real_range=cfg.min_real_range)
        return TensorQuant(value.name or "", "weight", cfg.weight_type.name,
                           [float(x) for x in scale.ravel()],
                           [int(z) for z in zp.ravel().astype(np.int64)], axis,
                           f"constant: blocks of {cfg.weight_block_size}",
                           (float(data.min()), float(data.max())) if data.size else None,
                           block_size=cfg.weight_block_size, scale_shape=list(scale.shape))

    def _range(self, name: str) -> tuple[float, float] | None:
        """The calibrated range of an activation; (0, 0) when it has none but its override
        fixes its parameters (scale/zero point, or both rmin and rmax)."""
        if name in self.ranges:
            return self.ranges[name]
        override = self.config.tensors.get(name)
        return (0.0, 0.0) if override is not None and override.fixes_params else None

    def decide(self, node: ir.Node, rule: OpRule) -> NodeDecision:
        decision = NodeDecision(node.name or "", node.op_type, "float")
        for index, value in enumerate(node.inputs):
            value = self.aliases.get(value, value)
            if not (rule.is_quantized_input(index) and is_float(value)):
                continue
            if (node.name or "") in self.float_softmax:
                continue
            assert value is not None
            if from_dequantize(value):
                continue  # already quantized in the input model
            reason = self.plan_input(node, index, value, rule)
            if reason:
                decision.reason = reason
                return decision
            decision.inputs[index] = value.name or ""
        if not decision.inputs and rule.output is not OutputMode.FIXED:
            decision.reason = rule.note or "no float input to quantize"
            return decision
        decision.action = "quantize"
        notes = [self.per_channel_weights[t] for t in decision.inputs.values()
                 if t in self.per_channel_weights]
        decision.reason = "; ".join(notes)
        self.plan_outputs(node, rule, decision)
        return decision

    def decide_weights(self, node: ir.Node, rule: OpRule, why: str) -> NodeDecision:
        """Weight-only: constant weights stored quantized, activations float."""
        decision = NodeDecision(node.name or "", node.op_type, "weights",
                                f"weight-only ({why})" if why else "weight-only op")
        for index in rule.weights:
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None or not is_float(value) or not is_constant(value):
                continue
            self.plan_input(node, index, value, rule)
            decision.inputs[index] = value.name or ""
        if not decision.inputs:
            decision.action, decision.reason = "float", "no constant float weight"
        return decision

    # -- outputs ---------------------------------------------------------------------------
    def plan_outputs(self, node: ir.Node, rule: OpRule, decision: NodeDecision) -> None:
        for value in node.outputs:
            name = value.name or ""
            if not is_float(value) or rule.output is OutputMode.NONE or self.feeds_float_ops(value):
                continue
            if not self.qoperator and node.op_type in self.config.float_output_op_types:
                continue
            singular = singular_reach(value)
            if singular is not None:
                note = f"output '{name}' not quantized: {singular}"
                decision.reason = f"{decision.reason}; {note}" if decision.reason else note
                continue
            if rule.output is OutputMode.SHARED:
                source = self.plan.tensors.get(decision.inputs.get(0, ""))
                if source is None:
                    continue
                params = TensorQuant(**{**source.__dict__, "name": name, "role": "activation",
                                        "source": f"shared:{source.name}"})
                if params.axis is not None:
                    continue  # a per-channel weight cannot be shared with an activation
            elif rule.output is OutputMode.FIXED:
                params = self.fixed(node, name, rule)
            elif (rng := self._range(name)) is not None:
                params = self.activation(name, rng, "calibrated")
            else:
                continue
            self.plan.tensors.setdefault(name, params)
            decision.outputs.append(name)

    def fixed(self, node: ir.Node, name: str, rule: OpRule) -> TensorQuant:
        """Parameters of a fixed-range output. QLinearSoftmax writes probabilities on the grid
        of step 1/256 starting at 0 (zero point 0 for uint8, -128 for int8)."""
        assert rule.fixed_range is not None
        qtype = self.config.activation_type
        if self.qoperator and node.op_type == "Softmax" and qtype.bits == 8 and not qtype.is_float:
            return _tensor(name, "activation", qtype, 1.0 / 256.0, qtype.qmin, None, "fixed",
                           rule.fixed_range)
        return self.activation(name, rule.fixed_range, "fixed")

    # -- bias ------------------------------------------------------------------------------
def _sqnr_db(data: np.ndarray, params: TensorQuant) -> float:
    q = numerics.quantize(data, params.scale_array(), params.zero_point_array(), params.quant_type,
                          axis=params.axis)
    err = data.astype(np.float64) - numerics.dequantize(q, params.scale_array(),
                                                        params.zero_point_array(), axis=params.axis)
    noise = float(np.sum(err * err))
    signal = float(np.sum(data.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(signal / noise))


class BlockSizeError(QuantizationError, NotImplementedError):
    """Block-wise weights were asked for a weight they are not defined for (rank != 2)."""


def _reduction_axis(node: ir.Node, index: int) -> int:
    """The axis of a rank-2 weight that the node sums over (K)."""
    if node.op_type == "Gemm":
        attr = node.attributes.get("transA" if index == 0 else "transB")
        transposed = attr is not None and attr.as_int() == 1
        return (1 if transposed else 0) if index == 1 else (0 if transposed else 1)
    return 0 if index == 1 else 1  # MatMul: B is [K, N], A is [M, K]


def _group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return attr.as_int() if attr is not None else 1


def _tensor(name, role, qtype: QuantType, scale, zp, axis, source, rng) -> TensorQuant:
    scales = [float(s) for s in np.atleast_1d(scale)]
    zps = [int(z) for z in np.atleast_1d(zp).astype(np.int64)]
    rng = (float(rng[0]), float(rng[1])) if rng is not None else None
    return TensorQuant(name, role, qtype.name, scales, zps, axis, source, rng)


def _settings(config: StaticQuantConfig) -> dict:
    return {
        "activation_type": config.activation_type.name,
        "weight_type": config.weight_type.name,
        "per_channel": config.per_channel,
        "reduce_range": config.reduce_range,
        "activation_symmetric": config.activation_symmetric,
        "weight_symmetric": config.weights_symmetric,
        "format": config.format.value,
        "calibration_method": config.calibration_method.value,
        **{key: True for key in ("contrib_qdq_ops", "dedicated_qdq_pairs", "weight_qdq_pairs")
           if getattr(config, key)},
    }


def build_plan(
    nodes: list[ir.Node], ranges: Mapping[str, tuple[float, float]], config: StaticQuantConfig,
    *, keep_float: Mapping[str, str] | None = None,
) -> QuantPlan:
    """Decide every selected node (given in topological order) and compute all parameters.

    Constant inputs whose grid would be meaningless (extreme values) are found first: their
    weights go per channel where that fixes them, their nodes stay float otherwise; so do
    nodes that would hand a grid on to a singular-domain input (a Reshape, Relu, Clip or
    ``+ eps`` before a Log, a divisor, ...; see :mod:`._singular`). Which nodes are quantized
    is settled next (``choose_nodes``); parameters are then computed in graph order, so
    data-movement ops see their input's final parameters and every bias sees its input and
    weight scales.

    Args:
        nodes: The selected nodes, in topological order.
        ranges: Calibrated ranges by tensor name.
        config: Settings.
        keep_float: Node name -> reason, for nodes that must stay float (finiteness fallback).
    """
    extremes = check_constants(nodes, config)
    kept = {**grid_keeping_nodes(nodes), **extremes.float_nodes}
    if keep_float:
        kept.update({n: keep_float[n.name or ""] for n in nodes if (n.name or "") in keep_float})
    forced = forced_nodes(nodes, config)
    by_cost = speed_choice(nodes, config, forced, kept)
    rules = config.objective is not Objective.SIZE  # size: no speed rule keeps a node float
    chosen = choose_nodes(nodes, ranges, config.format,
                          float_depthwise_multiple=(config.float_depthwise_multiple
                                                    if rules else None),
                          float_conv_depth=config.float_conv_depth if rules else None,
                          keep_float=kept, forced=forced,
                          speed_floats=by_cost.floats if by_cost is not None else None)
    planner = _Planner(config, ranges)
    planner.plan.settings["cost_model"] = by_cost.estimate() if by_cost is not None \
        else {"objective": Objective(config.objective).value, "measured": False}
    planner.half = {v.name or "" for n in nodes for v in (*n.inputs, *n.outputs)
                    if v is not None and is_half(v)}
    planner.per_channel_weights = extremes.per_channel
    planner.find_float_softmax(nodes)
    quantized: list[tuple[ir.Node, OpRule, NodeDecision]] = []
    for node in nodes:
        rule = rule_for(node, config.format)
        assert rule is not None
        if node in kept:
            planner.plan.nodes[node.name or ""] = NodeDecision(
                node.name or "", node.op_type, "float", kept[node])
            continue
        if rule.weight_only or node in chosen.weight_only:
            planner.plan.nodes[node.name or ""] = planner.decide_weights(node, rule,
                                                                         chosen.reason(node))
            continue
        if node not in chosen:
            planner.plan.nodes[node.name or ""] = NodeDecision(
                node.name or "", node.op_type, "float", chosen.reason(node))
            continue
        if rule.removable and not config.keep_removable_activations:
            if planner.try_remove(node):
                continue
        decision = planner.decide(node, rule)
        if decision.action == "quantize":
            quantized.append((node, rule, decision))
        planner.plan.nodes[decision.name] = decision
    plan_biases(planner.plan, config, quantized)
    _overrides.plan_converts(nodes, planner.plan, ranges, config)
    _warn_unknown_overrides(nodes, config)
    return planner.plan


def _warn_unknown_overrides(nodes: list[ir.Node], config: StaticQuantConfig) -> None:
    """Name the tensor overrides that match no tensor the selected nodes read or write."""
    if not config.tensors:
        return
    known = {v.name for n in nodes for v in (*n.inputs, *n.outputs) if v is not None}
    unknown = sorted(set(config.tensors) - known)
    if unknown:
        logger.warning("tensor overrides name tensors no selected node reads or writes: %s",
                       ", ".join(f"'{n}'" for n in unknown[:10]))
