"""Graph preparation before quantization.

Each step is a small function over an ``onnx_ir.Model`` that returns whether it changed the
model: unique names, weights held in ``Constant`` nodes lifted to initializers (paddle2onnx and
other exporters keep every weight in a Constant node), Conv+BatchNormalization folding, and
ONNX shape inference for element types.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    NameFixPass,
    ShapeInferencePass,
)

from onnxquant.core.external_data import read_array
from onnxquant.core.graph import add_initializer, record_stands_for
from onnxquant.preprocess.contrib_types import infer_contrib_types
from onnxquant.preprocess.conv_add import fold_conv_add

BATCHNORM_FOLDED = "onnxquant.batchnorm_folded"
"""``value.meta`` key set on Conv weights that have a BatchNormalization folded into them: their
output channels carry BatchNorm's per-channel scale, so per-tensor quantization wastes levels on
them (static quantization uses per-channel scales there, which QLinearConv and Q/DQ fusions apply
for free; dynamic quantization does not: ConvInteger's per-channel rescale is a broadcast Mul that
measured 6 % slower on rapidocr_cls_v2 at the same accuracy)."""

__all__ = ["BATCHNORM_FOLDED", "prepare", "prepare_for_quantization", "fix_names",
           "lift_constants", "fold_batchnorm", "infer_types", "annotated_values",
           "drop_inferred_shapes"]

logger = logging.getLogger(__name__)


def prepare_for_quantization(model: ir.Model, *, fold_bn: bool = True) -> set[int]:
    """Every preparation step, then the graphs sorted; returns :func:`annotated_values` of
    the model as it was (pass them to :func:`drop_inferred_shapes` before saving)."""
    annotated = annotated_values(model)
    prepare(model, fold_bn=fold_bn)
    for graph in (model.graph, *model.graph.subgraphs()):
        graph.sort()
    return annotated


def prepare(model: ir.Model, *, fold_bn: bool = True) -> None:
    """Run every preparation step on ``model`` in place."""
    fix_names(model)
    lift_constants(model)
    if fold_bn:
        count = fold_batchnorm(model)
        if count:
            logger.info("folded %d BatchNormalization nodes into their Conv", count)
    fold_conv_add(model)
    infer_types(model)


def _intermediates(model: ir.Model) -> list[ir.Value]:
    return [v for n in ir.traversal.RecursiveGraphIterator(model.graph) for v in n.outputs
            if not v.is_graph_output()]


def annotated_values(model: ir.Model) -> set[int]:
    """Ids of the intermediate values that already carry a shape (call before :func:`prepare`).

    Pass the result to :func:`drop_inferred_shapes` before saving: the shapes our own shape
    inference adds are for analysis only, and written into the output they change
    onnxruntime's fusions for the worse (measured: minilm_l6 fuses Add + LayerNormalization into
    the slower SkipLayerNormalization, 10-25 % slower in dynamic and static QOperator form).
    """
    return {id(v) for v in _intermediates(model) if v.shape is not None}


def drop_inferred_shapes(model: ir.Model, annotated: set[int]) -> None:
    """Remove the shapes of intermediate values that were not in :func:`annotated_values`."""
    for value in _intermediates(model):
        if id(value) not in annotated:
            value.shape = None


def fix_names(model: ir.Model) -> bool:
    """Give every node and value a unique, non-empty name (the plan is keyed by names)."""
    return NameFixPass()(model).modified


def lift_constants(model: ir.Model) -> bool:
    """Turn tensor-valued ``Constant`` nodes (also inside subgraphs) into initializers."""
    return LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model).modified


def infer_types(model: ir.Model) -> bool:
    """Fill in element types and shapes with ONNX shape inference (best effort), through
    onnxruntime's contrib ops too (:mod:`onnxquant.preprocess.contrib_types`: ONNX has no
    schema for them, so the types after a fused SkipLayerNormalization would stay unknown)."""
    modified = False
    for _ in range(CONTRIB_ROUNDS):
        try:
            modified |= ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(
                model
            ).modified
        except Exception as err:  # shape inference failing must not stop quantization
            logger.warning("ONNX shape inference failed (%s); element types come from the model",
                           err)
            return modified
        if not infer_contrib_types(model):
            break
        modified = True
    return modified


CONTRIB_ROUNDS = 4
"""Rounds of ONNX shape inference and contrib-op typing (each round carries the types past one
more layer of contrib ops whose inputs were untyped before)."""


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return read_array(value.const_value)


def fold_batchnorm(model: ir.Model) -> int:
    """Fold ``BatchNormalization`` (inference mode) into a preceding ``Conv``.

    The Conv must be its only consumer, have constant weights (and bias) and the BatchNorm
    constant parameters. New weight/bias initializers are created; the originals are left to
    the unused-initializer cleanup. Returns the number of folded nodes.
    """
    count = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for bn in list(graph):
            if bn.op_type == "BatchNormalization" and bn.domain in ("", "ai.onnx"):
                count += _fold_one(model, graph, bn)
    return count


def _fold_one(model: ir.Model, graph: ir.Graph, bn: ir.Node) -> int:
    x = bn.inputs[0]
    conv = x.producer() if x is not None else None
    if x is None or conv is None or conv.op_type != "Conv" or conv.graph is not graph:
        return 0
    if len(x.uses()) != 1 or x.is_graph_output() or len(bn.outputs) != 1:
        return 0
    params = [_const_array(v) for v in bn.inputs[1:5]]
    weight = _const_array(conv.inputs[1])
    bias_in = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = _const_array(bias_in) if bias_in is not None else None
    if weight is None or any(p is None for p in params) or (bias_in is not None and bias is None):
        return 0
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
    eps_attr = bn.attributes.get("epsilon")
    eps = eps_attr.as_float() if eps_attr is not None else 1e-5
    factor = gamma / np.sqrt(var + eps)
    w = weight.astype(np.float64) * factor.reshape(-1, *([1] * (weight.ndim - 1)))
    b = (bias.astype(np.float64) if bias is not None else 0.0) - mean
    b = b * factor + beta
    dtype = weight.dtype
    new_w = add_initializer(graph, f"{conv.name}_bn_weight", w.astype(dtype))
    new_b = add_initializer(graph, f"{conv.name}_bn_bias", np.asarray(b).astype(dtype))
    new_w.meta[BATCHNORM_FOLDED] = True
    inputs = [conv.inputs[0], new_w, new_b]
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    for i, value in enumerate(inputs):
        conv.replace_input_with(i, value)
    y = bn.outputs[0]
    conv_out = conv.outputs[0]
    for i, out in enumerate(graph.outputs):
        if out is y:
            graph.outputs[i] = conv_out
            conv_out.name, y.name = y.name, f"{y.name}_unused"
            conv_out.type = conv_out.type or y.type
            conv_out.shape = conv_out.shape or y.shape
    if conv_out.name != y.name and not y.name.endswith("_unused"):  # type: ignore[union-attr]
        record_stands_for(model, conv_out.name or "", y.name or "")
    y.replace_all_uses_with(conv_out)
    graph.remove(bn, safe=True)
    return 1
