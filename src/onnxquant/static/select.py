"""The nodes a config selects, those the user named explicitly, and the tensors to calibrate."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

import onnx_ir as ir

from onnxquant.core.graph import from_dequantize, is_constant, is_float, is_half, iter_nodes
from onnxquant.static.config import QuantFormat, StaticQuantConfig
from onnxquant.static.rules import OutputMode, mark_generic, rule_for
from onnxquant.static.selection import choose_nodes, params_from_producer

__all__ = ["select_nodes", "forced_nodes", "tensors_to_calibrate"]


def select_nodes(model: ir.Model, config: StaticQuantConfig) -> list[ir.Node]:
    """Nodes that have a rule and pass the op-type and name filters of ``config``."""
    selected = []
    for node in iter_nodes(model, subgraphs=config.subgraphs):
        if node.op_type in config.force_op_types:
            mark_generic(node, config.format)  # named by the user: Q/DQ even without a rule
        if rule_for(node, config.format) is None or node.op_type in config.op_types_to_exclude:
            continue
        if config.op_types is not None and node.op_type not in config.op_types:
            continue
        if node.name in config.nodes_to_exclude:
            continue
        if config.nodes_to_quantize is not None and node.name not in config.nodes_to_quantize:
            continue
        if (config.matmul_const_b_only and config.format is QuantFormat.QOPERATOR
                and node.op_type == "MatMul" and not _constant_b(node)):
            continue
        if config.format is QuantFormat.QOPERATOR and any(
                is_half(v) for v in (*node.inputs, *node.outputs)):
            continue  # QLinear* kernels take float32 scales only; float16 needs QDQ
        if node.op_type == "Concat" and any(is_half(v) for v in node.inputs):
            # onnxruntime 1.32 fuses DQ -> Concat -> Q into QLinearConcat even with float16
            # scales, which QLinearConcat does not take: the session cannot be created.
            continue
        if (config.format is QuantFormat.QOPERATOR and node.op_type != "MatMul"
                and (config.activation_type.is_float or config.weight_type.is_float)):
            continue  # float8 QOperator: only com.microsoft QLinearMatMul is defined
        selected.append(node)
    return selected


def forced_nodes(nodes: list[ir.Node], config: StaticQuantConfig) -> set[ir.Node]:
    """The selected nodes the user named explicitly (``force_op_types``, ``force_nodes``, or
    a tensor they read or write in ``tensors``): quantized even where onnxquant's own selection
    and speed rules would keep them float."""
    if config.force_quantize:
        return set(nodes)
    if not config.force_op_types and not config.force_nodes and not config.tensors:
        return set()
    return {n for n in nodes
            if n.op_type in config.force_op_types or (n.name or "") in config.force_nodes
            or any(v is not None and v.name in config.tensors
                   for v in (*n.inputs, *n.outputs))}


def _constant_b(node: ir.Node) -> bool:
    b = node.inputs[1] if len(node.inputs) > 1 else None
    return b is not None and (is_constant(b) or from_dequantize(b))


class _Everything(Mapping[str, object]):
    """A range table that has every tensor (to see which tensors could ever be needed)."""

    def __contains__(self, name: object) -> bool:
        return True

    def __getitem__(self, name: str) -> object:
        raise KeyError(name)  # only membership is asked

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def tensors_to_calibrate(nodes: list[ir.Node],
                         qformat: QuantFormat = QuantFormat.QDQ,
                         forced: Collection[ir.Node] = ()) -> set[str]:
    """Tensors whose calibrated range the plan can use.

    Only nodes that can be quantized count; outputs of ops whose parameters are shared with
    their input or fixed (Reshape, MaxPool, Softmax, ...) need no range, nor do inputs they
    produce. Fewer tensors make calibration faster, above all with histogram methods.
    """
    chosen = choose_nodes(nodes, _Everything(), qformat, forced=forced)
    names: set[str] = set()
    for node in nodes:
        rule = rule_for(node, qformat)
        assert rule is not None
        if node not in chosen:
            continue
        for index, value in enumerate(node.inputs):
            if (value is not None and rule.is_quantized_input(index) and is_float(value)
                    and not is_constant(value) and not params_from_producer(value, qformat)):
                names.add(value.name or "")
        if rule.output is OutputMode.OWN:
            names.update(v.name or "" for v in node.outputs if is_float(v))
    return names
