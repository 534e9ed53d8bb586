"""onnxruntime's ``onnx_model.ONNXModel``: a thin helper around an ``onnx.ModelProto``.

Code written for ``onnxruntime.quantization`` (fusions, custom quantizers, scripts) uses this
class to look nodes up by the tensors they read or write, to add and remove nodes and
initializers, to sort the graph and to save it. Every method works on the wrapped proto in
place (``ONNXModel(model).model is model``); the lookups are computed on each call, so they
are never stale. Only the main graph is edited; subgraph bodies are read where the answer
depends on them (names they use from the outer scope).

Differences from onnxruntime, on purpose: :meth:`ONNXModel.topological_sort` also waits for the
producers of the outer-scope names a subgraph reads and accepts names defined by an enclosing
graph (onnxruntime asserts there); :meth:`ONNXModel.clean_initializers` returns the names it
removed.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["ONNXModel"]


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _names_read(node: onnx.NodeProto) -> set[str]:
    """Every tensor name ``node`` reads: its inputs and what its subgraphs read (any depth)."""
    names = {name for name in node.input if name}
    for graph in _subgraphs(node):
        for inner in graph.node:
            names |= _names_read(inner)
    return names


class ONNXModel:
    """onnxruntime's ``ONNXModel``: graph helpers over ``model`` (edited in place).

    Args:
        model: The model to wrap.

    Attributes:
        model: The wrapped ``onnx.ModelProto``.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model

    # -- plain accessors ------------------------------------------------------------------
    def nodes(self) -> list[onnx.NodeProto]:
        """The main graph's nodes (the repeated field itself)."""
        return self.model.graph.node  # type: ignore[return-value]

    def initializer(self) -> list[onnx.TensorProto]:
        """The main graph's initializers (the repeated field itself)."""
        return self.model.graph.initializer  # type: ignore[return-value]

    def graph(self) -> onnx.GraphProto:
        """The main graph."""
        return self.model.graph

    def ir_version(self) -> int:
        """The model's IR version."""
        return self.model.ir_version

    def opset_import(self) -> list[onnx.OperatorSetIdProto]:
        """The model's opset imports."""
        return self.model.opset_import  # type: ignore[return-value]

    def set_opset_import(self, domain: str, version: int) -> None:
        """Set the version imported for ``domain``, adding the import if it is missing."""
        for opset in self.model.opset_import:
            if opset.domain == domain:
                opset.version = version
                return
        self.model.opset_import.extend([helper.make_opsetid(domain, version)])

    # -- editing --------------------------------------------------------------------------
    def add_node(self, node: onnx.NodeProto) -> None:
        """Append ``node`` to the main graph."""
        self.model.graph.node.extend([node])

    def add_nodes(self, nodes_to_add: Iterable[onnx.NodeProto]) -> None:
        """Append ``nodes_to_add`` to the main graph."""
        self.model.graph.node.extend(nodes_to_add)

    def remove_node(self, node: onnx.NodeProto) -> None:
        """Remove ``node`` from the main graph (nothing if it is not there)."""
        if node in self.model.graph.node:
            self.model.graph.node.remove(node)

    def remove_nodes(self, nodes_to_remove: Iterable[onnx.NodeProto]) -> None:
        """Remove each of ``nodes_to_remove`` from the main graph."""
        for node in nodes_to_remove:
            self.remove_node(node)

    def add_initializer(self, tensor: onnx.TensorProto) -> None:
        """Add ``tensor`` to the initializers, replacing one of the same name."""
        existing = self.get_initializer(tensor.name)
        if existing is not None:
            self.remove_initializer(existing)
        self.model.graph.initializer.extend([tensor])

    def add_initializers(self, tensors: Iterable[onnx.TensorProto]) -> None:
        """:meth:`add_initializer` for each of ``tensors``."""
        for tensor in tensors:
            self.add_initializer(tensor)

    def initializer_extend(self, inits: Iterable[onnx.TensorProto]) -> None:
        """Append ``inits`` to the initializers as they are."""
        self.model.graph.initializer.extend(inits)

    def remove_initializer(self, tensor: onnx.TensorProto) -> None:
        """Remove ``tensor`` from the initializers and from the graph inputs (if listed)."""
        if tensor in self.model.graph.initializer:
            self.model.graph.initializer.remove(tensor)
        graph_input = self.find_graph_input(tensor.name)
        if graph_input is not None:
            self.model.graph.input.remove(graph_input)

    def remove_initializers(self, init_to_remove: Iterable[onnx.TensorProto]) -> None:
        """:meth:`remove_initializer` for each of ``init_to_remove``."""
        for tensor in list(init_to_remove):
            self.remove_initializer(tensor)

    # -- lookups --------------------------------------------------------------------------
    def get_initializer(self, name: str) -> onnx.TensorProto | None:
        """The main graph's initializer called ``name``, or None."""
        return next((t for t in self.model.graph.initializer if t.name == name), None)

    def get_initializer_name_set(self) -> set[str]:
        """The names of the main graph's initializers."""
        return {t.name for t in self.model.graph.initializer}

    def get_constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or ``Constant`` node output called ``name``, or None."""
        tensor = self.get_initializer(name)
        if tensor is not None:
            return numpy_helper.to_array(tensor)
        node = self.output_name_to_node().get(name)
        if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            return None
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                dtype = np.float32 if attr.name.startswith("value_float") else np.int64
                return np.array(helper.get_attribute_value(attr), dtype=dtype)
        return None

    def find_graph_input(self, input_name: str) -> onnx.ValueInfoProto | None:
        """The graph input called ``input_name``, or None."""
        return next((v for v in self.model.graph.input if v.name == input_name), None)

    def find_graph_output(self, output_name: str) -> onnx.ValueInfoProto | None:
        """The graph output called ``output_name``, or None."""
        return next((v for v in self.model.graph.output if v.name == output_name), None)

    def is_graph_output(self, output_name: str) -> bool:
        """Whether ``output_name`` is a graph output."""
        return self.find_graph_output(output_name) is not None

    def get_non_initializer_inputs(self) -> set[str]:
        """Names of the graph inputs that are not initializers."""
        inits = self.get_initializer_name_set()
        return {v.name for v in self.model.graph.input if v.name not in inits}

    def input_name_to_nodes(self) -> dict[str, list[onnx.NodeProto]]:
        """Tensor name -> the main-graph nodes that read it (subgraph reads count for their
        node)."""
        consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in self.model.graph.node:
            direct = [n for n in node.input if n]
            for name in dict.fromkeys(direct + sorted(_names_read(node) - set(direct))):
                consumers[name].append(node)
        return dict(consumers)

    def output_name_to_node(self) -> dict[str, onnx.NodeProto]:
        """Tensor name -> the main-graph node that writes it."""
        return {name: node for node in self.model.graph.node for name in node.output if name}

    def get_children(self, node: onnx.NodeProto,
                     input_name_to_nodes: dict[str, list[onnx.NodeProto]] | None = None
                     ) -> list[onnx.NodeProto]:
        """The nodes that read any output of ``node``."""
        consumers = input_name_to_nodes if input_name_to_nodes is not None \
            else self.input_name_to_nodes()
        return [child for name in node.output for child in consumers.get(name, [])]

    def get_parents(self, node: onnx.NodeProto,
                    output_name_to_node: dict[str, onnx.NodeProto] | None = None
                    ) -> list[onnx.NodeProto]:
        """The nodes that write the inputs of ``node`` (graph inputs and initializers have
        none)."""
        producers = output_name_to_node if output_name_to_node is not None \
            else self.output_name_to_node()
        return [producers[name] for name in node.input if name in producers]

    def get_parent(self, node: onnx.NodeProto, idx: int,
                   output_name_to_node: dict[str, onnx.NodeProto] | None = None
                   ) -> onnx.NodeProto | None:
        """The node that writes input ``idx`` of ``node``, or None."""
        if idx >= len(node.input):
            return None
        producers = output_name_to_node if output_name_to_node is not None \
            else self.output_name_to_node()
        return producers.get(node.input[idx])

    @staticmethod
    def find_node_by_name(node_name: str, new_nodes_list: Iterable[onnx.NodeProto],
                          graph: onnx.GraphProto) -> onnx.NodeProto | None:
        """The node called ``node_name`` in ``new_nodes_list`` or else in ``graph``."""
        for node in [*new_nodes_list, *graph.node]:
            if node.name == node_name:
                return node
        return None

    def get_largest_node_name_suffix(self, node_name_prefix: str) -> int:
        """The largest integer ``N`` of a node called ``<prefix>N`` (-1 when there is none)."""
        largest = -1
        for node in self.model.graph.node:
            suffix = node.name[len(node_name_prefix):]
            if node.name.startswith(node_name_prefix) and suffix.isdigit():
                largest = max(largest, int(suffix))
        return largest

    # -- rewiring -------------------------------------------------------------------------
    @staticmethod
    def replace_node_input(node: onnx.NodeProto, old_input_name: str,
                           new_input_name: str) -> None:
        """Make ``node`` read ``new_input_name`` wherever it read ``old_input_name``."""
        for i, name in enumerate(node.input):
            if name == old_input_name:
                node.input[i] = new_input_name

    def replace_input_of_all_nodes(self, old_input_name: str, new_input_name: str) -> None:
        """:meth:`replace_node_input` on every main-graph node."""
        for node in self.model.graph.node:
            self.replace_node_input(node, old_input_name, new_input_name)

    @staticmethod
    def replace_node_output(node: onnx.NodeProto, old_output_name: str,
                            new_output_name: str) -> None:
        """Make ``node`` write ``new_output_name`` instead of ``old_output_name``."""
        for i, name in enumerate(node.output):
            if name == old_output_name:
                node.output[i] = new_output_name

    def replace_output_of_all_nodes(self, old_output_name: str, new_output_name: str) -> None:
        """:meth:`replace_node_output` on every main-graph node."""
        for node in self.model.graph.node:
            self.replace_node_output(node, old_output_name, new_output_name)

    # -- clean-up and order ---------------------------------------------------------------
    def _names_in_use(self) -> set[str]:
        used = {v.name for v in self.model.graph.output}
        for node in self.model.graph.node:
            used |= _names_read(node)
        return used

    def remove_unused_constant(self) -> None:
        """Remove ``Constant`` nodes and initializers that nothing reads."""
        used = self._names_in_use()
        for node in [n for n in self.model.graph.node if n.op_type == "Constant"]:
            if not any(name in used for name in node.output):
                self.model.graph.node.remove(node)
        self.remove_initializers([t for t in self.model.graph.initializer
                                  if t.name not in used])

    def clean_initializers(self) -> list[str]:
        """Remove initializers that no node (subgraphs included) and no graph output reads.

        Returns:
            The removed names.
        """
        used = self._names_in_use()
        unused = [t for t in self.model.graph.initializer if t.name not in used]
        self.remove_initializers(unused)
        return [t.name for t in unused]

    def topological_sort(self) -> None:
        """Order the main graph's nodes so that each comes after the producers of what it reads.

        Kahn's algorithm, first in first out: nodes ready from the start keep their order,
        then each node releases its consumers in graph order. Names that no node of this graph
        writes (inputs, initializers, outer scope) are ready from the start.

        Raises:
            ValueError: The graph has a cycle.
        """
        nodes = list(self.model.graph.node)
        producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
        waiting = [0] * len(nodes)
        released: dict[int, list[int]] = collections.defaultdict(list)
        for i, node in enumerate(nodes):
            deps = {producer[name] for name in _names_read(node) if name in producer}
            deps.discard(i)
            waiting[i] = len(deps)
            for dep in sorted(deps):
                released[dep].append(i)
        queue = collections.deque(i for i in range(len(nodes)) if waiting[i] == 0)
        order: list[int] = []
        while queue:
            current = queue.popleft()
            order.append(current)
            for child in released[current]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    queue.append(child)
        if len(order) != len(nodes):
            stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if waiting[i]]
            raise ValueError(f"the graph has a cycle through nodes {stuck[:10]}")
        sorted_nodes = [nodes[i] for i in order]
        self.model.graph.ClearField("node")
        self.model.graph.node.extend(sorted_nodes)

    # -- rewrites and saving --------------------------------------------------------------
    def replace_gemm_with_matmul(self) -> None:
        """Rewrite each ``Gemm(alpha=1, beta=1, transA=0)`` as ``MatMul`` (+ ``Add`` for C).

        ``transB=1`` uses a transposed copy ``<B>_Transposed`` of an initializer B (the
        original stays for its other readers), else a ``Transpose`` node.
        """
        for gemm in [n for n in self.model.graph.node if n.op_type == "Gemm"]:
            attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 \
                    or attrs.get("transA", 0) != 0:
                continue
            self._replace_gemm(gemm, bool(attrs.get("transB", 0)))

    def _unique_name(self, base: str) -> str:
        taken = {n for node in self.model.graph.node for n in (*node.output, node.name)}
        taken |= self.get_initializer_name_set() | {v.name for v in self.model.graph.input}
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def _transposed_b(self, gemm: onnx.NodeProto) -> str:
        b_name = gemm.input[1]
        weight = self.get_initializer(b_name)
        if weight is not None:
            name = self._unique_name(f"{b_name}_Transposed")
            self.add_initializer(numpy_helper.from_array(numpy_helper.to_array(weight).T, name))
            return name
        name = self._unique_name(f"{gemm.name or b_name}_Transpose_output")
        self.add_node(helper.make_node("Transpose", [b_name], [name],
                                       name=self._unique_name(f"{gemm.name}_Transpose"),
                                       perm=[1, 0]))
        return name

    def _replace_gemm(self, gemm: onnx.NodeProto, trans_b: bool) -> None:
        b_name = self._transposed_b(gemm) if trans_b else gemm.input[1]
        base = gemm.name or gemm.output[0]
        has_c = len(gemm.input) > 2 and bool(gemm.input[2])
        matmul_out = self._unique_name(f"{base}_MatMul_output") if has_c else gemm.output[0]
        new_nodes = [helper.make_node("MatMul", [gemm.input[0], b_name], [matmul_out],
                                      name=self._unique_name(f"{base}_MatMul"))]
        if has_c:
            new_nodes.append(helper.make_node("Add", [matmul_out, gemm.input[2]],
                                              [gemm.output[0]],
                                              name=self._unique_name(f"{base}_Add")))
        self.remove_node(gemm)
        self.add_nodes(new_nodes)

    def save_model_to_file(self, output_path: str | os.PathLike,
                           use_external_data_format: bool = False) -> None:
        """Sort the graph topologically and save the model.

        Args:
            output_path: Where to write the model.
            use_external_data_format: Store the tensors in ``<output file name>.data`` next to
                it (attribute tensors included).
        """
        self.topological_sort()
        if use_external_data_format:
            onnx.external_data_helper.convert_model_to_external_data(
                self.model, all_tensors_to_one_file=True,
                location=Path(output_path).name + ".data", convert_attribute=True)
        onnx.save_model(self.model, os.fspath(output_path))
