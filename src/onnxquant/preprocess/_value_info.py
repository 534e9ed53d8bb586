"""Moving inferred types and shapes from a protobuf back onto an ``onnx_ir`` model.

Both shape-inference passes run a tool on a protobuf copy of the model's structure (large
weights detached) and bring the result back by value name: a value without a shape gets the
inferred one, a value whose shape has anonymous dimensions of the same rank gets them filled,
and a value with a complete shape keeps it (declared shapes are the exporter's, and inputs are
the model's contract with its callers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx
import onnx_ir as ir

from onnxquant.core import model_io

__all__ = ["structure_for_inference", "proto_value_infos", "apply_value_infos", "node_values",
           "is_anonymous"]


def structure_for_inference(model: ir.Model) -> onnx.ModelProto:
    """The model as a protobuf for a shape-inference tool, at any model size: main-graph
    initializers whose data is not in the protobuf (above 1 KB, or external) become graph
    inputs of the same type and shape, so that no tool tries to read data that is not there
    (shape tensors are small and stay initializers)."""
    proto = model_io.structure_proto(model)
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    for index in reversed(range(len(graph.initializer))):
        tensor = graph.initializer[index]
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
        del graph.initializer[index]
    return proto


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield sub
                    yield from _subgraphs(sub)


def proto_value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """Every ``value_info`` and graph output of ``graph`` and its subgraphs, by name."""
    infos: dict[str, onnx.ValueInfoProto] = {}
    for g in (graph, *_subgraphs(graph)):
        for info in (*g.value_info, *g.output):
            if info.type.WhichOneof("value") is not None:
                infos.setdefault(info.name, info)
    return infos


def node_values(model: ir.Model) -> list[ir.Value]:
    """The outputs of every node of ``model`` (subgraphs too): the values inference can fill."""
    return [value for node in ir.traversal.RecursiveGraphIterator(model.graph)
            for value in node.outputs if value.name]


def is_anonymous(dim: object) -> bool:
    """A dimension that names nothing: ``None`` or a generated ``unk__N`` symbol."""
    if isinstance(dim, int):
        return False
    value = getattr(dim, "value", dim)
    return value is None or (isinstance(value, str) and value.startswith("unk__"))


def _better(old: ir.Shape | None, new: ir.Shape | None) -> ir.Shape | None:
    """``new`` where it says more than ``old`` (same rank), else None."""
    if new is None:
        return None
    if old is None:
        return new
    if len(old) != len(new):
        return None
    dims = [n if is_anonymous(o) and not is_anonymous(n) else o
            for o, n in zip(old, new, strict=True)]
    if all(d is o for d, o in zip(dims, old, strict=True)):
        return None
    return ir.Shape(dims)


def apply_value_infos(values: Iterable[ir.Value], infos: dict[str, onnx.ValueInfoProto],
                      skip: frozenset[str] = frozenset()) -> int:
    """Fill in types and shapes of ``values`` from ``infos``; returns how many values gained
    information. Names in ``skip`` are left alone (e.g. a node inference failed on)."""
    changed = 0
    for value in values:
        info = infos.get(value.name or "")
        if info is None or value.name in skip:
            continue
        try:
            new_type = ir.serde.deserialize_type_proto_for_type(info.type)
            new_shape = ir.serde.deserialize_type_proto_for_shape(info.type)
        except Exception:  # noqa: BLE001 - a malformed inferred type is simply not used
            continue
        gained = False
        if value.type is None and new_type is not None and \
                getattr(new_type, "dtype", None) != ir.DataType.UNDEFINED:
            value.type = new_type
            gained = True
        if value.type is not None and new_type is not None and \
                type(value.type) is type(new_type):
            shape = _better(value.shape, new_shape)
            if shape is not None:
                value.shape = shape
                gained = True
        changed += gained
    return changed
