"""What a quantized graph quantized: its integer tensors with their parameters, its quantized
weights dequantized, and its compute layers — read from the graph's structure, whatever tool
made it (onnxquant, onnxruntime, others), in QDQ or QOperator form.

Only the main graph is analysed: tensors inside If/Loop/Scan bodies are not reported.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from onnxquant.debug._params import QuantParams, constant_array
from onnxquant.weight_only.packing import unpack_bits

__all__ = ["QuantizedTensor", "QuantizedWeight", "Layer", "QuantizedGraph"]

MS = "com.microsoft"
_DEFAULT = ("", "ai.onnx")
_Q_OPS = ("QuantizeLinear",)
_DQ_OPS = ("DequantizeLinear",)

# Integer operators: (data, scale, zero point, slot of the same operand in the float op) per
# quantized operand, and the (scale, zero point) inputs of the quantized output.
_TRIPLES_01 = [(0, 1, 2, 0), (3, 4, 5, 1)]
INTEGER_OPS: dict[str, tuple[list[tuple[int, int, int, int]], tuple[int, int] | None]] = {
    "QLinearConv": (_TRIPLES_01, (6, 7)),
    "QLinearMatMul": (_TRIPLES_01, (6, 7)),
    "QGemm": (_TRIPLES_01, (7, 8)),
    "QLinearAdd": (_TRIPLES_01, (6, 7)),
    "QLinearMul": (_TRIPLES_01, (6, 7)),
    "QLinearAveragePool": ([(0, 1, 2, 0)], (3, 4)),
    "QLinearGlobalAveragePool": ([(0, 1, 2, 0)], (3, 4)),
    "QLinearSigmoid": ([(0, 1, 2, 0)], (3, 4)),
    "QLinearLeakyRelu": ([(0, 1, 2, 0)], (3, 4)),
    "QLinearSoftmax": ([(0, 1, 2, 0)], (3, 4)),
    "QLinearWhere": ([(1, 2, 3, 1), (4, 5, 6, 2)], (7, 8)),
    "DynamicQuantizeMatMul": ([(1, 2, 3, 1)], None),
    "MatMulIntegerToFloat": ([(1, 3, 5, 1)], None),
}
_BIASES = {"QLinearConv": (8, 1, 4, 2), "QGemm": (6, 1, 4, 2)}  # int32 data, scales, float slot
_OTHER_INTEGER = {"MatMulNBits", "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM",
                  "QAttention", "QEmbedLayerNormalization", "GatherBlockQuantized",
                  "QLinearConcat", "DynamicQuantizeLinear"}
MOVEMENT = {"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Split",
            "Slice", "Gather", "Resize", "Pad", "Identity", "DepthToSpace", "SpaceToDepth",
            "Expand", "Tile", "GatherElements", "GatherND"}
_WEIGHT_CHAIN = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
_NODE_SUFFIX = re.compile(
    r"(_quant|_Q\d+|_MatMulNBits|_quantized|(_int32)?_(MatMulInteger|ConvInteger))$")


@dataclasses.dataclass
class QuantizedTensor:
    """An integer activation tensor: ``value`` holds ``params.dequantize`` of a float tensor.

    Attributes:
        value: The integer tensor in the quantized graph.
        params: Its scale and zero point.
        pre: The float tensor a QuantizeLinear made it from (None when an integer op wrote it).
        posts: Float tensors that DequantizeLinear nodes make of it.
        moved: A data-movement op (Reshape, MaxPool, ...) wrote it from another one.
    """

    value: ir.Value
    params: QuantParams
    pre: ir.Value | None = None
    posts: list[ir.Value] = dataclasses.field(default_factory=list)
    moved: bool = False


@dataclasses.dataclass
class QuantizedWeight:
    """A constant stored quantized, dequantized.

    Attributes:
        stored: Name of the initializer that holds the integer data.
        dequantized: ``(q − zp) · scale`` in float64, in the layout its reader sees.
        params: Its parameters (None for packed forms such as MatMulNBits).
        scheme: Human description (``int8 per axis 0``).
        reader: The node that reads it, and the slot of the same operand in the float op.
        dq_output: The DequantizeLinear output that carries it (QDQ form).
    """

    stored: str
    dequantized: np.ndarray
    params: QuantParams | None
    scheme: str
    reader: tuple[ir.Node, int] | None
    dq_output: ir.Value | None = None


@dataclasses.dataclass
class Layer:
    """A compute node that runs on quantized inputs or weights (or is an integer op).

    Attributes:
        node: The node in the quantized graph.
        output: Its first output.
    """

    node: ir.Node
    output: ir.Value

    @property
    def name(self) -> str:
        return base_node_name(self.node)


def base_node_name(node: ir.Node) -> str:
    """The node's name without the suffixes quantizers append (``conv1_quant`` → ``conv1``)."""
    return _NODE_SUFFIX.sub("", node.name or "")


