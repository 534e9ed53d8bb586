"""onnxruntime's ``fusions.Fusion``: the base of a pass that replaces a node pattern by one node.

A subclass names the op it looks for (``search_op_type``) and implements :meth:`Fusion.fuse`,
which, for one node of that type, checks the pattern around it and, when it matches, appends
the pattern's nodes to ``nodes_to_remove`` and the fused node to ``nodes_to_add``.
:meth:`Fusion.apply` runs it over the graph and edits the model once at the end.

Unlike onnxruntime, :meth:`Fusion.apply` puts each fused node where the pattern's node that
wrote the same output was (so a sorted graph stays sorted, instead of fused nodes being
appended at the end) and imports the opset of a new domain (``com.microsoft`` for ``Gelu``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxquant.ort.onnx_model import ONNXModel

__all__ = ["Fusion"]

NodeMap = dict[str, onnx.NodeProto]
ConsumerMap = dict[str, list[onnx.NodeProto]]


class Fusion:
    """Base class of a fusion pass over an :class:`~onnxquant.ort.onnx_model.ONNXModel`.

    Args:
        model: The model, edited in place by :meth:`apply`.
        fused_op_type: The op type of the fused node (used in generated node names).
        search_op_type: The op type :meth:`fuse` is called for.
    """

    def __init__(self, model: ONNXModel, fused_op_type: str, search_op_type: str) -> None:
        self.model = model
        self.fused_op_type = fused_op_type
        self.search_op_type = search_op_type
        self.nodes_to_remove: list[onnx.NodeProto] = []
        self.nodes_to_add: list[onnx.NodeProto] = []
        self._new_node_name_prefix = f"{fused_op_type}_fused_{search_op_type}_"
        self._new_node_name_suffix: int | None = None

    def fuse(self, node: onnx.NodeProto, input_name_to_nodes: ConsumerMap,
             output_name_to_node: NodeMap) -> None:
        """Fuse the pattern around ``node`` if it matches (subclasses implement this)."""
        raise NotImplementedError

    def apply(self) -> bool:
        """Run :meth:`fuse` on every node of ``search_op_type`` and edit the model.

        Returns:
            Whether the model changed.
        """
        self.nodes_to_remove, self.nodes_to_add = [], []
        input_name_to_nodes = self.model.input_name_to_nodes()
        output_name_to_node = self.model.output_name_to_node()
        for node in list(self.model.nodes()):
            if node.op_type == self.search_op_type and not self._is_removed(node):
                self.fuse(node, input_name_to_nodes, output_name_to_node)
        if not self.nodes_to_remove and not self.nodes_to_add:
            return False
        self._rebuild_nodes()
        self._import_new_domains()
        self.model.remove_unused_constant()
        return True

    def _is_removed(self, node: onnx.NodeProto) -> bool:
        return any(node is removed for removed in self.nodes_to_remove)

    def _rebuild_nodes(self) -> None:
        """Drop the removed nodes and put each new node where the removed node that wrote its
        first output was (at the end when none did)."""
        removed = {id(node) for node in self.nodes_to_remove}
        anchored: dict[int, list[onnx.NodeProto]] = {}
        writers = {name: id(node) for node in self.nodes_to_remove for name in node.output}
        unanchored: list[onnx.NodeProto] = []
        for new in self.nodes_to_add:
            anchor = writers.get(new.output[0]) if new.output else None
            (anchored.setdefault(anchor, []) if anchor is not None else unanchored).append(new)
        order: list[onnx.NodeProto] = []
        for node in self.model.nodes():
            if id(node) in removed:
                order.extend(anchored.get(id(node), []))
            else:
                order.append(node)
        graph = self.model.graph()
        graph.ClearField("node")
        graph.node.extend(order + unanchored)

    def _import_new_domains(self) -> None:
        imported = {opset.domain for opset in self.model.opset_import()}
        for node in self.nodes_to_add:
            if node.domain not in imported and node.domain != "ai.onnx":
                self.model.set_opset_import(node.domain, 1)
                imported.add(node.domain)

    def create_unique_node_name(self) -> str:
        """A node name ``<fused>_fused_<search>_<N>`` not used in the graph yet."""
        if self._new_node_name_suffix is None:
            largest = self.model.get_largest_node_name_suffix(self._new_node_name_prefix)
            self._new_node_name_suffix = largest + 1
        name = f"{self._new_node_name_prefix}{self._new_node_name_suffix}"
        self._new_node_name_suffix += 1
        return name

    # -- helpers for subclasses -----------------------------------------------------------
    def is_safe_to_fuse_nodes(self, nodes_to_remove: Sequence[onnx.NodeProto],
                              keep_outputs: Sequence[str], input_name_to_nodes: ConsumerMap,
                              output_name_to_node: NodeMap) -> bool:
        """Whether only ``nodes_to_remove`` read their outputs other than ``keep_outputs``
        (and none of those is a graph output)."""
        del output_name_to_node  # onnxruntime's signature
        members = {id(node) for node in nodes_to_remove}
        for node in nodes_to_remove:
            for name in node.output:
                if not name or name in keep_outputs:
                    continue
                if self.model.is_graph_output(name):
                    return False
                if any(id(child) not in members for child in input_name_to_nodes.get(name, [])):
                    return False
        return True

    @staticmethod
    def get_node_attribute(node: onnx.NodeProto, attribute_name: str) -> Any:
        """The value of ``node``'s attribute ``attribute_name``, or None."""
        for attr in node.attribute:
            if attr.name == attribute_name:
                return helper.get_attribute_value(attr)
        return None

    def is_constant_with_specified_value(self, input_name: str, expected_value: float,
                                         delta: float = 1e-6) -> bool:
        """Whether ``input_name`` is a constant whose every element is ``expected_value``
        (within ``delta``)."""
        value = self.model.get_constant_value(input_name)
        if value is None or value.size == 0 or not np.issubdtype(value.dtype, np.number):
            return False
        return bool(np.all(np.abs(value.astype(np.float64) - expected_value) <= delta))

    def find_constant_input(self, node: onnx.NodeProto, expected_value: float,
                            delta: float = 1e-6) -> int:
        """The index of the first input of ``node`` that is the constant ``expected_value``,
        or -1."""
        for index, name in enumerate(node.input):
            if name and self.is_constant_with_specified_value(name, expected_value, delta):
                return index
        return -1

    def has_constant_input(self, node: onnx.NodeProto, expected_value: float,
                           delta: float = 1e-6) -> bool:
        """Whether an input of ``node`` is the constant ``expected_value``."""
        return self.find_constant_input(node, expected_value, delta) >= 0

    def sole_child(self, node: onnx.NodeProto, op_type: str,
                   input_name_to_nodes: ConsumerMap) -> onnx.NodeProto | None:
        """The only reader of ``node``'s first output if it is an ``op_type`` node, else None
        (also None when that output is a graph output)."""
        if not node.output or self.model.is_graph_output(node.output[0]):
            return None
        children = input_name_to_nodes.get(node.output[0], [])
        if len(children) != 1 or children[0].op_type != op_type:
            return None
        return children[0]

    @staticmethod
    def other_input(node: onnx.NodeProto, name: str) -> str | None:
        """The other input of a two-input ``node`` that reads ``name``, or None."""
        if len(node.input) != 2 or name not in node.input:
            return None
        return node.input[1] if node.input[0] == name else node.input[0]

    def tensor_shape(self, name: str) -> list[int | None] | None:
        """The shape of ``name`` from its initializer or value info (None: unknown rank;
        None entries: unknown dimensions)."""
        tensor = self.model.get_initializer(name)
        if tensor is not None:
            return list(tensor.dims)
        graph = self.model.graph()
        for info in (*graph.input, *graph.value_info, *graph.output):
            if info.name == name and info.type.tensor_type.HasField("shape"):
                return [d.dim_value if d.HasField("dim_value") else None
                        for d in info.type.tensor_type.shape.dim]
        return None

    def reduce_axes(self, node: onnx.NodeProto) -> list[int] | None:
        """The axes a Reduce* ``node`` reduces, from its attribute or its constant second
        input (None: all axes, or not constant)."""
        axes = self.get_node_attribute(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.model.get_constant_value(node.input[1])
            axes = None if value is None else value.reshape(-1).tolist()
        return None if axes is None else [int(a) for a in axes]

    def trailing_axis(self, axes: Sequence[int], rank: int | None) -> int | None:
        """The first axis when ``axes`` are the last ``len(axes)`` axes (as a negative
        number), else None."""
        if not axes:
            return None
        if rank is not None:
            axes = [a - rank if a >= 0 else a for a in axes]
        ordered = sorted(axes)
        if ordered != list(range(-len(ordered), 0)) or (rank is not None and -rank > ordered[0]):
            return None
        return ordered[0]
