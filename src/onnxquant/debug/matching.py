"""Float ↔ quantized correspondence by graph structure, not by naming conventions.

Every quantized weight is traced to the float constant it came from, and every quantized
activation to the float tensor it stands for, in this order of evidence:

- **weights**: the stored initializer's name without ``_quantized`` (onnxruntime's and
  onnxquant's convention) → the float constant in the same operand slot of the same-named float
  node (its reciprocal where a float ``Div`` runs as a multiplication) → a float constant made
  by onnxquant's own preparation (BatchNormalization folded into Conv) → the float constant of
  the same size that it is closest to (≥ 10 dB);
- **activations**: a dequantized tensor that is a graph output under a float name → the float
  tensor in the same slot of the same-named float node that reads it (so a fused Relu or a
  folded BatchNormalization maps to the tensor it replaced) → the float tensor an integer
  node's float counterpart writes → the quantizer's input, when the float model has it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxquant.core.graph import STANDS_FOR, corrected_biases
from onnxquant.core.metrics import sqnr_db
from onnxquant.debug._params import QuantParams, constant_array
from onnxquant.debug.quantized_graph import (
    INTEGER_OPS,
    MOVEMENT,
    Layer,
    QuantizedGraph,
    QuantizedTensor,
    QuantizedWeight,
    base_node_name,
)

__all__ = ["WeightMatch", "ActivationMatch", "LayerMatch", "Matching", "match_models"]

logger = logging.getLogger(__name__)

MIN_VALUE_MATCH_DB = 10.0
"""A weight matched by value alone must be at least this close to its float candidate."""


@dataclasses.dataclass
class WeightMatch:
    """A quantized weight and its float original.

    Attributes:
        name: The float constant's name (in the float model, or made by preparation).
        original: Its values.
        dequantized: The quantized weight dequantized, in the float constant's layout.
        weight: What the quantized graph stores.
        how: ``"name"``, ``"node"``, ``"folded"``, ``"reciprocal"`` (a float ``Div`` by the
            constant runs as a multiplication by its reciprocal, named ``<constant>_reciprocal``)
            or ``"value"`` (the evidence used).
        transposed: The quantized layout is the float one transposed (2-D).
        corrected: A bias that bias correction changed on purpose (its difference from the
            float original is not quantization error).
    """

    name: str
    original: np.ndarray
    dequantized: np.ndarray
    weight: QuantizedWeight
    how: str
    transposed: bool = False
    corrected: bool = False

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.original, self.dequantized)


@dataclasses.dataclass
class ActivationMatch:
    """A quantized activation and the float tensor it stands for."""

    name: str
    tensor: QuantizedTensor

    @property
    def params(self) -> QuantParams:
        return self.tensor.params


@dataclasses.dataclass
class LayerMatch:
    """A quantized layer, the float node it replaces and where its output is compared.

    Attributes:
        layer: The layer in the quantized graph.
        float_node: The float node (None when it has no counterpart).
        reference: Name of the float tensor its output is compared with.
        quantized: The quantized form of its output (None: its float output is compared).
    """

    layer: Layer
    float_node: ir.Node | None
    reference: str
    quantized: QuantizedTensor | None

    @property
    def name(self) -> str:
        return self.float_node.name if self.float_node is not None and self.float_node.name \
            else self.layer.name

    @property
    def op_type(self) -> str:
        return self.float_node.op_type if self.float_node is not None else \
            self.layer.node.op_type


@dataclasses.dataclass
class Matching:
    """Everything matched between a float model and its quantized form."""

    graph: QuantizedGraph
    weights: dict[str, WeightMatch]
    activations: dict[str, ActivationMatch]
    layers: list[LayerMatch]
    unmatched_weights: list[str]
    unmatched_activations: list[str]
    dynamic_inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    """Inputs of DynamicQuantizeLinear nodes -> the float tensors they carry."""


class _FloatModel:
    """Name lookups over the float model (and, lazily, its prepared form)."""

    def __init__(self, model: ir.Model, aliases: dict[str, str] | None = None) -> None:
        self.model = model
        self.aliases = aliases or {}
        self.nodes = {n.name: n for n in model.graph if n.name}
        self.values: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs if v.name}
        for node in model.graph:
            self.values.update({v.name: v for v in node.outputs if v.name})
        # Constant values by name, read when needed (a copy of every weight would double the
        # memory of a large model).
        self.constants = {name: v for name, v in {**model.graph.initializers,
                                                  **self.values}.items()
                          if _is_constant(v)}
        self._prepared: _FloatModel | None = None

    def array(self, name: str) -> np.ndarray | None:
        """The value of constant ``name`` (None when it is not one)."""
        value = self.constants.get(name)
        return constant_array(value) if value is not None else None

    def sizes(self) -> Iterator[tuple[str, int]]:
        """``(name, element count)`` of every constant, without reading any."""
        for name, value in self.constants.items():
            tensor = value.const_value
            if tensor is None:
                array = constant_array(value)
                yield name, int(array.size) if array is not None else 0
            else:
                yield name, int(np.prod(tensor.shape.numpy())) if tensor.shape.numpy() else 1

    def is_activation(self, name: str | None) -> bool:
        return bool(name) and name in self.values and name not in self.constants

    def named(self, name: str | None) -> str | None:
        """The float tensor a quantized-model tensor called ``name`` carries: what the
        quantizer recorded it stands for (``STANDS_FOR`` metadata), else the same name."""
        for candidate in (self.aliases.get(name or ""), name):
            if self.is_activation(candidate):
                return candidate
        return None

    @property
    def prepared(self) -> _FloatModel:
        """The float model after onnxquant's preparation (BatchNorm folded into Conv, ...)."""
        if self._prepared is None:
            from onnxquant.preprocess import prepare_for_quantization

            copy = ir.serde.deserialize_model(ir.serde.serialize_model(self.model))
            try:
                prepare_for_quantization(copy)
            except Exception as err:  # noqa: BLE001 - only a source of extra candidates
                logger.debug("preparing the float model failed: %s", err)
            self._prepared = _FloatModel(copy)
        return self._prepared

    def node_for(self, node: ir.Node) -> ir.Node | None:
        for name in (node.name, base_node_name(node)):
            found = self.nodes.get(name or "")
            if found is not None:
                return found
        return None


