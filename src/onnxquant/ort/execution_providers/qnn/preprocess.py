"""onnxruntime's ``qnn_preprocess_model``: prepare a float model for QDQ quantization for the QNN
execution provider.

Steps, in order (each optional one only when asked):

1. fix the shapes of dynamic inputs (``dynamic_input_shapes``);
2. onnxruntime's basic graph optimizations (constant folding, redundant node elimination; via
   :func:`onnxquant.preprocess.optimize.optimize_graph`) and ONNX shape inference;
3. fusions: Erf sequence -> ``com.microsoft.Gelu``, ReduceL2 sequence ->
   ``LpNormalization(p=2)``, ReduceMean sequence -> ``LayerNormalization`` (``fuse_layernorm``,
   ONNX opset 17 and later);
4. drop initializers from the graph inputs (``exclude_initializer_from_input``);
5. make inputs/outputs channel-last with a ``Transpose`` next to each
   (``inputs_to_make_channel_last``/``outputs_to_make_channel_last``);
6. name every unnamed node ``qnn_preproc_node_<N>`` (mixed-precision overrides address nodes
   by name).

The model is written, in topological order, only when a step changed it. Not done yet:
onnxruntime's Reshape/Transpose -> ``SpaceToDepth`` fusion.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import helper

from onnxquant.ort.execution_providers.qnn.fusion_lpnorm import FusionLpNormalization
from onnxquant.ort.fusions import FusionGelu, FusionLayerNormalization
from onnxquant.ort.onnx_model import ONNXModel
from onnxquant.preprocess.optimize import optimize_graph

__all__ = ["qnn_preprocess_model"]

logger = logging.getLogger(__name__)

_UNNAMED_PREFIX = "qnn_preproc_node_"
_TRANSPOSE_PREFIX = "Transpose_channel_"


def qnn_preprocess_model(
    model_input: str | os.PathLike | onnx.ModelProto,
    model_output: str | os.PathLike,
    exclude_initializer_from_input: bool = False,
    fuse_layernorm: bool = False,
    save_as_external_data: bool = False,
    all_tensors_to_one_file: bool = False,
    external_data_location: str | None = None,
    external_data_size_threshold: int = 1024,
    external_data_convert_attribute: bool = False,
    inputs_to_make_channel_last: Sequence[str] | None = None,
    outputs_to_make_channel_last: Sequence[str] | None = None,
    dynamic_input_shapes: Sequence[tuple[str, str]] | None = None,
) -> bool:
    """Pre-process ``model_input`` for QNN and write it to ``model_output`` if anything changed.

    Args:
        model_input: The float model (path or proto; a proto is not modified).
        model_output: Where the pre-processed model goes (only written when this returns True).
        exclude_initializer_from_input: Remove initializers from the graph inputs.
        fuse_layernorm: Fuse ReduceMean sequences into ``LayerNormalization`` (opset >= 17).
        save_as_external_data: Write tensors to external data.
        all_tensors_to_one_file: With external data: one file (``external_data_location``).
        external_data_location: With external data: the file name, relative to the model
            (default ``<output file name>.data``).
        external_data_size_threshold: With external data: smallest tensor size moved out.
        external_data_convert_attribute: With external data: attribute tensors move out too.
        inputs_to_make_channel_last: Graph inputs of shape (N, C, D1..Dn) to take as
            (N, D1..Dn, C); a Transpose after each restores the original layout.
        outputs_to_make_channel_last: Graph outputs to give as (N, D1..Dn, C).
        dynamic_input_shapes: ``[(input name, "1,3,224,224"), ...]``: fixed input shapes.

    Returns:
        Whether a new model was written.

    Raises:
        ValueError: An input/output to make channel-last is missing or of rank below 3, or an
            input of ``dynamic_input_shapes`` is missing.
    """
    model = _load(model_input)
    modified = _fix_input_shapes(model, dynamic_input_shapes or [])
    model = _optimize(model)
    onnx_model = ONNXModel(model)
    modified |= _fuse(onnx_model, fuse_layernorm)
    if exclude_initializer_from_input:
        modified |= _exclude_initializers_from_inputs(model)
    if inputs_to_make_channel_last or outputs_to_make_channel_last:
        _make_channel_last(onnx_model, inputs_to_make_channel_last or [],
                           outputs_to_make_channel_last or [])
        modified = True
    modified |= _name_nodes(onnx_model)
    if modified:
        onnx_model.topological_sort()
        location = external_data_location or f"{Path(model_output).name}.data"
        onnx.save_model(model, os.fspath(model_output), save_as_external_data=save_as_external_data,
                        all_tensors_to_one_file=all_tensors_to_one_file, location=location,
                        size_threshold=external_data_size_threshold,
                        convert_attribute=external_data_convert_attribute)
    return modified


def _load(model_input: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model_input, onnx.ModelProto):
        copied = onnx.ModelProto()
        copied.CopyFrom(model_input)
        return copied
    return onnx.load_model(os.fspath(model_input))


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic optimizations, then ONNX shape inference."""
    result = optimize_graph(ir.from_proto(model))
    if result.report.problem:
        logger.warning("%s", result.report.problem)
    return onnx.shape_inference.infer_shapes(ir.to_proto(result.model))


