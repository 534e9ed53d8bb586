"""Model variants the comparison runs: the quantized model with its quantized tensors exposed,
and cut at every quantized activation (each layer fed the float model's values). One layer
back in float is :mod:`onnxquant.debug.float_layer`.

Every function takes a private copy of the quantized model (see :func:`copy_model`) and
finds values by name, so one :class:`~onnxquant.debug.matching.Matching` serves all variants.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.core.names import UniqueNames
from onnxquant.debug.matching import ActivationMatch, Matching
from onnxquant.debug.quantized_graph import INTEGER_OPS

__all__ = ["copy_model", "expose", "cut_at_activations", "CUT_SUFFIX"]

CUT_SUFFIX = "__float"
"""Graph inputs of the cut model are named ``<float tensor><CUT_SUFFIX>``."""

def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy (the protobuf round trip onnx_ir offers)."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _values(model: ir.Model) -> dict[str, ir.Value]:
    graph = model.graph
    found: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    found.update(graph.initializers)
    for node in graph:
        found.update({v.name: v for v in node.outputs if v.name})
    return found


def expose(model: ir.Model, names: list[str]) -> list[str]:
    """Make the named main-graph tensors model outputs (in place); returns those exposed."""
    values = _values(model)
    present = {id(v) for v in model.graph.outputs}
    exposed = []
    for name in names:
        value = values.get(name)
        if value is None or value.is_graph_input() or value.const_value is not None:
            continue
        if id(value) not in present:
            model.graph.outputs.append(value)
            present.add(id(value))
        exposed.append(name)
    return exposed


def _quantizer_inputs(values: dict[str, ir.Value], match: ActivationMatch
                      ) -> list[ir.Value | None] | None:
    """Scale and zero-point values of a quantized activation's grid, as the node that wrote
    it has them."""
    value = values.get(match.tensor.value.name or "")
    producer = value.producer() if value is not None else None
    if producer is None:
        return None
    if producer.op_type == "QuantizeLinear":
        return list(producer.inputs[1:3])
    if producer.op_type == "QLinearConcat":
        return list(producer.inputs[0:2])
    slots = INTEGER_OPS.get(producer.op_type, (None, None))[1]
    if slots is None or len(producer.inputs) <= slots[1]:
        return None
    return [producer.inputs[slots[0]], producer.inputs[slots[1]]]


def cut_at_activations(model: ir.Model, matching: Matching) -> dict[str, str]:
    """Feed every quantized activation from a new float graph input (in place).

    Each reader of a quantized activation reads instead ``QuantizeLinear(<float input>)``
    with the same parameters, so every layer sees the float model's values quantized once.
    Returns ``{graph input name: float tensor name}``.
    """
    values = _values(model)
    names = UniqueNames(model)
    inputs: dict[str, str] = {}
    for key, match in matching.activations.items():
        if match.tensor.moved:
            continue
        value = values.get(match.tensor.value.name or "")
        params = _quantizer_inputs(values, match)
        if value is None or params is None or params[0] is None:
            continue
        readers = list(value.uses())
        if not readers:
            continue
        dtype = params[0].dtype or ir.DataType.FLOAT
        source = ir.Value(name=names.new(f"{key}{CUT_SUFFIX}"), type=ir.TensorType(dtype))
        model.graph.inputs.append(source)
        axis = match.params.axis
        attrs: dict[str, int] | None = {"axis": axis} if axis is not None else None
        if match.params.block_size and axis is not None:
            attrs = {"axis": axis, "block_size": match.params.block_size}
        quantize = ir.node("QuantizeLinear", [source, *params], attributes=attrs,
                           name=names.new(f"{key}_cut_QuantizeLinear"))
        quantize.outputs[0].name = names.new(f"{key}_cut_q")
        model.graph.append(quantize)
        for node, slot in readers:
            node.replace_input_with(slot, quantize.outputs[0])
        inputs[source.name or ""] = key
    _cut_dynamic(model, matching, names, inputs)
    model.graph.sort()
    return inputs


def _cut_dynamic(model: ir.Model, matching: Matching, names: UniqueNames,
                 inputs: dict[str, str]) -> None:
    """DynamicQuantizeLinear nodes read new float graph inputs (dynamic quantization)."""
    values = _values(model)
    for tensor, key in matching.dynamic_inputs.items():
        value = values.get(tensor)
        readers = [(n, i) for n, i in value.uses() if n.op_type == "DynamicQuantizeLinear"] \
            if value is not None else []
        if not readers:
            continue
        source = ir.Value(name=names.new(f"{key}{CUT_SUFFIX}"), type=ir.TensorType(
            value.dtype or ir.DataType.FLOAT))  # type: ignore[union-attr]
        model.graph.inputs.append(source)
        for node, slot in readers:
            node.replace_input_with(slot, source)
        inputs[source.name or ""] = key