def _is_constant(value: ir.Value) -> bool:
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _aligned(reference: np.ndarray, dequantized: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """``dequantized`` in ``reference``'s layout (and whether it was transposed)."""
    if reference.shape == dequantized.shape:
        return dequantized, False
    if reference.size != dequantized.size:
        return None
    if dequantized.ndim == 2 and dequantized.T.shape == reference.shape:
        return dequantized.T, True
    return dequantized.reshape(reference.shape), False


def _candidates(floats: _FloatModel, weight: QuantizedWeight
                ) -> Iterator[tuple[str, str, _FloatModel]]:
    """(evidence, float constant name, model): the stored name without ``_quantized``, then
    the same operand of the same-named node, each in the float model and in its prepared form
    (made only when asked for)."""
    stem = weight.stored[: -len("_quantized")] if weight.stored.endswith("_quantized") else None
    for how, source in (("name", lambda: floats), ("node", lambda: floats),
                        ("folded", lambda: floats.prepared)):
        model = source()
        if stem is not None and how != "node":
            yield how, stem, model
        if weight.reader is None or how == "name":
            continue
        node, slot = weight.reader
        twin = model.node_for(node)
        if twin is not None and slot < len(twin.inputs) and twin.inputs[slot] is not None:
            kind = how
            if twin.op_type == "Div" and slot == 1 and node.op_type in ("Mul", "QLinearMul"):
                kind = "reciprocal"  # x / c runs as x · (1/c)
            yield kind, twin.inputs[slot].name or "", model  # type: ignore[union-attr]


def _weight_match(floats: _FloatModel, weight: QuantizedWeight) -> WeightMatch | None:
    """The stored name decides when it names a float constant of the right size; otherwise
    the candidate closest in value (a node's unfolded weight against the folded one)."""
    found: list[WeightMatch] = []
    for how, name, source in _candidates(floats, weight):
        reference = source.array(name)
        if how == "reciprocal" and reference is not None:
            if reference.dtype.kind != "f" or not np.all(reference):
                continue
            reference = (1.0 / reference.astype(np.float64)).astype(reference.dtype)
            name = f"{name}_reciprocal"
        aligned = _aligned(reference, weight.dequantized) if reference is not None else None
        if aligned is None:
            continue
        match = WeightMatch(name, reference, aligned[0], weight, how,  # type: ignore[arg-type]
                            aligned[1])
        if how == "name":
            return match
        found.append(match)
    if found:
        return max(found, key=lambda m: m.sqnr_db)
    return _by_value(floats, weight)


def _by_value(floats: _FloatModel, weight: QuantizedWeight) -> WeightMatch | None:
    best: WeightMatch | None = None
    best_db = MIN_VALUE_MATCH_DB
    size = weight.dequantized.size
    for source in (floats, floats.prepared):
        for name, count in source.sizes():
            reference = source.array(name) if count == size and size >= 2 else None
            if reference is None or reference.dtype.kind != "f":
                continue
            aligned = _aligned(reference, weight.dequantized)
            if aligned is None:
                continue
            db = sqnr_db(reference, aligned[0])
            if db > best_db:
                best_db = db
                best = WeightMatch(name, reference, aligned[0], weight, "value", aligned[1])
        if best is not None:
            return best
    return None


def _float_slot(node: ir.Node, slot: int) -> int | None:
    """The input slot of the float op that an integer op's input ``slot`` stands for."""
    if node.op_type == "QLinearConcat":
        return (slot - 2) // 3 if slot >= 2 and (slot - 2) % 3 == 0 else None
    if node.op_type not in INTEGER_OPS:
        return slot
    return next((f for data, _, _, f in INTEGER_OPS[node.op_type][0] if data == slot), None)


def _activation_name(floats: _FloatModel, tensor: QuantizedTensor,
                     graph: QuantizedGraph) -> str | None:
    outputs = {id(v) for v in graph.graph.outputs}
    for post in tensor.posts:
        if id(post) in outputs and floats.is_activation(post.name):
            return post.name
    readers = [use for post in tensor.posts for use in post.uses()]
    readers += list(tensor.value.uses())
    for node, slot in readers:
        twin = floats.node_for(node)
        float_slot = _float_slot(node, slot)
        if twin is None or float_slot is None or float_slot >= len(twin.inputs):
            continue
        if twin.op_type == node.op_type or node.op_type in INTEGER_OPS or \
                node.op_type in MOVEMENT:
            value = twin.inputs[float_slot]
            if value is not None and floats.is_activation(value.name):
                return value.name
    producer = tensor.value.producer()
    if producer is not None and tensor.pre is None:
        twin = floats.node_for(producer)
        index = producer.outputs.index(tensor.value) if tensor.value in producer.outputs else 0
        if twin is not None and index < len(twin.outputs) and \
                floats.is_activation(twin.outputs[index].name):
            return twin.outputs[index].name
    names = [p.name for p in tensor.posts]
    names += [tensor.pre.name if tensor.pre is not None else None]
    stored = tensor.value.name or ""
    names.append(stored[: -len("_quantized")] if stored.endswith("_quantized") else None)
    return next((found for n in names if (found := floats.named(n)) is not None), None)


_RESCALE = ("Cast", "Mul", "Add")


def _float_result(value: ir.Value, floats: _FloatModel) -> ir.Value:
    """The first tensor the float model also has, along the Cast/Mul/Add chain that turns an
    integer product (MatMulInteger, ConvInteger) back into float; ``value`` otherwise."""
    current = value
    for _ in range(4):
        if floats.named(current.name):
            return current
        uses = list(current.uses())
        if len(uses) != 1 or uses[0][0].op_type not in _RESCALE:
            break
        current = uses[0][0].outputs[0]
    return value


def _layer_match(floats: _FloatModel, layer: Layer, graph: QuantizedGraph,
                 activations: dict[int, str]) -> LayerMatch | None:
    twin = floats.node_for(layer.node)
    quantized = graph.output_tensor(layer)
    if quantized is not None and id(quantized) in activations:
        return LayerMatch(layer, twin, activations[id(quantized)], quantized)
    output = _float_result(layer.output, floats)
    if output is not layer.output:
        layer = Layer(layer.node, output)
    for candidate in (layer.output.name,
                      twin.outputs[0].name if twin is not None and twin.outputs else None):
        name = floats.named(candidate)
        if name is not None:
            producer = floats.values[name].producer()
            return LayerMatch(layer, twin or producer, name, None)
    return None


def match_models(float_model: ir.Model, quantized_model: ir.Model) -> Matching:
    """Match a quantized model's weights, activations and layers to its float model."""
    aliases = json.loads(quantized_model.metadata_props.get(STANDS_FOR, "{}"))
    floats = _FloatModel(float_model, aliases)
    graph = QuantizedGraph(quantized_model)
    weights: dict[str, WeightMatch] = {}
    unmatched_weights = []
    corrected = corrected_biases(quantized_model)
    for weight in graph.weights:
        found = _weight_match(floats, weight)
        if found is None:
            if not any(weight.stored.startswith(name) for name in corrected):
                unmatched_weights.append(weight.stored)  # else: a bias correction added
        elif found.name not in weights:
            found.corrected = found.name in corrected
            weights[found.name] = found
    activations: dict[str, ActivationMatch] = {}
    by_tensor: dict[int, str] = {}
    unmatched_activations = []
    for tensor in graph.tensors.values():
        if not tensor.posts and tensor.pre is None and not tensor.value.uses():
            continue
        name = _activation_name(floats, tensor, graph)
        if name is None:
            if not tensor.moved:
                unmatched_activations.append(tensor.value.name or "")
            continue
        by_tensor[id(tensor)] = name
        activations.setdefault(name, ActivationMatch(name, tensor))
    layers = [m for layer in graph.layers
              if (m := _layer_match(floats, layer, graph, by_tensor)) is not None]
    dynamic = {}
    for node in graph.graph:
        x = node.inputs[0] if node.op_type == "DynamicQuantizeLinear" and node.inputs else None
        name = floats.named(x.name) if x is not None else None
        if x is not None and name is not None:
            dynamic[x.name or ""] = name
    return Matching(graph, weights, activations, layers, unmatched_weights,
                    unmatched_activations, dynamic)