def _fuse(onnx_model: ONNXModel, fuse_layernorm: bool) -> bool:
    modified = FusionGelu(onnx_model).apply()
    modified |= FusionLpNormalization(onnx_model).apply()
    if fuse_layernorm:
        opset = next((o.version for o in onnx_model.opset_import()
                      if o.domain in ("", "ai.onnx")), 0)
        if opset < 17:
            logger.warning("not fusing LayerNormalization: it needs ONNX opset 17, the model "
                           "imports opset %d", opset)
        else:
            modified |= FusionLayerNormalization(onnx_model).apply()
    return modified


def _fix_input_shapes(model: onnx.ModelProto, shapes: Sequence[tuple[str, str]]) -> bool:
    inputs = {v.name: v for v in model.graph.input}
    for name, text in shapes:
        if name not in inputs:
            raise ValueError(f"dynamic_input_shapes names '{name}', which is not a graph input "
                             f"(inputs: {sorted(inputs)})")
        dims = [int(d) for d in text.replace(" ", "").split(",") if d]
        shape = inputs[name].type.tensor_type.shape
        shape.ClearField("dim")
        for dim in dims:
            shape.dim.add().dim_value = dim
    return bool(shapes)


def _exclude_initializers_from_inputs(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in inits]
    if len(kept) == len(model.graph.input):
        return False
    model.graph.ClearField("input")
    model.graph.input.extend(kept)
    return True


def _unique(onnx_model: ONNXModel, base: str) -> str:
    graph = onnx_model.graph()
    taken = {n for node in graph.node for n in node.output}
    taken |= {v.name for v in (*graph.input, *graph.output)} | onnx_model.get_initializer_name_set()
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _rank(info: onnx.ValueInfoProto, kind: str) -> int:
    tensor_type = info.type.tensor_type
    rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else 0
    if rank < 3:
        shown = rank if tensor_type.HasField("shape") else "unknown"
        raise ValueError(f"Expected {kind} '{info.name}' to be of rank >= 3 to make it "
                         f"channel-last, but its rank is {shown}")
    return rank


def _permute_dims(info: onnx.ValueInfoProto, perm: list[int]) -> None:
    shape = info.type.tensor_type.shape
    dims = [onnx.TensorShapeProto.Dimension() for _ in perm]
    for new, old in zip(dims, perm, strict=True):
        new.CopyFrom(shape.dim[old])
    shape.ClearField("dim")
    shape.dim.extend(dims)


def _make_channel_last(onnx_model: ONNXModel, inputs: Sequence[str],
                       outputs: Sequence[str]) -> None:
    """Transpose the named graph inputs/outputs to channel-last, keeping their names."""
    found_in = [_find(onnx_model.find_graph_input(n), n, "input") for n in inputs]
    found_out = [_find(onnx_model.find_graph_output(n), n, "output") for n in outputs]
    ranks = [_rank(v, "input") for v in found_in] + [_rank(v, "output") for v in found_out]
    suffix = onnx_model.get_largest_node_name_suffix(_TRANSPOSE_PREFIX) + 1
    for info, rank in zip(found_in + found_out, ranks, strict=True):
        to_last = [0, *range(2, rank), 1]
        to_first = [0, rank - 1, *range(1, rank - 1)]
        inner = _unique(onnx_model, f"{info.name}_chanfirst")
        node_name = f"{_TRANSPOSE_PREFIX}{suffix}"
        suffix += 1
        if any(info is v for v in found_in):
            onnx_model.replace_input_of_all_nodes(info.name, inner)
            transpose = helper.make_node("Transpose", [info.name], [inner], name=node_name,
                                         perm=to_first)
        else:
            onnx_model.replace_output_of_all_nodes(info.name, inner)
            onnx_model.replace_input_of_all_nodes(info.name, inner)
            transpose = helper.make_node("Transpose", [inner], [info.name], name=node_name,
                                         perm=to_last)
        _permute_dims(info, to_last)
        onnx_model.add_node(transpose)


def _find(info: onnx.ValueInfoProto | None, name: str, kind: str) -> onnx.ValueInfoProto:
    if info is None:
        raise ValueError(f"cannot make '{name}' channel-last: it is not a graph {kind}")
    return info


def _name_nodes(onnx_model: ONNXModel) -> bool:
    """Name every unnamed node but Constants ``qnn_preproc_node_<N>``."""
    suffix = onnx_model.get_largest_node_name_suffix(_UNNAMED_PREFIX) + 1
    renamed = False
    for node in onnx_model.nodes():
        if node.op_type != "Constant" and not node.name:
            node.name = f"{_UNNAMED_PREFIX}{suffix}"
            suffix += 1
            renamed = True
            logger.info("named an unnamed %s node '%s'", node.op_type, node.name)
    return renamed
