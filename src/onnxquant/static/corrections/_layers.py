"""Shared by the corrections: the constant weights of Conv/MatMul/Gemm layers, which of their
axes hold input and output channels, and per-channel rescaling of constants in place.

A rescaled constant keeps its name, dtype and shape; it is rewritten only when the node that
reads it is its one reader, so no other node sees the change.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxquant.core.external_data import read_array
from onnxquant.core.graph import add_initializer

__all__ = ["Channels", "LinearWeight", "constant", "store", "sole_reader", "only_read_by",
           "is_onnx", "linear_weight", "conv_weight", "last_axis_vector", "unique_name",
           "new_constant"]

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


def is_onnx(node: ir.Node | None, *op_types: str) -> bool:
    """Whether ``node`` is one of ``op_types`` of the default ONNX domain."""
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The data of a float initializer that is not also a graph input, else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    if value.const_value.dtype not in _FLOATS:
        return None
    return read_array(value.const_value)


def store(value: ir.Value, data: np.ndarray) -> None:
    """Replace the data of initializer ``value``, keeping its name and element type."""
    assert value.const_value is not None
    dtype = value.const_value.dtype.numpy()
    value.const_value = ir.tensor(np.asarray(data).astype(dtype), name=value.name)
    value.shape = ir.Shape(np.shape(data))


def sole_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` (read once), when it is not also a graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def only_read_by(value: ir.Value, nodes: list[ir.Node]) -> bool:
    """Whether every reader of ``value`` is one of ``nodes`` (and it is no graph output)."""
    return not value.is_graph_output() and all(
        any(u.node is n for n in nodes) for u in value.uses())


def unique_name(graph: ir.Graph, stem: str) -> str:
    """``stem``, or ``stem_<n>`` when the graph already has an initializer of that name."""
    name, n = stem, 0
    while name in graph.initializers:
        n += 1
        name = f"{stem}_{n}"
    return name


def new_constant(graph: ir.Graph, stem: str, data: np.ndarray) -> ir.Value:
    """A new initializer (name made unique) holding ``data``."""
    return add_initializer(graph, unique_name(graph, stem), data)


def last_axis_vector(data: np.ndarray, channels: int) -> bool:
    """Whether ``data`` has shape ``[channels]`` or ``[1, ..., 1, channels]``."""
    return data.ndim >= 1 and data.shape[-1] == channels and all(d == 1 for d in data.shape[:-1])


@dataclasses.dataclass(frozen=True)
class Channels:
    """A constant whose slices along ``axis`` belong to one channel each."""

    value: ir.Value
    axis: int

    def data(self) -> np.ndarray:
        """The constant's current data."""
        assert self.value.const_value is not None
        return read_array(self.value.const_value)

    def count(self) -> int:
        """Number of channels."""
        return int(self.data().shape[self.axis])

    def absmax(self) -> np.ndarray:
        """Largest magnitude of each channel, float64."""
        data = np.abs(np.moveaxis(self.data().astype(np.float64), self.axis, 0))
        return data.reshape(data.shape[0], -1).max(axis=1) if data.size else np.zeros(0)

    def rescale(self, factors: np.ndarray) -> None:
        """Multiply channel ``c`` by ``factors[c]`` (computed in float64)."""
        data = self.data()
        shape = [1] * data.ndim
        shape[self.axis] = -1
        store(self.value, data.astype(np.float64) * np.asarray(factors).reshape(shape))


@dataclasses.dataclass(frozen=True)
class LinearWeight:
    """The constant 2-D weight of a MatMul or Gemm and where its channels are."""

    value: ir.Value
    in_axis: int
    out_axis: int

    @property
    def inputs(self) -> Channels:
        """The weight's slices per input channel (rows of ``[K, N]``)."""
        return Channels(self.value, self.in_axis)

    @property
    def outputs(self) -> Channels:
        """The weight's slices per output channel (columns of ``[K, N]``)."""
        return Channels(self.value, self.out_axis)


def linear_weight(node: ir.Node) -> LinearWeight | None:
    """The constant 2-D weight (input 1) of a MatMul, or of a Gemm with ``transA=0``."""
    if not is_onnx(node, "MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    data = constant(weight)
    if weight is None or data is None or data.ndim != 2:
        return None
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0) != 0:
            return None
        if node.attributes.get_int("transB", 0) != 0:
            return LinearWeight(weight, 1, 0)
    return LinearWeight(weight, 0, 1)


def conv_weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """The constant weight of a Conv that is ordinary (group 1) or depthwise (one input channel
    per group, one group per output channel), and whether it is depthwise."""
    if not is_onnx(node, "Conv") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    data = constant(weight)
    if weight is None or data is None or data.ndim < 3:
        return None
    group = node.attributes.get_int("group", 1)
    if group == 1:
        return weight, False
    if group == data.shape[0] and data.shape[1] == 1:
        return weight, True
    return None
