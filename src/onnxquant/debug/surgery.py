"""Model variants the comparison runs: the quantized model with its quantized tensors exposed,
cut at every quantized activation (each layer fed the float model's values), and with one
layer back in float.

Every function takes a private copy of the quantized model (see :func:`copy_model`) and
finds values by name, so one :class:`~onnxquant.debug.matching.Matching` serves all variants.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxquant.core.graph import add_initializer
from onnxquant.core.names import UniqueNames
from onnxquant.debug._params import constant_array
from onnxquant.debug.matching import ActivationMatch, Matching, WeightMatch
from onnxquant.debug.quantized_graph import INTEGER_OPS, MS

__all__ = ["copy_model", "expose", "cut_at_activations", "keep_layer_float", "FLOAT_FORMS",
           "CUT_SUFFIX"]

CUT_SUFFIX = "__float"
"""Graph inputs of the cut model are named ``<float tensor><CUT_SUFFIX>``."""

# Integer op -> (float op, domain, attributes to drop).
FLOAT_FORMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "QLinearConv": ("Conv", "", ()),
    "QLinearMatMul": ("MatMul", "", ()),
    "QGemm": ("Gemm", "", ()),
    "QLinearAdd": ("Add", "", ()),
    "QLinearMul": ("Mul", "", ()),
    "QLinearAveragePool": ("AveragePool", "", ("channels_last",)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", "", ("channels_last",)),
    "QLinearSigmoid": ("Sigmoid", "", ()),
    "QLinearLeakyRelu": ("LeakyRelu", "", ()),
    "QLinearSoftmax": ("Softmax", "", ("opset",)),
}


def copy_model(model: ir.Model | onnx.ModelProto) -> ir.Model:
    """A deep copy (the protobuf round trip onnx_ir offers); pass a serialized
    ``ModelProto`` to make many copies of one model at half the cost."""
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
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


def keep_layer_float(model: ir.Model, matching: Matching, node_name: str) -> bool:
    """Run one quantized layer in float (in place); False when its form is not supported.

    QDQ: its dequantized weights become their float originals and its dequantized activations
    the tensors before their QuantizeLinear. QOperator: the integer op becomes its float op
    between DequantizeLinear and QuantizeLinear, with float weights.
    """
    node = next((n for n in model.graph if n.name == node_name), None)
    if node is None:
        return False
    weights = {m.weight.stored: m for m in matching.weights.values()}
    names = UniqueNames(model)
    if node.op_type in FLOAT_FORMS and (node.domain == MS or node.op_type.startswith("QLinear")):
        return _integer_to_float(model, node, weights, names)
    changed = False
    for slot, value in enumerate(node.inputs):
        dq = value.producer() if value is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        replacement = _float_source(model, dq, weights, names)
        if replacement is not None:
            node.replace_input_with(slot, replacement)
            changed = True
    model.graph.sort()
    return changed


def _float_weight(model: ir.Model, match: WeightMatch, shape: tuple[int, ...],
                  names: UniqueNames) -> ir.Value:
    data = match.original.T if match.transposed else match.original
    return add_initializer(model.graph, names.new(f"{match.name}_float"),
                           np.ascontiguousarray(data.reshape(shape)).astype(np.float32))


def _float_source(model: ir.Model, dq: ir.Node, weights: dict[str, WeightMatch],
                  names: UniqueNames) -> ir.Value | None:
    """The float value to read instead of a DequantizeLinear's output (None: keep it)."""
    q = dq.inputs[0]
    if q is None:
        return None
    data = constant_array(q)
    if data is not None:
        match = weights.get(q.name or "")
        if match is None or match.dequantized.size != data.size:
            return None
        return _float_weight(model, match, data.shape, names)
    quantize = q.producer()
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.inputs[0] is None:
        return None
    pre = quantize.inputs[0]
    zero = constant_array(quantize.inputs[2]) if len(quantize.inputs) > 2 else None
    if zero is not None and zero.dtype.kind == "u" and np.all(zero == 0):
        # The grid starts at 0: a Relu the quantizer fused (or a non-negative tensor).
        relu = ir.node("Relu", [pre], name=names.new(f"{pre.name}_float_relu"))
        relu.outputs[0].name = names.new(f"{pre.name}_float_relu")
        model.graph.append(relu)
        return relu.outputs[0]
    return pre


def _integer_to_float(model: ir.Model, node: ir.Node, weights: dict[str, WeightMatch],
                      names: UniqueNames) -> bool:
    float_op, domain, dropped = FLOAT_FORMS[node.op_type]
    triples, out_slots = INTEGER_OPS[node.op_type]
    inputs: list[ir.Value | None] = []
    for data_i, scale_i, zp_i, _ in triples:
        inputs.append(_dequantized_operand(model, node, (data_i, scale_i, zp_i), weights, names))
    if node.op_type == "QLinearConv" and len(node.inputs) > 8 and node.inputs[8] is not None:
        inputs.append(_float_bias(model, node, weights, names))
    if node.op_type == "QGemm" and len(node.inputs) > 6 and node.inputs[6] is not None:
        inputs.append(_float_bias(model, node, weights, names))
    if any(v is None for v in inputs):
        return False
    attrs = {k: v for k, v in node.attributes.items() if k not in dropped}
    new = ir.node(float_op, inputs, attributes=attrs, domain=domain,
                  name=names.new(f"{node.name}_float"))
    model.graph.append(new)
    out = new.outputs[0]
    out.name = names.new(f"{node.name}_float_out")
    result = out
    if out_slots is not None and len(node.inputs) > out_slots[1]:
        q = ir.node("QuantizeLinear", [out, node.inputs[out_slots[0]], node.inputs[out_slots[1]]],
                    name=names.new(f"{node.name}_float_QuantizeLinear"))
        q.outputs[0].name = names.new(f"{node.name}_float_q")
        model.graph.append(q)
        result = q.outputs[0]
    node.outputs[0].replace_all_uses_with(result, replace_graph_outputs=True)
    model.graph.remove(node, safe=True)
    model.graph.sort()
    return True


def _dequantized_operand(model: ir.Model, node: ir.Node, slots: tuple[int, int, int],
                         weights: dict[str, WeightMatch], names: UniqueNames) -> ir.Value | None:
    data_i, scale_i, zp_i = slots
    data = node.inputs[data_i]
    if data is None:
        return None
    array = constant_array(data)
    match = weights.get(data.name or "")
    if array is not None and match is not None:
        return _float_weight(model, match, array.shape, names)
    dq = ir.node("DequantizeLinear", [data, node.inputs[scale_i], node.inputs[zp_i]],
                 name=names.new(f"{data.name}_float_DequantizeLinear"))
    dq.outputs[0].name = names.new(f"{data.name}_float_dq")
    model.graph.append(dq)
    return dq.outputs[0]


def _float_bias(model: ir.Model, node: ir.Node, weights: dict[str, WeightMatch],
                names: UniqueNames) -> ir.Value | None:
    index = 8 if node.op_type == "QLinearConv" else 6
    bias = node.inputs[index]
    match = weights.get(bias.name or "") if bias is not None else None
    if match is not None:
        return _float_weight(model, match, match.original.shape, names)
    data = constant_array(bias)
    scale_x, scale_w = constant_array(node.inputs[1]), constant_array(node.inputs[4])
    if data is None or scale_x is None or scale_w is None:
        return None
    real = data.astype(np.float64) * scale_x.astype(np.float64) * scale_w.astype(np.float64)
    return add_initializer(model.graph, names.new(f"{bias.name}_float"),  # type: ignore[union-attr]
                           real.astype(np.float32))