def _attr_int(node: ir.Node, name: str, default: int | None) -> int | None:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _table_axis(node: ir.Node, axis: int, rank: int) -> int | None:
    """The axis of a table (``node``'s input 0, of ``rank``) that its output's per-axis
    parameters on ``axis`` apply to (None when no table axis corresponds)."""
    if node.op_type in ("Slice", "Identity"):
        return axis % rank if -rank <= axis < rank else None
    if node.op_type != "Gather":
        return None
    gathered = (_attr_int(node, "axis", 0) or 0) % rank
    if axis < 0:  # counted from the end: the table's trailing axes are the output's
        return rank + axis if rank + axis > gathered else None
    if axis < gathered:
        return axis
    indices = node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1] else None
    if indices is None or axis < gathered + len(indices):
        return None
    return axis - len(indices) + 1


def _zp_dtype(node: ir.Node, scale_i: int, zp_i: int) -> np.dtype:
    zp = node.inputs[zp_i] if len(node.inputs) > zp_i else None
    z = constant_array(zp)
    if z is not None:
        return z.dtype
    out = node.outputs[0] if node.op_type in _Q_OPS else None
    if out is not None and out.dtype is not None:
        return np.dtype(out.dtype.numpy())
    return np.dtype(np.uint8)


def _channel_axis(node: ir.Node, ndim: int) -> int:
    """The output-channel axis of an integer op's weight (QGemm with transB is [N, K])."""
    if node.op_type == "QLinearConv" or (node.op_type == "QGemm" and _attr_int(node, "transB", 0)):
        return 0
    return ndim - 1


def _params(node: ir.Node, scale_i: int, zp_i: int, *, with_axis: bool = False
            ) -> QuantParams | None:
    inputs = node.inputs
    scale = inputs[scale_i] if len(inputs) > scale_i else None
    zp = inputs[zp_i] if len(inputs) > zp_i else None
    axis = _attr_int(node, "axis", 1) if with_axis else None
    block = _attr_int(node, "block_size", 0) if with_axis else None
    return QuantParams.from_inputs(scale, zp, _zp_dtype(node, scale_i, zp_i), axis=axis,
                                   block_size=block)


