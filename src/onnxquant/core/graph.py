"""Small graph queries shared by the planner, the selection and the emitters."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

__all__ = ["iter_nodes", "is_float", "is_float32", "is_half", "has_half_values", "HALF_QDQ_OPSET",
           "is_constant", "from_dequantize", "add_initializer", "STANDS_FOR",
           "record_stands_for", "CORRECTED_BIASES", "record_corrected_biases",
           "corrected_biases"]

_QUANTIZABLE = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
HALF_QDQ_OPSET = 19  # first opset whose QuantizeLinear/DequantizeLinear take float16 scales

STANDS_FOR = "onnxquant.stands_for"
"""Model metadata key: JSON ``{tensor: float-model tensor it now carries}``, written when a
rewrite makes a tensor carry another one's values (a Conv output with a BatchNormalization
folded in, a tensor whose Relu/Clip the quantized grid now applies). Debugging tools read it to
pair quantized activations with the float model's tensors without the float model at hand."""


def record_stands_for(model: ir.Model, tensor: str, float_tensor: str) -> None:
    """Record in ``model``'s metadata that ``tensor`` now carries ``float_tensor``'s values
    (following earlier records: what ``float_tensor`` stood for is inherited)."""
    import json

    table = json.loads(model.metadata_props.get(STANDS_FOR, "{}"))
    table[tensor] = table.get(float_tensor, float_tensor)
    model.metadata_props[STANDS_FOR] = json.dumps(table, sort_keys=True)


CORRECTED_BIASES = "onnxquant.corrected_biases"
"""Model metadata key: JSON list of the bias tensors that bias correction changed (their values
differ from the float model's on purpose; debugging tools do not count that as error)."""


def record_corrected_biases(model: ir.Model, names: list[str]) -> None:
    """Record in ``model``'s metadata that bias correction changed ``names``."""
    import json

    recorded = corrected_biases(model)
    model.metadata_props[CORRECTED_BIASES] = json.dumps(sorted(recorded | set(names)))


def corrected_biases(model: ir.Model) -> set[str]:
    """The bias tensors bias correction changed (:data:`CORRECTED_BIASES`)."""
    import json

    return set(json.loads(model.metadata_props.get(CORRECTED_BIASES, "[]")))


def iter_nodes(model: ir.Model, *, subgraphs: bool = True) -> Iterator[ir.Node]:
    """All nodes of the main graph, and of If/Loop/Scan bodies when ``subgraphs``."""
    if subgraphs:
        yield from ir.traversal.RecursiveGraphIterator(model.graph)
    else:
        yield from model.graph


def is_float(value: ir.Value | None) -> bool:
    """Whether ``value`` is a float32 or float16 tensor (the types quantization applies to;
    float16 tensors get float16 scales, so only QDQ at opset 19+ quantizes them)."""
    return value is not None and value.dtype in _QUANTIZABLE


def is_float32(value: ir.Value | None) -> bool:
    """Whether ``value`` is a float32 tensor (dynamic quantization: DynamicQuantizeLinear
    reads float32 only)."""
    return value is not None and value.dtype == ir.DataType.FLOAT


def is_half(value: ir.Value | None) -> bool:
    """Whether ``value`` is a float16 tensor."""
    return value is not None and value.dtype == ir.DataType.FLOAT16


def has_half_values(model: ir.Model) -> bool:
    """Whether any graph input, initializer or node output of ``model`` is float16."""
    graph = model.graph
    return (any(is_half(v) for v in (*graph.inputs, *graph.initializers.values()))
            or any(is_half(v) for node in iter_nodes(model) for v in node.outputs))


def is_constant(value: ir.Value) -> bool:
    """An initializer that is not also a graph input (so it cannot be overridden)."""
    return value.const_value is not None and not value.is_graph_input()


def from_dequantize(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def add_initializer(graph: ir.Graph, name: str,
                    data: np.ndarray | np.generic | ir.TensorProtocol) -> ir.Value:
    """Register ``data`` (an array or an onnx_ir tensor) as initializer ``name`` of ``graph``,
    with its type and shape set."""
    if isinstance(data, (np.ndarray, np.generic)):
        tensor: ir.TensorProtocol = ir.tensor(np.asarray(data), name=name)
    else:
        tensor = data
        tensor.name = name
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape.numpy()),
                     type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value
