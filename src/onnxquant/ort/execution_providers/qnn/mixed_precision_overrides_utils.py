"""onnxruntime's ``MixedPrecisionTensorQuantOverridesFixer``: completes a 16-bit override so
that the tensors around it agree, with ``convert`` entries where two types meet.

QNN runs a node with all of its quantized inputs and outputs in one type. When the user gives
one activation another type than the default (say ``op4_out`` 16-bit among 8-bit tensors), the
node that writes it and the nodes that read it must run in that type too. For every such
override the fixer asks:

* the producer node to write all of its outputs in the new type, and to read its inputs in it;
* each consumer node to read its inputs in the new type and to write its outputs in it.

Those requests are then turned into overrides: a tensor written in one type and read in another
by some nodes gets ``convert: {quant_type, recv_nodes}`` (the quantizer adds a Q/DQ pair that
converts it for those nodes). Only the direct neighbours of the given overrides change; the
requests are not propagated further.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx

from onnxquant.ort._quant_type_info import QuantTypeInfo, get_node_output_qtype_info
from onnxquant.ort.tensor_quant_overrides import TensorQuantOverridesHelper

__all__ = ["MixedPrecisionTensorQuantOverridesFixer", "TensorTypeRequest"]

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclasses.dataclass
class TensorTypeRequest:
    """What the neighbours of a tensor ask for it.

    Attributes:
        producer: The type its producer must write it with, or None.
        consumers: ``(type, names of the nodes that must read it in that type)``, or None.
    """

    producer: QuantTypeInfo | None
    consumers: tuple[QuantTypeInfo, set[str]] | None


class MixedPrecisionTensorQuantOverridesFixer:
    """Adds the overrides and ``convert`` entries a mixed-precision override needs.

    Use :meth:`create_from_model`, then :meth:`apply`.

    Args:
        overrides: The overrides to complete (edited in place).
        producers: Tensor name -> the node that writes it.
        consumers: Tensor name -> the nodes that read it.
        value_infos: Tensor name -> its ``ValueInfoProto`` (graph inputs and outputs included).
        initializers: Initializer name -> ``TensorProto``.
    """

    def __init__(self, overrides: TensorQuantOverridesHelper,
                 producers: dict[str, onnx.NodeProto],
                 consumers: dict[str, list[onnx.NodeProto]],
                 value_infos: dict[str, onnx.ValueInfoProto],
                 initializers: dict[str, onnx.TensorProto]) -> None:
        self.overrides = overrides
        self.producers = producers
        self.consumers = consumers
        self.value_infos = value_infos
        self.initializers = initializers

    @staticmethod
    def create_from_model(overrides: TensorQuantOverridesHelper, model: onnx.ModelProto,
                          default_activation_qtype: Any
                          ) -> MixedPrecisionTensorQuantOverridesFixer:
        """A fixer for ``model`` (shape inference gives the types of its tensors).

        Args:
            overrides: The overrides to complete (edited in place).
            model: The float model (not modified).
            default_activation_qtype: The default activation type (kept for onnxruntime's
                signature; :meth:`apply` takes it again).
        """
        del default_activation_qtype
        model = onnx.shape_inference.infer_shapes(model)
        producers: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in dict.fromkeys(n for n in node.input if n):
                consumers.setdefault(name, []).append(node)
            for name in node.output:
                producers[name] = node
        graph = model.graph
        value_infos = {v.name: v for v in (*graph.value_info, *graph.output, *graph.input)}
        initializers = {t.name: t for t in graph.initializer}
        return MixedPrecisionTensorQuantOverridesFixer(overrides, producers, consumers,
                                                       value_infos, initializers)

    def apply(self, default_activation_qtype: Any, default_activation_symmetric: bool) -> None:
        """Add the overrides and ``convert`` entries the given overrides need.

        Raises:
            ValueError: Two overrides ask for different types on one tensor or node, a node to
                update has no name, or the result is not valid.
        """
        default = QuantTypeInfo(default_activation_qtype, default_activation_symmetric)
        requests = self.get_desired_tensor_types(default_activation_qtype,
                                                 default_activation_symmetric)
        for name, request in requests.items():
            self._resolve(name, request, QuantTypeInfo(default.quant_type))
        valid, message = self.overrides.is_valid(self.initializers, set(self.value_infos),
                                                 default_activation_qtype)
        if not valid:
            raise ValueError(f"the mixed-precision overrides built from the given "
                             f"TensorQuantOverrides are invalid: {message}")

    def get_desired_tensor_types(self, default_activation_qtype: Any,
                                 default_activation_symmetric: bool
                                 ) -> dict[str, TensorTypeRequest]:
        """The type requests that the activation overrides differing from the default make
        on their neighbours' tensors."""
        default = QuantTypeInfo(default_activation_qtype, default_activation_symmetric)
        requests: dict[str, TensorTypeRequest] = {}
        for name, entries in self.overrides.items():
            if name in self.initializers or not self._is_quantizable(name) or len(entries) != 1:
                continue
            info = QuantTypeInfo.load_from_dict(entries[0], default_activation_qtype)
            if info == default or "convert" in entries[0]:
                continue
            producer = self.producers.get(name)
            if producer is not None:
                self._request_node(requests, info, producer)
            for consumer in self.consumers.get(name, []):
                self._request_node(requests, info, consumer)
        return requests

    def _is_quantizable(self, name: str) -> bool:
        tensor = self.initializers.get(name)
        if tensor is not None:
            return tensor.data_type in _FLOATS
        info = self.value_infos.get(name)
        return info is not None and info.type.HasField("tensor_type") \
            and info.type.tensor_type.elem_type in _FLOATS

    def _request_node(self, requests: dict[str, TensorTypeRequest], info: QuantTypeInfo,
                      node: onnx.NodeProto) -> None:
        """Ask ``node`` to write its outputs and read its activation inputs as ``info``."""
        for name in node.output:
            if not self._is_quantizable(name):
                continue
            request = requests.setdefault(name, TensorTypeRequest(None, None))
            if request.producer is not None and request.producer != info:
                raise ValueError(f"tensor '{name}' is asked to be written as both "
                                 f"{request.producer} and {info} by the TensorQuantOverrides")
            request.producer = info
        for name in dict.fromkeys(n for n in node.input if n):
            if name in self.initializers or not self._is_quantizable(name):
                continue
            if not node.name:
                raise ValueError(f"the {node.op_type} node writing '{node.output[0]}' has no "
                                 "name; name every node (qnn_preprocess_model does) before "
                                 "using mixed-precision overrides")
            request = requests.setdefault(name, TensorTypeRequest(None, None))
            if request.consumers is None:
                request.consumers = (info, set())
            elif request.consumers[0] != info:
                raise ValueError(f"the readers of tensor '{name}' are asked to read it as both "
                                 f"{request.consumers[0]} and {info} by the "
                                 "TensorQuantOverrides")
            request.consumers[1].add(node.name)

    def _resolve(self, name: str, request: TensorTypeRequest, default: QuantTypeInfo) -> None:
        """Turn the requests on one tensor into overrides; ``default`` is the default
        activation type (the quantizer's symmetric setting applies to it)."""
        readers = {node.name for node in self.consumers.get(name, [])}
        if request.consumers is None:
            if request.producer is not None:  # read by everyone in the default type
                self._convert(name, request.producer, default, readers)
            return
        wanted, asking = request.consumers
        written = request.producer
        if written is None:
            written = get_node_output_qtype_info(self.overrides, name, default.quant_type)
        if written != wanted:
            self._convert(name, written, wanted, asking)
        elif request.producer is None:
            self._check_not_converted_for(name, asking)
        elif readers - asking:
            self._convert(name, written, default, readers - asking)
        elif name not in self.overrides:
            self.overrides[name] = [{}]
            written.save_to_dict(self.overrides[name][0])

    def _convert(self, name: str, written: QuantTypeInfo, read: QuantTypeInfo,
                 readers: set[str]) -> None:
        """Record that ``name`` is written as ``written`` and converted to ``read`` for
        ``readers``."""
        if name not in self.overrides:
            self.overrides[name] = [{}]
            written.save_to_dict(self.overrides[name][0])
        entry = self.overrides[name][0]
        if QuantTypeInfo.load_from_dict(entry) != written:
            raise ValueError(f"tensor '{name}' must be written as {written}, but its "
                             f"TensorQuantOverrides give {QuantTypeInfo.load_from_dict(entry)}")
        if not readers or read.quant_type == written.quant_type:
            return  # a convert changes the type; a symmetric-only difference stays as is
        if "convert" not in entry:
            entry["convert"] = {}
            read.save_to_dict(entry["convert"])
        convert = entry["convert"]
        if QuantTypeInfo.load_from_dict(convert) != read:
            raise ValueError(f"tensor '{name}' must be converted to {read} for {sorted(readers)}"
                             f", but its 'convert' gives {QuantTypeInfo.load_from_dict(convert)}")
        convert.setdefault("recv_nodes", set()).update(readers)
        self.overrides.quant_types = None

    def _check_not_converted_for(self, name: str, readers: set[str]) -> None:
        entries = self.overrides.get(name) or [{}]
        convert = entries[0].get("convert")
        if convert is None:
            return
        converted = set(convert.get("recv_nodes", {n.name for n in self.consumers.get(name, [])}))
        clash = sorted(converted & readers)
        if clash:
            raise ValueError(f"nodes {clash} must read tensor '{name}' in its own type, but its "
                             "'convert' override converts it for them")
