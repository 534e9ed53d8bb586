"""Which MatMul/Gather nodes get block-quantized weights, with a reason for every other one.

A MatMul qualifies when its B input is a constant float32/float16 initializer that is 2-D, or
N-D with all leading dimensions 1. A Gather qualifies when its data input is such a constant
table and the quantize axis (``config.quant_axes["Gather"]``) exists and can be stored for the
requested bits. A weight whose block grid would be meaningless (values like 1e30 or 3.4e38, see
:mod:`._extremes`) keeps its node float. Node names in ``nodes_to_include`` /
``nodes_to_exclude`` / ``overrides`` that match no node are reported as warnings.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from onnxquant.core.graph import is_constant, iter_nodes
from onnxquant.core.qtypes import QuantFormat
from onnxquant.weight_only._extremes import grid_problem
from onnxquant.weight_only.config import (
    NodeSettings,
    WeightOnlyAlgorithm,
    WeightOnlyConfig,
)

__all__ = ["Target", "WeightDecision", "select_targets", "FLOAT_TYPES"]

logger = logging.getLogger(__name__)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclasses.dataclass
class WeightDecision:
    """What happened to one candidate node.

    Attributes:
        name: Node name.
        op_type: Original op type (``MatMul`` or ``Gather``).
        action: ``"weights"`` (weight stored block-quantized) or ``"float"``.
        reason: Why the node stays float, or a note (e.g. GPTQ falling back to RTN).
        weight: Name of the float weight initializer.
        shape: Shape of the float weight.
        emitted: The op that now reads the weight: ``MatMulNBits``, ``DequantizeLinear`` or
            ``GatherBlockQuantized``.
        bits: Bits per weight.
        block_size: Block size used by the node (channel-wise: one block per column).
        symmetric: Whether zero points are implied.
        algorithm: ``rtn``, ``hqq`` or ``gptq``.
    """

    name: str
    op_type: str
    action: str
    reason: str = ""
    weight: str = ""
    shape: tuple[int, ...] = ()
    emitted: str = ""
    bits: int = 0
    block_size: int = 0
    symmetric: bool = False
    algorithm: str = ""


@dataclasses.dataclass
class Target:
    """A node whose constant weight will be block-quantized."""

    node: ir.Node
    weight: ir.Value
    settings: NodeSettings
    axis: int  # quantize axis of the weight tensor (K axis for MatMul)
    block_size: int  # block size written to the node (channel-wise resolved)
    packed_uint8: bool = False  # GatherBlockQuantized uint8 storage (2/8 bits)
    decision: WeightDecision = dataclasses.field(default=None)  # type: ignore[assignment]

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.const_value.shape.numpy())  # type: ignore[union-attr]


def _pow2_at_least(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _matmul_reason(node: ir.Node, reshape_unit_dims: bool = False) -> str | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "MatMul has no B input"
    b = node.inputs[1]
    if not is_constant(b):
        return f"B '{b.name}' is not a constant initializer"
    if b.const_value.dtype not in FLOAT_TYPES:  # type: ignore[union-attr]
        return f"B '{b.name}' is {b.const_value.dtype}, not float32/float16"  # type: ignore[union-attr]
    shape = tuple(b.const_value.shape)  # type: ignore[union-attr]
    if len(shape) < 2:
        return f"B '{b.name}' is 1-D"
    if any(d != 1 for d in shape[:-2]):
        return f"B '{b.name}' has shape {list(shape)}: batched weights (leading dims != 1)"
    if 0 in shape:
        return f"B '{b.name}' is empty"
    a = node.inputs[0]
    reshaped = reshape_unit_dims and len(shape) > 2  # the output Reshape restores the rank
    if a is not None and a.shape is not None and len(a.shape) < 2 and not reshaped:
        return "A is 1-D (MatMulNBits needs A of rank >= 2)"
    return None


def _gather_reason(node: ir.Node, axis: int, settings: NodeSettings) -> tuple[str | None, int]:
    data = node.inputs[0] if node.inputs else None
    if data is None or not is_constant(data):
        name = data.name if data is not None else ""
        return f"data '{name}' is not a constant initializer", axis
    tensor = data.const_value
    if tensor.dtype not in FLOAT_TYPES:  # type: ignore[union-attr]
        return f"data '{data.name}' is {tensor.dtype}, not float32/float16", axis  # type: ignore[union-attr]
    shape = tuple(tensor.shape)  # type: ignore[union-attr]
    rank = len(shape)
    if 0 in shape:
        return f"data '{data.name}' is empty", axis
    if not -rank <= axis < rank:
        return (f"quantize axis {axis} does not exist in data '{data.name}' of rank {rank} "
                "(set quant_axes['Gather'])"), axis
    axis %= rank
    if settings.bits != 4:
        gather_axis = node.attributes.get_int("axis", 0) % rank
        per_byte = 8 // settings.bits
        if gather_axis != 0 or axis != rank - 1 or rank < 2:
            return (f"{settings.bits}-bit GatherBlockQuantized needs gather axis 0 and the "
                    "quantize axis last; use 4 bits for other axes"), axis
        if shape[-1] % per_byte:
            return (f"{settings.bits}-bit GatherBlockQuantized needs the last dimension "
                    f"({shape[-1]}) to be a multiple of {per_byte}"), axis
    return None, axis


def _node_name(node: ir.Node) -> str:
    return node.name or ""


def select_targets(model: ir.Model, config: WeightOnlyConfig
                   ) -> tuple[list[Target], list[WeightDecision]]:
    """The nodes to quantize (in graph order) and a decision for every candidate node.

    Candidates are the nodes whose op type is in ``config.op_types`` (or whose name is in
    ``config.nodes_to_include``). Decisions of targets are completed by the emitter.
    """
    include = set(config.nodes_to_include) if config.nodes_to_include is not None else None
    exclude = set(config.nodes_to_exclude)
    op_types = set(config.op_types)
    targets: list[Target] = []
    decisions: list[WeightDecision] = []
    seen: set[str] = set()
    problems: dict[tuple, str | None] = {}  # weight grids that mean nothing
    for node in iter_nodes(model, subgraphs=config.subgraphs):
        name = _node_name(node)
        seen.add(name)
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gather"):
            if include is not None and name in include:
                decisions.append(WeightDecision(
                    name, node.op_type, "float",
                    f"{node.op_type} is not a weight-only op type (MatMul, Gather)"))
            continue
        if include is not None:
            if name not in include:
                continue
        elif node.op_type not in op_types:
            continue
        decision = WeightDecision(name, node.op_type, "float")
        decisions.append(decision)
        if name in exclude:
            decision.reason = "excluded by nodes_to_exclude"
            continue
        settings = config.settings_for(name)
        weight_index = 1 if node.op_type == "MatMul" else 0
        if node.op_type == "MatMul":
            reason, axis = _matmul_reason(node, config.reshape_unit_dims), 0
        else:
            reason, axis = _gather_reason(node, config.quant_axes.get("Gather", 1), settings)
        if reason is not None:
            decision.reason = reason
            continue
        weight = node.inputs[weight_index]
        assert weight is not None
        shape = tuple(weight.const_value.shape.numpy())  # type: ignore[union-attr]
        if node.op_type == "MatMul":
            axis = len(shape) - 2
        if node.op_type == "Gather" and settings.algorithm is WeightOnlyAlgorithm.GPTQ:
            settings = dataclasses.replace(settings, algorithm=WeightOnlyAlgorithm.RTN)
            decision.reason = "GPTQ needs activations; Gather tables use RTN"
        block = _node_block_size(settings, shape[axis], node.op_type, config.format)
        decision.weight = weight.name or ""
        decision.shape = shape
        grid_key = (id(weight), settings.bits)
        if grid_key not in problems:
            problems[grid_key] = grid_problem(weight, settings.bits)
        if problems[grid_key] is not None:
            decision.reason = problems[grid_key] or ""
            logger.info("node '%s': %s", name, decision.reason)
            continue
        targets.append(Target(node=node, weight=weight, settings=settings, axis=axis,
                              block_size=block,
                              packed_uint8=node.op_type == "Gather" and settings.bits != 4,
                              decision=decision))
    for label, names in (("nodes_to_include", include or ()), ("nodes_to_exclude", exclude),
                         ("overrides", set(config.overrides))):
        missing = sorted(set(names) - seen)
        if missing:
            logger.warning("%s names nodes that are not in the model: %s", label,
                           ", ".join(missing))
    return targets, decisions


def _node_block_size(settings: NodeSettings, k: int, op_type: str, fmt: QuantFormat) -> int:
    """The block size written to the node; channel-wise means one block covering K."""
    if settings.block_size is not None:
        return settings.block_size
    if op_type == "MatMul" and fmt is QuantFormat.QDQ:
        return k  # DequantizeLinear takes any block size
    return _pow2_at_least(k)  # MatMulNBits / GatherBlockQuantized need a power of two
