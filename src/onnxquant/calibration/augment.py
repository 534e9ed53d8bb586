"""Expose the (min, max) of intermediate tensors — also inside If/Loop/Scan bodies — as outputs.

For every requested tensor the augmented model computes a ``[1, 2]`` float32 pair
``(min, max)`` next to the tensor, so one inference per batch yields every range and ORT never
has to hand back full activations. A tensor inside a subgraph is carried out of it as an extra
output of the control-flow node: an If gets the pair from the branch that ran (the other branch
yields ``[[+inf, -inf]]``, meaning "no data"); Loop and Scan stack one pair per iteration
(``[iterations, 1, 2]``). The caller reduces every result with ``reshape(-1, 2)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxquant.core.graph import add_initializer

__all__ = ["expose_ranges", "expose_tensors", "PAIR", "VALUES"]

_FLOAT = ir.DataType.FLOAT
_PAIR_TYPE = ir.TensorType(_FLOAT)


PAIR = "pair"  # [..., 2] float32 (min, max) pairs, reduced in the graph
VALUES = "values"  # the tensor's values themselves (flattened inside subgraphs)


class _Augmenter:
    def __init__(self, model: ir.Model, names: set[str], values: bool) -> None:
        self.model = model
        self.names = names
        self.want_values = values
        self.kinds: dict[str, str] = {}
        self._ids = itertools.count()
        self.shape_1_1 = self._initializer(np.array([1, 1], np.int64), "shape_1_1")
        self.zero = self._initializer(np.array(0.0, np.float32), "zero")
        self.zeros: dict[ir.DataType, ir.Value] = {}
        self.flat_shape = self._initializer(np.array([-1], np.int64), "flat")

    def _initializer(self, array: np.ndarray, stem: str) -> ir.Value:
        return add_initializer(self.model.graph, self._name(stem), array)

    def _name(self, stem: str) -> str:
        return f"_oqcal_{next(self._ids)}_{stem}"

    def _add(
        self, graph: ir.Graph, op: str, inputs: Iterable[ir.Value], **attrs: Any
    ) -> ir.Value:
        node = ir.node(op, list(inputs), attributes=attrs or None, name=self._name(op))
        graph.append(node)
        out = node.outputs[0]
        out.name = self._name(op.lower())
        return out

    def pair(self, graph: ir.Graph, value: ir.Value) -> ir.Value:
        """Nodes in ``graph`` computing ``[[min(value), max(value)]]`` as float32.

        onnxruntime's ReduceMin/ReduceMax skip a NaN that is not the first element, so
        ``sum(value * 0)`` — NaN when any element is NaN or ±Inf, 0 otherwise — is added to
        the pair to mark such a batch as non-finite. (Multiplying before summing keeps a sum of
        finite float16 values from overflowing to inf.)
        """
        parts = [self._reduced(graph, op, value) for op in ("ReduceMin", "ReduceMax")]
        pair = self._add(graph, "Concat", parts, axis=1)
        zeros = self._add(graph, "Mul", [value, self._zero(value.dtype)])
        zeros.type = value.type
        poison = self._reduced(graph, "ReduceSum", zeros)
        out = self._add(graph, "Add", [pair, poison])
        out.type = _PAIR_TYPE
        return out

    def _zero(self, dtype: ir.DataType | None) -> ir.Value:
        """A 0-d zero of ``dtype`` (one initializer per element type)."""
        if dtype is None or dtype == _FLOAT:
            return self.zero
        if dtype not in self.zeros:
            array = np.zeros((), dtype=dtype.numpy())
            self.zeros[dtype] = self._initializer(array, f"zero_{dtype.name.lower()}")
        return self.zeros[dtype]

    def _reduced(self, graph: ir.Graph, op: str, value: ir.Value) -> ir.Value:
        reduced = self._add(graph, op, [value], keepdims=1)
        flat = self._add(graph, "Reshape", [reduced, self.shape_1_1])
        if value.dtype is not None and value.dtype != _FLOAT:
            flat = self._add(graph, "Cast", [flat], to=_FLOAT)
        return flat

    def empty_pair(self, graph: ir.Graph) -> ir.Value:
        """A constant ``[[+inf, -inf]]`` pair (the branch that did not see the tensor).

        It has the same shape as a real pair, so Loop/Scan can stack it across iterations in
        which different branches run; observers treat ``(+inf, -inf)`` as "no data".
        """
        tensor = ir.tensor(np.array([[np.inf, -np.inf]], np.float32))
        node = ir.node("Constant", [], attributes={"value": tensor}, name=self._name("empty"))
        graph.append(node)
        out = node.outputs[0]
        out.name = self._name("empty_pair")
        out.type = _PAIR_TYPE
        return out

    def values(self, graph: ir.Graph, value: ir.Value) -> ir.Value:
        """The tensor itself: an Identity in the main graph, flattened float32 in a subgraph
        (so that the two branches of an If may carry tensors of different shapes)."""
        if graph is self.model.graph:
            out = self._add(graph, "Identity", [value])
            out.type = value.type
            return out
        flat = self._add(graph, "Reshape", [value, self.flat_shape])
        if value.dtype != _FLOAT:
            flat = self._add(graph, "Cast", [flat], to=_FLOAT)
        flat.type = _PAIR_TYPE
        return flat

    def empty_values(self, graph: ir.Graph) -> ir.Value:
        """A constant empty float32 vector (the If branch that did not see the tensor)."""
        node = ir.node("Constant", [], attributes={"value": ir.tensor(np.zeros(0, np.float32))},
                       name=self._name("empty"))
        graph.append(node)
        out = node.outputs[0]
        out.name = self._name("empty_values")
        out.type = _PAIR_TYPE
        return out

    def _exposed(self, graph: ir.Graph, value: ir.Value, in_loop: bool) -> ir.Value:
        # Loop/Scan stack one output per iteration, which needs equal shapes: pairs only.
        kind = VALUES if self.want_values and not in_loop else PAIR
        self.kinds[value.name or ""] = kind
        return self.values(graph, value) if kind == VALUES else self.pair(graph, value)

    def expose(self, graph: ir.Graph, in_loop: bool = False) -> dict[str, ir.Value]:
        """Values of ``graph`` carrying every requested tensor in ``graph`` and below."""
        found: dict[str, ir.Value] = {}
        for value in graph.inputs:
            if value.name in self.names:
                found[value.name] = self._exposed(graph, value, in_loop)  # type: ignore[index]
        for node in list(graph):
            for out in node.outputs:
                if out.name in self.names:
                    found[out.name] = self._exposed(graph, out, in_loop)
            if node.op_type == "If" and node.domain in ("", "ai.onnx"):
                found.update(self._through_if(node, in_loop))
            elif node.op_type in ("Loop", "Scan") and node.domain in ("", "ai.onnx"):
                found.update(self._through_loop(node))
        return found

    def _through_if(self, node: ir.Node, in_loop: bool) -> dict[str, ir.Value]:
        branches = [node.attributes[k].as_graph() for k in ("then_branch", "else_branch")]
        results = [self.expose(branch, in_loop) for branch in branches]
        keys = sorted(set(results[0]) | set(results[1]))
        for branch, result in zip(branches, results, strict=True):
            for key in keys:
                if key in result:
                    branch.outputs.append(result[key])
                elif self.kinds[key] == PAIR:
                    branch.outputs.append(self.empty_pair(branch))
                else:
                    branch.outputs.append(self.empty_values(branch))
        return self._new_outputs(node, keys)

    def _through_loop(self, node: ir.Node) -> dict[str, ir.Value]:
        body = node.attributes["body"].as_graph()
        result = self.expose(body, in_loop=True)
        keys = sorted(result)
        for key in keys:
            body.outputs.append(result[key])
        if node.op_type == "Scan":
            for attr_name in ("scan_output_axes", "scan_output_directions"):
                attr = node.attributes.get(attr_name)
                if attr is not None:
                    values = list(attr.as_ints()) + [0] * len(keys)
                    node.attributes[attr_name] = ir.AttrInt64s(attr_name, values)
        return self._new_outputs(node, keys)

    def _new_outputs(self, node: ir.Node, keys: list[str]) -> dict[str, ir.Value]:
        first = len(node.outputs)
        node.resize_outputs(first + len(keys))
        found = {}
        for offset, key in enumerate(keys):
            out = node.outputs[first + offset]
            out.name = self._name("carried")
            out.type = _PAIR_TYPE
            found[key] = out
        return found


def expose_tensors(
    model: ir.Model, names: Iterable[str], *, values: bool = False
) -> dict[str, tuple[str, str]]:
    """Add model outputs that carry the named tensors' statistics, in place.

    Args:
        model: A private copy of the model (it is changed).
        names: Names of float tensors (graph inputs or node outputs, at any nesting depth).
        values: Carry the tensors' values (for histograms) instead of (min, max) pairs.
            Tensors inside Loop/Scan bodies always get pairs.

    Returns:
        Tensor name -> (model output name, ``"values"`` or ``"pair"``). Tensors that were not
        found (e.g. initializers) are absent.
    """
    augmenter = _Augmenter(model, set(names), values)
    found = augmenter.expose(model.graph)
    outputs = {}
    for key, value in found.items():
        model.graph.outputs.append(value)
        outputs[key] = (value.name or "", augmenter.kinds[key])
    model.graph.sort()
    for sub in model.graph.subgraphs():
        sub.sort()
    return outputs


def expose_ranges(model: ir.Model, names: Iterable[str]) -> dict[str, str]:
    """Add model outputs with the (min, max) pairs of the named tensors, in place.

    Returns:
        Tensor name -> name of the model output carrying its pairs.
    """
    return {k: name for k, (name, _) in expose_tensors(model, names).items()}
