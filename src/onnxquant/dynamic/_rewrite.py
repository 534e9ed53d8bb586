"""Which nodes dynamic quantization touches, and the registry of rewrite handlers.

A handler takes the run's :class:`Context` and one node, rewrites it in its graph and returns
``(True, what it emitted)`` or ``(False, why the node stays float)``. Handlers are looked up by
``(domain, op_type)`` and format; LSTM, Attention and EmbedLayerNormalization come from
:mod:`onnxquant.dynamic.contrib_ops` when that module is available.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable

import onnx_ir as ir

from onnxquant.core.qtypes import QuantFormat
from onnxquant.dynamic._context import Context, Outcome
from onnxquant.dynamic._cost import dynamic_costs
from onnxquant.dynamic._half import as_float32
from onnxquant.dynamic.config import DynamicQuantConfig

__all__ = ["DEFAULT_OP_TYPES", "Decision", "rewrite_model"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Conv", "Gather", "LSTM", "Attention",
                    "EmbedLayerNormalization")
_DOMAINS = {"Attention": _MS, "EmbedLayerNormalization": _MS}
_CONTRIB = {"LSTM": "rewrite_lstm", "Attention": "rewrite_attention",
            "EmbedLayerNormalization": "rewrite_embed_layer_norm"}

Handler = Callable[[Context, ir.Node], Outcome]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What happened to one node of a quantizable op type.

    Attributes:
        name: Node name.
        op_type: Operator type.
        action: ``"quantized"`` or ``"float"``.
        reason: What was emitted, or why the node stays float.
        graph: Name of the graph holding the node (subgraphs of If/Loop/Scan included).
    """

    name: str
    op_type: str
    action: str
    reason: str
    graph: str = ""


def _domain_ok(node: ir.Node) -> bool:
    expected = _DOMAINS.get(node.op_type, "")
    return node.domain == expected or (expected == "" and node.domain == "ai.onnx")


def _not_selected(node: ir.Node, config: DynamicQuantConfig) -> str | None:
    """Why ``node`` is outside the selection, or None when it is selected."""
    if node.op_type in config.op_types_to_exclude:
        return f"op type {node.op_type} is in op_types_to_exclude"
    if config.op_types is not None and node.op_type not in config.op_types:
        return f"op type {node.op_type} is not in op_types"
    if node.name in config.nodes_to_exclude:
        return "listed in nodes_to_exclude"
    if config.nodes_to_quantize is not None and node.name not in config.nodes_to_quantize:
        return "not listed in nodes_to_quantize"
    return None


def _contrib_handler(op_type: str) -> Handler | None:
    try:
        module = importlib.import_module("onnxquant.dynamic.contrib_ops")
    except ImportError:
        return None
    function = getattr(module, _CONTRIB[op_type], None)
    if function is None:
        return None

    def handler(ctx: Context, node: ir.Node) -> Outcome:
        assert node.graph is not None
        return function(node.graph, node, ctx.config, ctx.names)

    return handler


def _handler(op_type: str, fmt: QuantFormat) -> Handler | None:
    from onnxquant.dynamic import gather, integer_ops, qdq

    if op_type == "Gather":
        return gather.rewrite_gather
    if fmt is QuantFormat.QDQ:
        return {"MatMul": qdq.rewrite_matmul, "Gemm": qdq.rewrite_gemm,
                "Conv": qdq.rewrite_conv}.get(op_type)
    if op_type in _CONTRIB:
        return _contrib_handler(op_type)
    return {"MatMul": integer_ops.rewrite_matmul, "Gemm": integer_ops.rewrite_gemm,
            "Conv": integer_ops.rewrite_conv}.get(op_type)


def _candidates(model: ir.Model, config: DynamicQuantConfig) -> list[ir.Node]:
    op_types = set(DEFAULT_OP_TYPES) | set(config.op_types or ())
    nodes = ir.traversal.RecursiveGraphIterator(model.graph)
    return [n for n in nodes if n.op_type in op_types and _domain_ok(n)]


_SUBGRAPHS_OFF = ("inside an If/Loop/Scan body, left float by default (per-call dynamic "
                  "quantization overhead dominates small branch/loop bodies); "
                  "subgraphs=True / --subgraphs quantizes them")


def _selected(node: ir.Node, ctx: Context) -> bool:
    return _not_selected(node, ctx.config) is None and (
        ctx.config.subgraphs or node.graph is ctx.model.graph)


def rewrite_model(ctx: Context) -> list[Decision]:
    """Rewrite every selected node of ``ctx.model`` in place; one decision per candidate."""
    decisions = []
    candidates = _candidates(ctx.model, ctx.config)
    costs = dynamic_costs([n for n in candidates if _selected(n, ctx)], ctx.config)
    ctx.cost_estimate = costs.estimate() if costs is not None else None
    slower = costs.floats if costs is not None else {}
    half_weights: dict[int, ir.Value] = {}
    for node in candidates:
        graph_name = (node.graph.name if node.graph is not None else None) or ""
        done, reason = False, _not_selected(node, ctx.config)
        if reason is None and not ctx.config.subgraphs and node.graph is not ctx.model.graph:
            reason = _SUBGRAPHS_OFF
        if reason is None and node in slower:
            reason = slower[node]
        if reason is None:
            handler = _handler(node.op_type, ctx.config.format)
            if handler is None:
                reason = (f"{node.op_type} has no dynamic {ctx.config.format.value} rewrite"
                          + (" (contrib_ops is not available)" if node.op_type in _CONTRIB
                             and ctx.config.format is QuantFormat.QOPERATOR else ""))
            else:
                as_float32(node, ctx.names, half_weights)  # float16: float32 between Casts
                done, reason = handler(ctx, node)
        action = "quantized" if done else "float"
        decisions.append(Decision(node.name or "", node.op_type, action, reason, graph_name))
        logger.debug("%s %s: %s (%s)", node.op_type, node.name, action, reason)
    return decisions
