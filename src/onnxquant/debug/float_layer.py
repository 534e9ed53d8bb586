"""One quantized layer left out of quantization, as an edit of the quantized model's protobuf.

What changes is what ``--exclude-nodes`` would change: the layer's weights become float, and
so do its inputs unless a quantized layer writes them (the writer's output stays quantized, for
its other readers and for onnxruntime's fusions — as onnxquant's and onnxruntime's quantizers
leave it when a reader is excluded).

The edit is worked out once from the analysed graph (:class:`LayerEdit`) and applied to a copy
of the serialized model, so measuring the sensitivity of many layers costs one protobuf copy
each instead of a deserialized model (a third of a second on a 5 MB detector).

- QDQ: each such input the layer reads through a DequantizeLinear reads its float source
  instead — a weight its float original, an activation the tensor before its
  QuantizeLinear (clipped to the grid's range when the quantizer folded a Relu/Clip or
  BatchNormalization into it: its metadata says so; for other tools, a grid that starts at
  zero). Its output keeps its QuantizeLinear: that is the next layer's input quantization.
- QOperator: the integer op becomes DequantizeLinear → float op (float weights and bias) →
  QuantizeLinear on the same output grid, writing the same output name.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from onnxquant.core.graph import STANDS_FOR
from onnxquant.debug._params import constant_array
from onnxquant.debug.matching import Matching, WeightMatch
from onnxquant.debug.quantized_graph import INTEGER_OPS, MS

__all__ = ["LayerEdit", "float_layer_edit", "apply_edit", "apply_edits", "FLOAT_FORMS"]

# Integer op -> (float op, attributes to drop).
FLOAT_FORMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "QLinearConv": ("Conv", ()),
    "QLinearMatMul": ("MatMul", ()),
    "QGemm": ("Gemm", ()),
    "QLinearAdd": ("Add", ()),
    "QLinearMul": ("Mul", ()),
    "QLinearAveragePool": ("AveragePool", ("channels_last",)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", ("channels_last",)),
    "QLinearSigmoid": ("Sigmoid", ()),
    "QLinearLeakyRelu": ("LeakyRelu", ()),
    "QLinearSoftmax": ("Softmax", ("opset",)),
}
_BIAS_SLOTS = {"QLinearConv": 8, "QGemm": 6}


@dataclasses.dataclass
class LayerEdit:
    """What to change in the protobuf to run node ``node`` in float.

    Attributes:
        node: The node's name.
        inputs: Input slot -> the tensor to read instead (QDQ).
        initializers: Float weights to add.
        nodes: Nodes to add.
        remove: Remove the node (its outputs are written by the added nodes).
    """

    node: str
    inputs: dict[int, str] = dataclasses.field(default_factory=dict)
    initializers: list[onnx.TensorProto] = dataclasses.field(default_factory=list)
    nodes: list[onnx.NodeProto] = dataclasses.field(default_factory=list)
    remove: bool = False

    def name(self, stem: str) -> str:
        """A tensor/node name private to this edit."""
        return f"{self.node}__oq_float_{len(self.initializers) + len(self.nodes)}_{stem}"

    def weight(self, match: WeightMatch, shape: tuple[int, ...]) -> str:
        """Add ``match``'s float original, in the quantized layout ``shape``; its name."""
        data = match.original.T if match.transposed else match.original
        name = self.name("weight")
        array = np.ascontiguousarray(data.reshape(shape)).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def constant(self, stem: str, value: float) -> str:
        """Add a float32 scalar initializer; its name."""
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node_proto(self, op_type: str, inputs: list[str], output: str | None = None) -> str:
        """Add a node; returns its output name (``output`` or a private one)."""
        out = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type)))
        return out


def float_layer_edit(model: ir.Model, matching: Matching, node_name: str
                     ) -> LayerEdit | None:
    """The edit that runs ``node_name`` in float (None: nothing to change, or a form this
    does not handle)."""
    node = next((n for n in model.graph if n.name == node_name), None)
    if node is None:
        return None
    weights = {m.weight.stored: m for m in matching.weights.values()}
    recorded = model.metadata_props.get(STANDS_FOR)
    aliases = json.loads(recorded) if recorded is not None else None
    edit = LayerEdit(node_name)
    if node.op_type in FLOAT_FORMS and (node.domain == MS or node.op_type.startswith("QLinear")):
        return edit if _integer_to_float(node, weights, edit) else None
    quantized = _quantized_producers(model)
    for slot, value in enumerate(node.inputs):
        dq = value.producer() if value is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            replacement = _float_source(dq, weights, edit, aliases, quantized)
            if replacement is not None:
                edit.inputs[slot] = replacement
    return edit if edit.inputs else None


def _quantized_producers(model: ir.Model) -> set[int]:
    """Ids of the nodes that compute on quantized values (read a DequantizeLinear output or
    are integer ops): their outputs stay quantized when a reader is left out of quantization."""
    found = set()
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type in INTEGER_OPS or any(
                v is not None and (p := v.producer()) is not None
                and p.op_type == "DequantizeLinear" for v in node.inputs):
            found.add(id(node))
    return found


