"""Running and comparing the test-zoo models: random feeds for any model's inputs, a CPU
onnxruntime run, SQNR between outputs, and the constant tensors of a model (subgraphs included).
Re-exported by :mod:`model_zoo`, so tests use ``zoo.run``, ``zoo.random_feeds``, ...
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

__all__ = ["random_feeds", "run", "sqnr_db", "zoo_tensors"]


def _vocab_size(graph: onnx.GraphProto, input_name: str) -> int | None:
    """Rows of the table that a top-level Gather indexes with ``input_name``, if known."""
    tables = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = list(node.attribute[0].t.dims)
    for node in graph.node:
        if node.op_type == "Gather" and node.input[1] == input_name:
            dims = tables.get(node.input[0])
            if dims:
                return dims[0]
    return None


def random_feeds(
    model: onnx.ModelProto, n: int, *, seed: int = 0, dims: dict[str, int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Make ``n`` random feeds for the graph inputs of ``model`` (initializers excluded).

    Floats are standard normal. Integer inputs whose name ends in ``ids`` are drawn from
    ``[0, vocab)``, with vocab the row count of the Gather table they index (else 10); an input
    named ``*mask*`` is ones, with 1..S//2 trailing zeros on every row but the first; other
    integers are in ``[0, 10)``; bools are fair coin flips. A symbolic dim takes its value from
    ``dims`` by name, else 2 on axis 0 (batch) and 8 elsewhere.
    """
    dims = dims or {}
    rng = np.random.default_rng(seed)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value")
            else dims.get(d.dim_param, 2 if axis == 0 else 8)
            for axis, d in enumerate(tensor_type.shape.dim)
        )
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        specs.append((value.name, shape, np.dtype(dtype)))

    feeds = []
    for _ in range(n):
        feed = {}
        for name, shape, dtype in specs:
            if dtype == np.bool_:
                array = rng.random(shape) < 0.5
            elif np.issubdtype(dtype, np.floating):
                array = rng.standard_normal(shape)
            elif "mask" in name:
                array = np.ones(shape)
                if len(shape) == 2 and shape[1] > 1:
                    for row in range(1, shape[0]):
                        array[row, shape[1] - rng.integers(1, shape[1] // 2 + 1):] = 0
            else:
                high = (_vocab_size(graph, name) or 10) if name.endswith("ids") else 10
                array = rng.integers(0, high, shape)
            feed[name] = np.asarray(array, dtype=dtype)
        feeds.append(feed)
    return feeds


def run(model: onnx.ModelProto | str, feeds: list[dict]) -> list[list[np.ndarray]]:
    """Run ``model`` (a proto or a file path) with onnxruntime on the CPU, once per feed."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10*log10(sum(ref^2) / sum((ref-test)^2)).

    Returns ``inf`` when the arrays are equal (including both all-zero).
    """
    ref = np.asarray(reference, dtype=np.float64)
    diff = ref - np.asarray(test, dtype=np.float64)
    if ref.shape != diff.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs test {np.shape(test)}")
    noise = float(np.sum(diff * diff))
    if noise == 0.0:
        return math.inf
    signal = float(np.sum(ref * ref))
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def zoo_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant values of a zoo model, subgraphs included, by name."""
    tensors = {}

    def walk(graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            tensors[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type == "Constant":
                tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    return tensors
