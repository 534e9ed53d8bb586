"""Bring a model below opset 11 to opset 11, Upsample nodes included.

onnxruntime's ``quant_pre_process`` converts every model at opset 10 or below to opset 11, since
quantization will need it. ONNX's version converter does most of the work (e.g. a Clip-6 whose
bounds are already inputs becomes a valid Clip-11), but it cannot carry an ``Upsample`` through
opset 10, where the op is deprecated. So every Upsample is first hidden in a private domain
(with its scales as an input, whatever its version kept them in), the rest of the model is
converted, and each hidden node then becomes the ``Resize`` (opset 11) that computes what
Upsample computed: ``coordinate_transformation_mode="asymmetric"`` (output index ``i`` reads
input coordinate ``i / scale``) and, for nearest, ``nearest_mode="floor"``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

__all__ = ["LEGACY_TARGET_OPSET", "default_opset", "upgrade_legacy_opset"]

LEGACY_TARGET_OPSET = 11
_HIDDEN = "onnxquant.hidden_upsample"
_MODES = {"nn": "nearest", "nearest": "nearest", "bilinear": "linear", "linear": "linear"}


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version (1 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _unique(graph: onnx.GraphProto, stem: str) -> str:
    used = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name, index = stem, 0
    while name in used:
        index += 1
        name = f"{stem}_{index}"
    return name


def _scales_input(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> str:
    """The name of a tensor holding the node's scales (an initializer for versions that kept
    them in attributes)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if opset >= 9:
        return node.input[1]
    if "scales" in attrs:  # Upsample-7
        scales = np.array(attrs["scales"], np.float32)
    else:  # Upsample-1: 4-D NCHW with height/width scales
        scales = np.array([1, 1, attrs.get("height_scale", 1.0), attrs.get("width_scale", 1.0)],
                          np.float32)
    name = _unique(graph, f"{node.name or node.output[0]}_scales")
    graph.initializer.append(numpy_helper.from_array(scales, name))
    return name


def _hide_upsamples(model: onnx.ModelProto, opset: int) -> bool:
    """Move every Upsample to the private domain as ``Upsample(X, scales; mode)``."""
    hidden = False
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.op_type != "Upsample" or node.domain not in ("", "ai.onnx"):
                continue
            scales = _scales_input(node, graph, opset)
            mode = next((helper.get_attribute_value(a) for a in node.attribute
                         if a.name == "mode"), b"nearest")
            mode = _MODES.get(mode.decode().lower(), mode.decode())
            del node.input[1:]
            node.input.append(scales)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("mode", mode))
            node.domain = _HIDDEN
            hidden = True
    if hidden:
        model.opset_import.append(helper.make_opsetid(_HIDDEN, 1))
    return hidden


def _resize_hidden(model: onnx.ModelProto) -> None:
    """Turn every hidden Upsample into the equivalent opset-11 Resize."""
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain != _HIDDEN:
                continue
            mode = helper.get_attribute_value(node.attribute[0]).decode()
            roi = _unique(graph, f"{node.name or node.output[0]}_roi")
            graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), roi))
            node.input.insert(1, roi)
            node.op_type, node.domain = "Resize", ""
            node.attribute.append(helper.make_attribute(
                "coordinate_transformation_mode", "asymmetric"))
            if mode == "nearest":
                node.attribute.append(helper.make_attribute("nearest_mode", "floor"))
    kept = [o for o in model.opset_import if o.domain != _HIDDEN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def upgrade_legacy_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` converted to opset 11 when it is older (Upsample becomes Resize).

    The model is not modified; a model at opset 11 or newer is returned as it is.

    Raises:
        onnx.checker.ValidationError, RuntimeError: ONNX's version converter failed.
    """
    opset = default_opset(model)
    if opset >= LEGACY_TARGET_OPSET:
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    hidden = _hide_upsamples(work, opset)
    converted = version_converter.convert_version(work, LEGACY_TARGET_OPSET)
    if hidden:
        _resize_hidden(converted)
    return converted
