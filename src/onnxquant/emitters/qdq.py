"""The QDQ emitter: QuantizeLinear/DequantizeLinear pairs around float operators.

It only reads the plan. Activations get a Q→DQ pair in the graph that defines them (If/Loop/Scan
bodies included); weights are stored quantized behind a DequantizeLinear; biases are stored as
int32 with scale = input scale × weight scale. Float consumers of a tensor produced by a float
op keep reading the float tensor; when the producer itself is quantized every consumer — and
the graph output — reads the dequantized value, so onnxruntime can fuse the whole group into an
integer kernel.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxquant.core import numerics
from onnxquant.core.external_data import read_array
from onnxquant.core.float_scales import half_bias_scale
from onnxquant.core.graph import STANDS_FOR, add_initializer, iter_nodes, record_stands_for
from onnxquant.core.names import UniqueNames
from onnxquant.core.plan import BiasQuant, QuantPlan, TensorQuant
from onnxquant.emitters._float8_clips import clips_before_float8
from onnxquant.emitters._qdq_convert import emit_convert
from onnxquant.emitters._tensor_fields import typed_fields

__all__ = ["emit_qdq"]

MS_DOMAIN = "com.microsoft"

logger = logging.getLogger(__name__)


class _QDQEmitter:
    def __init__(self, model: ir.Model, plan: QuantPlan) -> None:
        self.model = model
        self.plan = plan
        self.names = UniqueNames(model)
        self.nodes = {n.name: n for n in iter_nodes(model)}
        self.values: dict[str, ir.Value] = {}
        for graph in (model.graph, *model.graph.subgraphs()):
            self.values.update({v.name: v for v in graph.inputs if v.name})
            self.values.update(graph.initializers)
            for node in graph:
                self.values.update({v.name: v for v in node.outputs if v.name})
        # Q/DQ in the com.microsoft domain (onnxruntime's contrib kernels: 16-bit and 4-bit
        # types before opset 21).
        self.domain = MS_DOMAIN if plan.settings.get("contrib_qdq_ops") else ""
        # One Q/DQ pair per reader instead of one shared by all (onnxruntime's
        # DedicatedQDQPair: some accelerators need a pair per consumer to fuse it).
        self.dedicated = bool(plan.settings.get("dedicated_qdq_pairs"))
        # Weights kept float behind a QuantizeLinear→DequantizeLinear pair (onnxruntime's
        # AddQDQPairToWeight: for tools that fold or train the weights afterwards).
        self.weight_qdq_pairs = bool(plan.settings.get("weight_qdq_pairs"))
        # Parameters emitted per (graph, tensor): an output that shares its input's grid
        # (Reshape, MaxPool, ...) reuses the input's scale/zero-point initializers.
        # Keyed (graph id, grid owner, name suffix): ``_convert`` for second grids.
        self.emitted_params: dict[tuple[int, str, str], list[ir.Value]] = {}
        self.readers: dict[str, list[tuple[ir.Node, int]]] = defaultdict(list)
        self.quantized_producers: set[str] = set()
        for decision in plan.quantized_nodes():
            node = self.nodes[decision.name]
            for index, tensor in decision.inputs.items():
                self.readers[tensor].append((node, index))
            self.quantized_producers.update(decision.outputs)

    # -- building blocks ---------------------------------------------------------------------
    def initializer(self, graph: ir.Graph, stem: str,
                    array: np.ndarray | ir.TensorProtocol) -> ir.Value:
        return add_initializer(graph, self.names.new(stem), array)

    def node(self, graph: ir.Graph, op: str, inputs: list[ir.Value], stem: str,
             axis: int | None, dtype: ir.DataType, suffix: str = "",
             block_size: int | None = None) -> ir.Value:
        """A Q or DQ node named as onnxruntime names them (``<tensor>_QuantizeLinear``, output
        ``<tensor>_QuantizeLinear_Output``), so tools that find them by name keep working."""
        attrs: dict[str, int] | None = {"axis": axis} if axis is not None else None
        if block_size is not None:
            attrs = {"axis": axis or 0, "block_size": block_size}
        node = ir.node(op, inputs, attributes=attrs,
                       name=self.names.new(f"{stem}_{op}{suffix}"), domain=self.domain)
        graph.append(node)
        out = node.outputs[0]
        out.name = self.names.new(f"{stem}_{op}_Output{suffix}")
        out.type = ir.TensorType(dtype)
        if inputs[0].shape is not None:
            out.shape = inputs[0].shape
        return out

    def params(self, graph: ir.Graph, tq: TensorQuant, suffix: str = "") -> list[ir.Value]:
        """``[scale, zero_point]`` initializers of ``tq`` (``<t>_scale<suffix>``, ...)."""
        key = (id(graph), self.grid_owner(tq), suffix)
        if key not in self.emitted_params:
            zero_point = self.initializer(graph, f"{key[1]}_zero_point{suffix}",
                                          typed_fields(tq.zero_point_array()))
            scale = self.initializer(graph, f"{key[1]}_scale{suffix}",
                                     typed_fields(self.scale_array(tq)))
            self.emitted_params[key] = [scale, zero_point]
        return self.emitted_params[key]

    def scale_array(self, tq: TensorQuant) -> np.ndarray:
        """``tq``'s scale in its tensor's float type: float16 for a float16 tensor (Q/DQ take
        the scale in the input's type, and DequantizeLinear outputs the scale's type)."""
        value = self.values.get(tq.name)
        half = value is not None and value.dtype == ir.DataType.FLOAT16
        return tq.scale_array().astype(np.float16) if half else tq.scale_array()

    def grid_owner(self, tq: TensorQuant) -> str:
        """The tensor whose grid ``tq`` shares (following ``shared:`` sources with identical
        parameters), or ``tq``'s own name."""
        seen = {tq.name}
        current = tq
        while current.source.startswith("shared:"):
            source = self.plan.tensors.get(current.source.removeprefix("shared:"))
            if source is None or source.name in seen or not source.same_params(tq):
                break
            seen.add(source.name)
            current = source
        return current.name

    # -- tensors -----------------------------------------------------------------------------
    def weight(self, value: ir.Value, tq: TensorQuant) -> None:
        readers = self.readers.get(tq.name, [])
        if not readers:
            return
        graph = value.graph
        assert graph is not None and value.const_value is not None
        params = self.params(graph, tq)
        if self.weight_qdq_pairs:  # float weight, quantized at run time
            stored = self.node(graph, "QuantizeLinear", [value, *params], tq.name, tq.axis,
                               tq.quant_type.onnx_dtype, block_size=tq.block_size)
        else:
            data = tq.quantize(read_array(value.const_value))
            stored = self.initializer(graph, f"{tq.name}_quantized", data)
        out = self.node(graph, "DequantizeLinear", [stored, *params], tq.name,
                        tq.axis, value.dtype or ir.DataType.FLOAT, block_size=tq.block_size)
        for node, index in readers:
            node.replace_input_with(index, out)

    def activation(self, value: ir.Value, tq: TensorQuant) -> None:
        producer = value.producer()
        graph = producer.graph if producer is not None else value.graph
        assert graph is not None
        quantized_producer = tq.name in self.quantized_producers
        readers = list(value.uses()) if quantized_producer else self.readers.get(tq.name, [])
        if value.dtype == ir.DataType.FLOAT16:
            # onnxruntime 1.32 fuses DequantizeLinear -> Concat -> QuantizeLinear into
            # QLinearConcat even with float16 scales, which it cannot run (the session fails):
            # a float16 Concat reads the float value instead.
            readers = [(n, i) for n, i in readers if n.op_type != "Concat"]
        outputs = [i for i, out in enumerate(graph.outputs) if out is value]
        if not readers and not (quantized_producer and outputs):
            return
        if tq.convert is not None:
            emit_convert(self, graph, value, tq, readers, outputs if quantized_producer else [])
            return
        if self.dedicated and len(readers) + bool(quantized_producer and outputs) > 1:
            for number, reader in enumerate(readers, start=1):
                self.qdq_pair(graph, value, tq, [reader], f"_{number}", [])
            if quantized_producer and outputs:
                self.qdq_pair(graph, value, tq, [], f"_{len(readers) + 1}", outputs)
            return
        self.qdq_pair(graph, value, tq, readers, "", outputs if quantized_producer else [])

    def qdq_pair(self, graph: ir.Graph, value: ir.Value, tq: TensorQuant,
                 readers: Sequence[tuple[ir.Node, int]], suffix: str,
                 outputs: list[int]) -> None:
        """One Q→DQ pair on ``value`` read by ``readers`` (and by the graph outputs at the
        positions ``outputs``; the DQ output then takes the graph output's name)."""
        scale, zero_point = self.params(graph, tq)
        q = self.node(graph, "QuantizeLinear", [value, scale, zero_point], tq.name, tq.axis,
                      tq.quant_type.onnx_dtype, suffix)
        dq = self.node(graph, "DequantizeLinear", [q, scale, zero_point], tq.name, tq.axis,
                       value.dtype or ir.DataType.FLOAT, suffix)
        for node, index in readers:
            if node is not q.producer():
                node.replace_input_with(index, dq)
        if outputs:
            original = value.name
            value.name = self.names.new(f"{original}_QuantizeLinear_Input")
            dq.name = original
            for i in outputs:
                graph.outputs[i] = dq

    def bias(self, node: ir.Node, bias: BiasQuant) -> None:
        value = node.inputs[bias.input]
        assert value is not None and value.const_value is not None and node.graph is not None
        graph = node.graph
        dtype = value.dtype or ir.DataType.FLOAT
        if bias.stored == "float":  # float8 weights: float bias read through a Cast
            stored = self.initializer(graph, f"{bias.tensor}_quantized", value.const_value)
            node.replace_input_with(bias.input, self.cast(graph, stored, bias.tensor, dtype))
            return
        scale = np.asarray(bias.scale, dtype=np.float32)
        scale = scale.reshape(()) if bias.axis is None else scale
        # float16 model: a float16 scale where the product of scales is a normal float16,
        # else a float32 scale and a Cast of the dequantized bias (onnxruntime does the same).
        half = half_bias_scale(scale) if dtype == ir.DataType.FLOAT16 else None
        if half is not None:
            scale = half.reshape(scale.shape)
        data, _ = numerics.quantize_bias(read_array(value.const_value), np.float32(1.0), scale,
                                         name=bias.tensor)
        stored = self.initializer(graph, f"{bias.tensor}_quantized", data.astype(np.int32))
        scale_value = self.initializer(
            graph, f"{bias.tensor}_quantized_scale",
            scale.astype(np.float16) if half is not None else typed_fields(scale))
        zero_point = self.initializer(graph, f"{bias.tensor}_quantized_zero_point",
                                      typed_fields(np.zeros(scale.shape, np.int32)))
        dq_type = dtype if dtype != ir.DataType.FLOAT16 or half is not None else ir.DataType.FLOAT
        out = self.node(graph, "DequantizeLinear", [stored, scale_value, zero_point],
                        bias.tensor, bias.axis, dq_type)
        if dq_type != dtype:
            out = self.cast(graph, out, bias.tensor, dtype)
        node.replace_input_with(bias.input, out)

    def cast(self, graph: ir.Graph, value: ir.Value, stem: str, dtype: ir.DataType) -> ir.Value:
        """``Cast(value, to=dtype)``, named ``<stem>_Cast``."""
        node = ir.node("Cast", [value], attributes={"to": int(dtype)},
                       name=self.names.new(f"{stem}_Cast"))
        graph.append(node)
        out = node.outputs[0]
        out.name = self.names.new(f"{stem}_Cast_Output")
        out.type, out.shape = ir.TensorType(dtype), value.shape
        return out

    # -- the whole model ---------------------------------------------------------------------
    def remove_folded_activations(self) -> None:
        for decision in self.plan.nodes.values():
            if decision.action != "remove":
                continue
            node = self.nodes[decision.name]
            record_stands_for(self.model, node.inputs[0].name or "",  # type: ignore[union-attr]
                              node.outputs[0].name or "")
            x, y = node.inputs[0], node.outputs[0]
            assert x is not None and node.graph is not None
            if y.is_graph_output():  # the producer's output takes the graph output's name
                y_name, y.name = y.name, self.names.new(f"{y.name}_removed")
                x.name = y_name
            y.replace_all_uses_with(x, replace_graph_outputs=True)
            node.graph.remove(node, safe=True)

    def run(self) -> None:
        # Always present in our output, so readers know every folded tensor is listed.
        self.model.metadata_props.setdefault(STANDS_FOR, "{}")
        self.remove_folded_activations()
        # Weights first: their DequantizeLinear nodes then come first in the sorted graph, as
        # in onnxruntime's models (tools that check the node order expect it).
        ordered = sorted(self.plan.tensors.items(), key=lambda item: item[1].role != "weight")
        for name, tq in ordered:
            value = self.values.get(name)
            if value is None:
                logger.warning("planned tensor '%s' is not in the model; skipped", name)
            elif tq.role == "weight":
                self.weight(value, tq)
            else:
                self.activation(value, tq)
        for decision in self.plan.quantized_nodes():
            if decision.bias is not None:
                self.bias(self.nodes[decision.name], decision.bias)
        if self.domain:
            self.model.opset_imports.setdefault(self.domain, 1)
        for graph in (self.model.graph, *self.model.graph.subgraphs()):
            clips_before_float8(graph, self.names)
        RemoveUnusedNodesPass()(self.model)
        for graph in (self.model.graph, *self.model.graph.subgraphs()):
            _remove_unused_initializers(graph)
            graph.sort()


def _remove_unused_initializers(graph: ir.Graph) -> None:
    outputs = {id(v) for v in graph.outputs}
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_input() and id(value) not in outputs:
            del graph.initializers[name]


def emit_qdq(model: ir.Model, plan: QuantPlan) -> None:
    """Rewrite ``model`` in place into QDQ form following ``plan``."""
    _QDQEmitter(model, plan).run()
