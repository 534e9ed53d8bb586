"""Transformer fusion: Attention, EmbedLayerNormalization, SkipLayerNormalization,
BiasGelu/FastGelu — the contrib ops onnxquant's dynamic quantization turns into QAttention,
QEmbedLayerNormalization and integer MatMuls.

The fusions come from onnxruntime's transformer optimizer (``onnxruntime.transformers``, shipped
in the onnxruntime wheel; it is not ``onnxruntime.quantization``): its pattern rules follow each
exporter's variants and onnxruntime's kernels, which hand-written fusions would have to track.
It runs with ``opt_level=0`` (its own fusions only: higher levels call onnxruntime's session
optimizer, which in onnxruntime 1.32 needs torch installed).

Attention fusion needs the number of heads and the hidden size; exporters with dynamic axes
(torch) compute the attention reshapes at run time, where the optimizer cannot read them
("Failed to detect num_heads and hidden_size"). :func:`detect_attention_shape` finds them in the
graph: the hidden size is the side of the square projection weights, and the head size the last
constant of the reshapes that split a projection into heads.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxquant.core.errors import QuantizationError
from onnxquant.preprocess.report import StepReport

__all__ = ["MODEL_TYPES", "detect_attention_shape", "fuse_transformer",
           "fuse_transformer_model"]

logger = logging.getLogger(__name__)


def _model_types() -> tuple[str, ...]:
    from onnxruntime.transformers.optimizer import MODEL_TYPES as ORT_MODEL_TYPES

    return tuple(ORT_MODEL_TYPES)


MODEL_TYPES: tuple[str, ...] = _model_types()
"""The model types onnxruntime's transformer optimizer knows (``bert``, ``gpt2``, ``vit``, ...)."""
ATTENTION_TYPES = frozenset({"bert", "bert_tf", "bert_keras", "tnlr", "vit", "swin"})
"""Model types whose fusion should give Attention nodes."""


def _constants(graph: onnx.GraphProto) -> dict[str, Any]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _shape_entries(name: str, constants: dict[str, Any],
                   producers: dict[str, onnx.NodeProto]) -> list[int | None]:
    """The entries of a Reshape's shape input: constants where known, None elsewhere."""
    if name in constants:
        return [int(v) for v in constants[name].ravel()]
    node = producers.get(name)
    if node is None or node.op_type != "Concat":
        return []
    entries: list[int | None] = []
    for part in node.input:
        source = producers.get(part)
        if part in constants:
            entries += [int(v) for v in constants[part].ravel()]
        elif source is not None and source.op_type == "Unsqueeze" and \
                source.input[0] in constants:
            entries += [int(v) for v in constants[source.input[0]].ravel()]
        else:
            entries.append(None)
    return entries


def detect_attention_shape(model: onnx.ModelProto) -> tuple[int, int] | None:
    """``(num_heads, hidden_size)`` read from the graph, or None when it shows none."""
    graph = model.graph
    squares = collections.Counter(int(i.dims[0]) for i in graph.initializer
                                  if len(i.dims) == 2 and i.dims[0] == i.dims[1])
    if not squares:
        return None
    hidden, count = squares.most_common(1)[0]
    if count < 3:  # query, key, value (and output) projections
        return None
    constants = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    votes: collections.Counter[int] = collections.Counter()
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        entries = _shape_entries(node.input[1], constants, producers)
        if len(entries) < 3 or entries[-1] is None or entries[-1] <= 0:
            continue
        heads, size = entries[-2], entries[-1]
        if heads is not None and heads > 0 and heads * size == hidden:
            votes[heads] += 1
        elif (heads is None or heads == -1) and size < hidden and hidden % size == 0:
            votes[hidden // size] += 1
    if not votes:
        return None
    return votes.most_common(1)[0][0], hidden


def fuse_transformer(model: onnx.ModelProto, model_type: str, *, num_heads: int = 0,
                     hidden_size: int = 0) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Fuse ``model`` with onnxruntime's transformer optimizer for ``model_type``; returns the
    fused model and the contrib ops it now has, by op type.

    ``num_heads``/``hidden_size`` of 0 are detected (:func:`detect_attention_shape`) for the
    types whose attention fusion needs them.
    """
    if model_type not in MODEL_TYPES:
        raise QuantizationError(f"unknown model type '{model_type}'; onnxruntime's transformer "
                                f"optimizer knows {', '.join(MODEL_TYPES)}")
    from onnxruntime.transformers.optimizer import optimize_model

    if not (num_heads and hidden_size):
        found = detect_attention_shape(model)
        if found is not None:
            num_heads = num_heads or found[0]
            hidden_size = hidden_size or found[1]
            logger.info("attention: %d heads, hidden size %d (read from the graph)",
                        num_heads, hidden_size)
    fused = optimize_model(model, model_type=model_type, num_heads=num_heads,
                           hidden_size=hidden_size, opt_level=0, use_gpu=False)
    proto = fused.model
    domains = {o.domain for o in proto.opset_import}
    for domain in {n.domain for n in proto.graph.node} - domains - {"", "ai.onnx"}:
        proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # the fusions' ops
    counts = collections.Counter(n.op_type for n in proto.graph.node
                                 if n.domain == "com.microsoft")
    return proto, dict(counts)


def fuse_transformer_model(model: ir.Model, model_type: str, num_heads: int = 0,
                           hidden_size: int = 0) -> tuple[ir.Model, StepReport]:
    """:func:`fuse_transformer` as a pre-processing step on an ``onnx_ir`` model: the fused
    model and what the step did. A model the optimizer cannot handle comes back unchanged,
    with the reason in the report."""
    proto = ir.serde.serialize_model(model)
    before = collections.Counter(n.op_type for n in proto.graph.node
                                 if n.domain == "com.microsoft")
    try:
        fused, counts = fuse_transformer(proto, model_type, num_heads=num_heads,
                                         hidden_size=hidden_size)
    except QuantizationError:
        raise
    except Exception as err:  # noqa: BLE001 - a fusion failure leaves the model as it was
        return model, StepReport(f"{model_type} fusion", False,
                                 problem=f"onnxruntime's transformer optimizer failed: {err}")
    new = {op: count - before.get(op, 0) for op, count in counts.items()
           if count > before.get(op, 0)}
    details = tuple(f"{count} {op}" for op, count in sorted(new.items()))
    problem = None
    if "Attention" not in counts and model_type in ATTENTION_TYPES:
        problem = ("no attention block was fused; give num_heads and hidden_size if the "
                   "graph does not show them")
    return ir.serde.deserialize_model(fused), StepReport(
        f"{model_type} fusion", bool(new), details or ("nothing fused",), problem)