class QuantizedGraph:
    """The quantized tensors, weights and layers of a model's main graph."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.tensors: dict[ir.Value, QuantizedTensor] = {}
        self.weights: list[QuantizedWeight] = []
        self._scan()
        self.layers = self._layers()

    # -- tensors ------------------------------------------------------------------------------
    def _scan(self) -> None:
        tables: list[ir.Node] = []
        for node in self.graph:
            op = node.op_type
            if op in _Q_OPS:
                self._quantize_node(node)
            elif op in _DQ_OPS:
                self._dequantize_node(node)
            elif node.domain == MS and op in INTEGER_OPS or op in ("QLinearConv",
                                                                   "QLinearMatMul"):
                self._integer_node(node)
            elif op in MOVEMENT and node.inputs and node.inputs[0] in self.tensors:
                source = self.tensors[node.inputs[0]]  # type: ignore[index]
                for out in node.outputs:
                    self.tensors[out] = QuantizedTensor(out, source.params, moved=True)
            elif op in MOVEMENT and node.inputs and node.outputs:
                tables.append(node)
            elif op in ("MatMulInteger", "ConvInteger") and node.domain in _DEFAULT:
                self._integer_product(node)
            elif op == "MatMulNBits" and node.domain == MS:
                self._matmul_nbits(node)
            elif op == "QLinearConcat" and node.domain == MS:
                self._concat(node)
        for node in tables:
            self._table(node)

    def _table(self, node: ir.Node) -> None:
        """A data-movement op (Gather, Slice, ...) that reads an integer constant whose output
        is dequantized (QOperator Gather of a quantized embedding table): the constant is a
        quantized weight with its output's parameters (per tensor, or per axis where the axis
        is one of the table's)."""
        data = constant_array(node.inputs[0])
        entry = self.tensors.get(node.outputs[0])
        if data is None or entry is None or entry.params.block_size:
            return
        axis = entry.params.axis
        if axis is not None:
            axis = _table_axis(node, axis, data.ndim)
            if axis is None:
                return
        params = dataclasses.replace(entry.params, dtype=data.dtype, axis=axis)
        if not params.is_integer:
            return
        self.weights.append(QuantizedWeight(node.inputs[0].name or "",  # type: ignore[union-attr]
                                            params.dequantize(data), params, params.describe(),
                                            (node, 0)))

    def _quantize_node(self, node: ir.Node) -> None:
        x = node.inputs[0]
        params = _params(node, 1, 2, with_axis=True)
        if x is None or params is None or constant_array(x) is not None:
            return
        self.tensors[node.outputs[0]] = QuantizedTensor(node.outputs[0], params, pre=x)

    def _dequantize_node(self, node: ir.Node) -> None:
        q = node.inputs[0]
        params = _params(node, 1, 2, with_axis=True)
        if q is None or params is None:
            return
        data = constant_array(q)
        if data is not None:
            params.dtype = data.dtype
            reader = self._weight_reader(node.outputs[0])
            self.weights.append(QuantizedWeight(q.name or "", params.dequantize(data), params,
                                                params.describe(), reader, node.outputs[0]))
            return
        entry = self.tensors.get(q)
        if entry is None:
            entry = self.tensors[q] = QuantizedTensor(q, params)
        entry.posts.append(node.outputs[0])

    def _weight_reader(self, value: ir.Value) -> tuple[ir.Node, int] | None:
        """The first non-reshaping reader of ``value`` (through Transpose/Reshape chains)."""
        for _ in range(8):
            uses = list(value.uses())
            if not uses:
                return None
            node, slot = uses[0]
            if node.op_type not in _WEIGHT_CHAIN or slot != 0:
                return node, slot
            value = node.outputs[0]
        return None

    def _integer_node(self, node: ir.Node) -> None:
        triples, out_slots = INTEGER_OPS[node.op_type]
        for data_i, scale_i, zp_i, float_slot in triples:
            data = constant_array(node.inputs[data_i]) if len(node.inputs) > data_i else None
            params = _params(node, scale_i, zp_i) if data is not None else None
            if data is None or params is None:
                continue
            params.dtype = data.dtype
            if params.scale.ndim == 1 and params.scale.size > 1:  # per output channel
                params.axis = _channel_axis(node, data.ndim)
            self.weights.append(QuantizedWeight(
                node.inputs[data_i].name or "", params.dequantize(data),  # type: ignore[union-attr]
                params, params.describe(), (node, float_slot)))
        self._integer_bias(node)
        if out_slots is not None and len(node.inputs) > out_slots[1]:
            params = _params(node, *out_slots)
            if params is not None:
                self.tensors[node.outputs[0]] = QuantizedTensor(node.outputs[0], params)

    def _integer_bias(self, node: ir.Node) -> None:
        spec = _BIASES.get(node.op_type)
        if spec is None or len(node.inputs) <= spec[0]:
            return
        data_i, xs_i, ws_i, slot = spec
        data = constant_array(node.inputs[data_i])
        xs, ws = constant_array(node.inputs[xs_i]), constant_array(node.inputs[ws_i])
        if data is None or xs is None or ws is None:
            return
        scale = np.asarray(xs, np.float64) * np.asarray(ws, np.float64)
        params = QuantParams(scale.reshape(-1) if scale.size > 1 else scale.reshape(()),
                             np.zeros(1 if scale.size > 1 else (), np.int64), data.dtype,
                             0 if scale.size > 1 else None)
        self.weights.append(QuantizedWeight(node.inputs[data_i].name or "",  # type: ignore[union-attr]
                                            params.dequantize(data), params, "int32 bias",
                                            (node, slot)))

    def _integer_product(self, node: ir.Node) -> None:
        """MatMulInteger/ConvInteger of a dynamically quantized input and a constant weight:
        the weight's scale is the constant a Mul multiplies the input's run-time scale by."""
        data = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        source = node.inputs[0].producer() if node.inputs[0] is not None else None
        if data is None or source is None or source.op_type != "DynamicQuantizeLinear":
            return
        zp_value = node.inputs[3] if len(node.inputs) > 3 else None
        for user, _ in source.outputs[1].uses():
            others = [v for v in user.inputs if v is not source.outputs[1]]
            if user.op_type != "Mul" or len(others) != 1 or constant_array(others[0]) is None:
                continue
            params = QuantParams.from_inputs(others[0], zp_value, data.dtype)
            if params is None:
                return
            if params.scale.size > 1:
                params.axis = 0 if node.op_type == "ConvInteger" else data.ndim - 1
                params.scale = params.scale.reshape(-1)
                params.zero_point = np.broadcast_to(params.zero_point.reshape(-1),
                                                    params.scale.shape)
            self.weights.append(QuantizedWeight(node.inputs[1].name or "",  # type: ignore[union-attr]
                                                params.dequantize(data), params,
                                                params.describe(), (node, 1)))
            return

    def _concat(self, node: ir.Node) -> None:
        params = _params(node, 0, 1)
        if params is not None:
            self.tensors[node.outputs[0]] = QuantizedTensor(node.outputs[0], params)

    def _matmul_nbits(self, node: ir.Node) -> None:
        b = constant_array(node.inputs[1])
        scales = constant_array(node.inputs[2])
        zp_in = node.inputs[3] if len(node.inputs) > 3 else None
        zps = constant_array(zp_in)
        k, n = _attr_int(node, "K", 0) or 0, _attr_int(node, "N", 0) or 0
        bits, block = _attr_int(node, "bits", 4) or 4, _attr_int(node, "block_size", 32) or 32
        if b is None or scales is None or not k or not n:
            return
        blocks = -(-k // block)
        q = unpack_bits(b.reshape(n, blocks, -1), bits, block).reshape(n, blocks * block)
        s = np.asarray(scales, np.float64).reshape(n, blocks)
        if zps is None:
            z = np.full((n, blocks), 1 << (bits - 1), np.float64)
        elif zps.dtype == np.uint8:
            z = unpack_bits(zps.reshape(n, -1), bits, blocks).astype(np.float64)
        else:
            z = np.asarray(zps, np.float64).reshape(n, blocks)
        w = (q.astype(np.float64) - np.repeat(z, block, axis=1)) * np.repeat(s, block, axis=1)
        self.weights.append(QuantizedWeight(
            node.inputs[1].name or "", w[:, :k].T.copy(), None,  # type: ignore[union-attr]
            f"{bits}-bit blocks of {block} (MatMulNBits)", (node, 1)))

    # -- layers -------------------------------------------------------------------------------
    def _layers(self) -> list[Layer]:
        dequantized = {id(p) for t in self.tensors.values() for p in t.posts}
        dequantized |= {id(w.dq_output) for w in self.weights if w.dq_output is not None}
        layers = []
        for node in self.graph:
            if not node.outputs or node.op_type in _Q_OPS + _DQ_OPS:
                continue
            integer = (node.op_type in INTEGER_OPS or node.op_type in _OTHER_INTEGER) and \
                node.op_type != "DynamicQuantizeLinear"
            reads_dq = any(v is not None and id(self._through_chain(v)) in dequantized
                           for v in node.inputs)
            if integer or (reads_dq and node.op_type not in MOVEMENT):
                layers.append(Layer(node, node.outputs[0]))
        return layers

    @staticmethod
    def _through_chain(value: ir.Value) -> ir.Value:
        """The DequantizeLinear output behind Transpose/Reshape chains of a weight."""
        for _ in range(8):
            producer = value.producer()
            if producer is None or producer.op_type not in _WEIGHT_CHAIN or \
                    producer.inputs[0] is None:
                return value
            value = producer.inputs[0]
        return value

    def output_tensor(self, layer: Layer) -> QuantizedTensor | None:
        """The quantized form of the layer's output: the integer tensor it writes, or the one
        a QuantizeLinear makes of its float output (when that is its only quantizer)."""
        entry = self.tensors.get(layer.output)
        if entry is not None:
            return entry
        quantizers = [self.tensors[n.outputs[0]] for n, _ in layer.output.uses()
                      if n.op_type in _Q_OPS and n.outputs[0] in self.tensors]
        return quantizers[0] if len(quantizers) == 1 else None