def _float_source(dq: ir.Node, weights: dict[str, WeightMatch], edit: LayerEdit,
                  aliases: dict[str, str] | None, quantized: set[int]) -> str | None:
    """The float tensor to read instead of a DequantizeLinear's output (None: keep it — an
    activation a quantized layer writes stays quantized, as when the reader is excluded)."""
    q = dq.inputs[0]
    if q is None:
        return None
    data = constant_array(q)
    if data is not None:
        match = weights.get(q.name or "")
        if match is None or match.dequantized.size != data.size:
            return None
        return edit.weight(match, data.shape)
    quantize = q.producer()
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.inputs[0] is None:
        return None
    producer = quantize.inputs[0].producer()
    if producer is not None and id(producer) in quantized:
        return None
    pre = quantize.inputs[0].name or ""
    zero = constant_array(quantize.inputs[2]) if len(quantize.inputs) > 2 else None
    scale = constant_array(quantize.inputs[1])
    if aliases is not None:  # onnxquant recorded every tensor whose grid took over a Relu/Clip
        fused = pre in aliases
    else:  # other tools: a grid starting at 0 is the sign of a folded Relu/Clip
        fused = zero is not None and zero.dtype.kind == "u" and bool(np.all(zero == 0))
    if not fused or scale is None or zero is None or scale.size != 1:
        return pre
    # The quantizer folded a Relu/Clip into this grid (it says so in its metadata, or the grid
    # starts at 0): the float layer reads the tensor clipped to the grid's range, as the
    # removed Relu/Clip did.
    info = np.iinfo(zero.dtype)
    low = float((info.min - int(zero.reshape(-1)[0])) * float(scale.reshape(-1)[0]))
    high = float((info.max - int(zero.reshape(-1)[0])) * float(scale.reshape(-1)[0]))
    floor = edit.node_proto("Max", [pre, edit.constant("low", low)])
    return edit.node_proto("Min", [floor, edit.constant("high", high)])


def _integer_to_float(node: ir.Node, weights: dict[str, WeightMatch], edit: LayerEdit) -> bool:
    float_op, dropped = FLOAT_FORMS[node.op_type]
    triples, out_slots = INTEGER_OPS[node.op_type]
    inputs = [_operand(node, (d, s, z), weights, edit) for d, s, z, _ in triples]
    bias_slot = _BIAS_SLOTS.get(node.op_type)
    if bias_slot is not None and len(node.inputs) > bias_slot and node.inputs[bias_slot]:
        inputs.append(_float_bias(node, bias_slot, weights, edit))
    if any(name is None for name in inputs):
        return False
    attrs = {k: ir.serde.serialize_attribute(a) for k, a in node.attributes.items()
             if k not in dropped}
    output = node.outputs[0].name or ""
    quantized = out_slots is not None and len(node.inputs) > out_slots[1]
    result = edit.node_proto(float_op, inputs, None if quantized else output)  # type: ignore[arg-type]
    edit.nodes[-1].attribute.extend(attrs.values())
    if quantized:
        scale, zero = node.inputs[out_slots[0]], node.inputs[out_slots[1]]  # type: ignore[index]
        edit.node_proto("QuantizeLinear", [result, scale.name or "", zero.name or ""],  # type: ignore[union-attr]
                        output)
    edit.remove = True
    return True


def _operand(node: ir.Node, slots: tuple[int, int, int], weights: dict[str, WeightMatch],
             edit: LayerEdit) -> str | None:
    data_i, scale_i, zp_i = slots
    data = node.inputs[data_i]
    if data is None:
        return None
    array = constant_array(data)
    match = weights.get(data.name or "")
    if array is not None and match is not None:
        return edit.weight(match, array.shape)
    scale, zero = node.inputs[scale_i], node.inputs[zp_i]
    return edit.node_proto("DequantizeLinear", [data.name or "", scale.name or "",  # type: ignore[union-attr]
                                                zero.name or ""])  # type: ignore[union-attr]


def _float_bias(node: ir.Node, slot: int, weights: dict[str, WeightMatch],
                edit: LayerEdit) -> str | None:
    bias = node.inputs[slot]
    match = weights.get(bias.name or "") if bias is not None else None
    if match is not None:
        return edit.weight(match, match.original.shape)
    data = constant_array(bias)
    scale_x, scale_w = constant_array(node.inputs[1]), constant_array(node.inputs[4])
    if data is None or scale_x is None or scale_w is None:
        return None
    real = data.astype(np.float64) * scale_x.astype(np.float64) * scale_w.astype(np.float64)
    name = edit.name("bias")
    edit.initializers.append(numpy_helper.from_array(real.astype(np.float32), name))
    return name


def apply_edits(proto: onnx.ModelProto, edits: list[LayerEdit]) -> onnx.ModelProto:
    """A copy of ``proto`` with ``edits`` applied (each to a different node)."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    graph = result.graph
    nodes = list(graph.node)
    by_name = {edit.node: edit for edit in edits}
    edited: list[onnx.NodeProto] = []
    for node in nodes:
        edit = by_name.get(node.name)
        if edit is None:
            edited.append(node)
            continue
        for slot, name in edit.inputs.items():
            node.input[slot] = name
        # The new nodes go right before the node (its inputs are defined above it), in order.
        edited += [*edit.nodes] if edit.remove else [*edit.nodes, node]
        graph.initializer.extend(edit.initializers)
    del graph.node[:]
    graph.node.extend(edited)
    return result


def apply_edit(proto: onnx.ModelProto, edit: LayerEdit) -> onnx.ModelProto:
    """A copy of ``proto`` with ``edit`` applied."""
    return apply_edits(proto, [edit])
