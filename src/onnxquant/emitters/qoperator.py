"""The QOperator emitter: operators that read and write 8-bit tensors (QLinearConv, QGemm, ...).

It reads the same plan as the QDQ emitter. Every quantized node with an integer form in
onnxruntime (see :mod:`onnxquant.emitters._qop_ops`) is replaced by it; data-movement ops
(Reshape, MaxPool, ...) run on the 8-bit tensor when it is there or an integer node reads their
output. A tensor exists as an 8-bit tensor once — written by an integer node or by one
QuantizeLinear of the float tensor (graph inputs, outputs of float nodes) — and as a float
tensor once, through one DequantizeLinear shared by all float readers; graph outputs stay float
under their names. Relu/Clip that the plan removed vanish when their producer is integer (its
output grid clips), and stay float otherwise.

A quantized node without an integer form (ConvTranspose, InstanceNormalization, a type
combination onnxruntime has no kernel for) stays float: it reads the float tensors, its weights
are stored quantized behind a DequantizeLinear and its bias as int32, as in QDQ; integer readers
quantize its output. Why it stayed float is appended to its decision's reason.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxquant.core import numerics
from onnxquant.core.external_data import read_array
from onnxquant.core.graph import (
    STANDS_FOR,
    add_initializer,
    is_float,
    iter_nodes,
    record_stands_for,
)
from onnxquant.core.names import UniqueNames
from onnxquant.core.plan import BiasQuant, NodeDecision, QuantPlan, TensorQuant
from onnxquant.core.qtypes import INT8
from onnxquant.emitters._qop_fold import fold_scales
from onnxquant.emitters._qop_hardsigmoid import fold_hard_sigmoids
from onnxquant.emitters._qop_layout import nhwc_max_pool
from onnxquant.emitters._qop_ops import FORMS, MS_DOMAIN, IntNode, unsupported
from onnxquant.emitters._tensor_fields import typed_fields
from onnxquant.emitters.qdq import _remove_unused_initializers

__all__ = ["emit_qoperator"]

logger = logging.getLogger(__name__)

FALLBACK = "kept float in QOperator format: "


class _QOperatorEmitter:
    def __init__(self, model: ir.Model, plan: QuantPlan) -> None:
        self.model = model
        self.plan = plan
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.names = UniqueNames(model)
        self.order = list(iter_nodes(model))
        self.decisions = {n: plan.nodes[n.name] for n in self.order if n.name in plan.nodes}
        self.integer: set[ir.Node] = set()
        self.int_for: dict[ir.Value, tuple[ir.Value, TensorQuant]] = {}
        self.cache: dict[tuple[int, str], ir.Value] = {}
        self.kernel_grid: dict[ir.Value, str] = {}  # output -> plan tensor its kernel writes on
        self.used_ms = False

    # -- which nodes become integer ------------------------------------------------------------
    def choose(self) -> None:
        reasons: dict[ir.Node, str] = {}
        movement = []
        for node, decision in self.decisions.items():
            if decision.action != "quantize":
                continue
            reason = unsupported(node, decision, self.plan, self.opset)
            if reason is not None:
                reasons[node] = reason
            elif FORMS[node.op_type].movement:
                movement.append(node)
            else:
                self.integer.add(node)
        # A data-movement op is integer when an integer node (or a chain of integer movement ops)
        # reads it, or when its input is already 8-bit; otherwise it would only add Q/DQ.
        bound: set[ir.Node] = set()
        for node in reversed(movement):
            if any(c in self.integer or c in bound for out in node.outputs for c, _ in out.uses()):
                bound.add(node)
        for node in movement:
            producer = self._producer(node.inputs[0])
            planned = self.plan.tensors.get(self.decisions[node].inputs.get(0, ""))
            if (node in bound or producer in self.integer
                    or (planned is not None and planned.role == "weight")):
                self.integer.add(node)
            else:
                reasons[node] = "its input is float and no integer node reads its output"
        for node, reason in reasons.items():
            decision = self.decisions[node]
            decision.reason = f"{decision.reason}; {FALLBACK}{reason}" if decision.reason \
                else FALLBACK + reason
            logger.debug("node '%s' %s%s", node.name, FALLBACK, reason)

    def _producer(self, value: ir.Value | None) -> ir.Node | None:
        """The producer of ``value``, looking through Relu/Clip the plan removes."""
        producer = value.producer() if value is not None else None
        while producer is not None and producer in self.decisions and \
                self.decisions[producer].action == "remove":
            producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        return producer

    def remove_folded_activations(self) -> None:
        for node, decision in self.decisions.items():
            if decision.action != "remove":
                continue
            x = node.inputs[0]
            assert x is not None and node.graph is not None
            if x.producer() not in self.integer:
                decision.reason += f"; {FALLBACK}its producer is not an integer node"
                continue
            record_stands_for(self.model, x.name or "", node.outputs[0].name or "")
            node.outputs[0].replace_all_uses_with(x)
            node.graph.remove(node, safe=True)

    # -- building blocks (the Builder protocol of _qop_ops) --------------------------------------
    def constant(self, node: ir.Node, stem: str, array: np.ndarray) -> ir.Value:
        assert node.graph is not None
        return add_initializer(node.graph, self.names.new(stem), np.asarray(array))

    def _cached(self, node: ir.Node, key: str, make) -> ir.Value:
        graph_key = (id(node.graph), key)
        if graph_key not in self.cache:
            self.cache[graph_key] = make()
        return self.cache[graph_key]

    def params(self, node: ir.Node, tq: TensorQuant) -> list[ir.Value]:
        """Scale and zero point initializers of ``tq`` in the graph of ``node`` (once each)."""
        return [self._cached(node, f"{tq.name}/scale",
                             lambda: self.field_constant(node, f"{tq.name}_scale",
                                                         tq.scale_array())),
                self._cached(node, f"{tq.name}/zero_point",
                             lambda: self.field_constant(node, f"{tq.name}_zero_point",
                                                         tq.zero_point_array()))]

    def field_constant(self, node: ir.Node, stem: str, array: np.ndarray) -> ir.Value:
        """A scale or zero point, stored in TensorProto's typed fields as onnxruntime does."""
        assert node.graph is not None
        return add_initializer(node.graph, self.names.new(stem), typed_fields(array))

    def stored_weight(self, node: ir.Node, value: ir.Value, tq: TensorQuant,
                      rank: int = 0) -> ir.Value:
        """The quantized constant, with leading 1s up to ``rank`` dimensions."""
        assert value.const_value is not None

        def make() -> ir.Value:
            data = numerics.quantize(read_array(value.const_value), tq.scale_array(),  # type: ignore[arg-type]
                                     tq.zero_point_array(), tq.quant_type, axis=tq.axis)
            if data.ndim < rank:
                data = data.reshape((1,) * (rank - data.ndim) + data.shape)
            return self.constant(node, f"{tq.name}_quantized", data)
        return self._cached(node, f"{tq.name}/quantized/{rank}", make)

    def int_input(self, node: ir.Node, index: int, decision: NodeDecision, *,
                  rank: int = 0) -> list[ir.Value]:
        value = node.inputs[index]
        assert value is not None
        tq = self.plan.tensors[decision.inputs[index]]
        if tq.role == "weight":
            return [self.stored_weight(node, value, tq, rank), *self.params(node, tq)]
        found = self.int_for.get(value)
        if found is None or not found[1].same_params(tq):
            found = (self.quantize(value, tq), tq)
            self.int_for.setdefault(value, found)
        return [found[0], *self.params(node, tq)]

    def out_params(self, node: ir.Node, index: int) -> list[ir.Value]:
        value = node.outputs[index]
        return self.params(node, self.plan.tensors[self.kernel_grid.get(value, value.name or "")])

    def bias(self, node: ir.Node, bias: BiasQuant) -> ir.Value:
        value = node.inputs[bias.input]
        assert value is not None and value.const_value is not None
        scale = np.asarray(bias.scale, dtype=np.float32)
        scale = scale.reshape(()) if bias.axis is None else scale
        data, _ = numerics.quantize_bias(read_array(value.const_value), np.float32(1.0), scale,
                                         name=bias.tensor)
        return self._cached(node, f"{bias.tensor}/int32",
                            lambda: self.constant(node, f"{bias.tensor}_quantized", data))

    def _linear(self, op: str, anchor: ir.Node, x: ir.Value, tq: TensorQuant,
                dtype: ir.DataType, stem: str, axis: int | None = None) -> ir.Value:
        """A QuantizeLinear/DequantizeLinear of ``x`` appended to the graph of ``anchor``."""
        attrs = {"axis": axis} if axis is not None else None
        node = ir.node(op, [x, *self.params(anchor, tq)], attributes=attrs,
                       name=self.names.new(f"{stem}_{op}"))
        assert anchor.graph is not None
        anchor.graph.append(node)
        out = node.outputs[0]
        out.name = self.names.new(f"{stem}_{'quantized' if op == 'QuantizeLinear' else 'dq'}")
        out.type, out.shape = ir.TensorType(dtype), x.shape
        return out

    def quantize(self, value: ir.Value, tq: TensorQuant) -> ir.Value:
        """One QuantizeLinear of a float tensor, in the graph that defines it."""
        producer = value.producer()
        graph = producer.graph if producer is not None else value.graph
        anchor = producer if producer is not None else _GraphAnchor(graph)
        return self._linear("QuantizeLinear", anchor, value, tq,  # type: ignore[arg-type]
                            tq.quant_type.onnx_dtype, value.name or "x")

    # -- nodes ---------------------------------------------------------------------------------
    def emit_integer(self, node: ir.Node, decision: NodeDecision) -> None:
        spec: IntNode = FORMS[node.op_type].build(self, node, decision)
        new = ir.node(spec.op_type, spec.inputs, attributes=spec.attributes, domain=spec.domain,
                      num_outputs=len(node.outputs), name=self.names.new(f"{node.name}_quant"))
        self.used_ms |= spec.domain == MS_DOMAIN
        graph = node.graph
        assert graph is not None
        graph.insert_after(node, new)
        for old, out in zip(node.outputs, new.outputs, strict=True):
            name = old.name or ""
            tq = self.plan.tensors.get(name) if name in decision.outputs else None
            if tq is None or not is_float(old):  # int64 indices, QGemm's float output
                out.type, out.shape = old.type, old.shape
                self._take_place(old, out)
                continue
            out.name = self.names.new(f"{name}_quantized")
            out.type, out.shape = ir.TensorType(tq.quant_type.onnx_dtype), old.shape
            if old.uses() or old.is_graph_output():
                dq = self._linear("DequantizeLinear", new, out, tq, old.dtype or ir.DataType.FLOAT,
                                  name)
                self._take_place(old, dq)
                self.int_for[dq] = (out, tq)
        graph.remove(node, safe=True)

    def _take_place(self, old: ir.Value, new: ir.Value) -> None:
        """``new`` replaces ``old`` everywhere, graph outputs included, under its name."""
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = self.names.new(f"{name}_replaced")
        new.name = name

    def emit_float(self, node: ir.Node, decision: NodeDecision) -> None:
        """A quantized node without an integer form: quantized weights behind a
        DequantizeLinear, an int32 bias, float activations."""
        for index, tensor in decision.inputs.items():
            tq = self.plan.tensors[tensor]
            value = node.inputs[index]
            if tq.role == "weight" and value is not None:
                node.replace_input_with(index, self.dequantized_weight(node, value, tq))
        if decision.bias is not None:
            bias = decision.bias
            scale = np.asarray(bias.scale, dtype=np.float32)
            scale = scale.reshape(()) if bias.axis is None else scale
            inputs = [self.bias(node, bias),
                      self.constant(node, f"{bias.tensor}_quantized_scale", scale)]
            dq = ir.node("DequantizeLinear", inputs,
                         attributes={"axis": bias.axis} if bias.axis is not None else None,
                         name=self.names.new(f"{bias.tensor}_DequantizeLinear"))
            assert node.graph is not None
            node.graph.append(dq)
            dq.outputs[0].name = self.names.new(f"{bias.tensor}_dq")
            dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            node.replace_input_with(bias.input, dq.outputs[0])

    def emit_recurrent(self, node: ir.Node, decision: NodeDecision) -> bool:
        """LSTM -> DynamicQuantizeLSTM (int8 weights, activations quantized inside the kernel):
        a weight-only LSTM behind DequantizeLinear would dequantize its weights on every run."""
        if node.op_type != "LSTM" or node.graph is None:
            return False
        from onnxquant.dynamic.config import DynamicQuantConfig
        from onnxquant.dynamic.contrib_ops import rewrite_lstm

        axes = {self.plan.tensors[t].axis for t in decision.inputs.values()}
        config = DynamicQuantConfig(weight_type=INT8, per_channel=axes != {None})
        done, reason = rewrite_lstm(node.graph, node, config, self.names.new)
        if done:
            self.used_ms = True
            decision.reason = f"{decision.reason}; DynamicQuantizeLSTM".lstrip("; ")
        return done

    def dequantized_weight(self, node: ir.Node, value: ir.Value, tq: TensorQuant) -> ir.Value:
        """A weight stored quantized behind one DequantizeLinear (per graph)."""
        stored = self.stored_weight(node, value, tq)
        return self._cached(node, f"{tq.name}/dequantized", lambda: self._linear(
            "DequantizeLinear", node, stored, tq, value.dtype or ir.DataType.FLOAT, tq.name,
            tq.axis))

    # -- the whole model -----------------------------------------------------------------------
    def run(self) -> None:
        # Always present in our output, so readers know every folded tensor is listed.
        self.model.metadata_props.setdefault(STANDS_FOR, "{}")
        self.choose()
        self.remove_folded_activations()
        self.kernel_grid = fold_scales(self.order, self.integer, self.decisions, self.plan)
        fold_hard_sigmoids(self.order, self.integer, self.decisions, self.plan, self.constant,
                           kernel_grid=self.kernel_grid)
        for node in self.order:
            decision = self.decisions.get(node)
            if decision is None or node.graph is None:
                continue
            if node in self.integer:
                self.emit_integer(node, decision)
            elif decision.action == "weights" and self.emit_recurrent(node, decision):
                continue
            elif decision.action in ("quantize", "weights"):
                self.emit_float(node, decision)
        if self.used_ms:
            self.model.opset_imports.setdefault(MS_DOMAIN, 1)
        nhwc_max_pool(self.model)
        RemoveUnusedNodesPass()(self.model)
        for graph in (self.model.graph, *self.model.graph.subgraphs()):
            _remove_unused_initializers(graph)
        self.model.graph.sort()


class _GraphAnchor:
    """Stands in for a producer when a value is a graph input: new nodes go to that graph."""

    def __init__(self, graph: ir.Graph | None) -> None:
        assert graph is not None
        self.graph = graph


def emit_qoperator(model: ir.Model, plan: QuantPlan) -> None:
    """Rewrite ``model`` in place into QOperator form following ``plan``.

    Nodes that stay float are recorded in their decision's ``reason``.
    """
    _QOperatorEmitter(model, plan).run()
