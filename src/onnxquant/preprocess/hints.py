"""When pre-processing would help a model being quantized: the hints ``quantize_static`` and
``quantize_dynamic`` print in their summary (nothing for a model ``onnxquant preprocess`` or
onnxruntime's ``quant_pre_process`` already prepared)."""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.core.graph import is_constant
from onnxquant.preprocess.api import PREPROCESSED_KEY

__all__ = ["preprocessing_hints"]

FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _computes_a_float_constant(node: ir.Node) -> bool:
    """A node whose every input is a constant and whose output is float: a weight computed at
    run time (an LSTM weight made by Unsqueeze, a transposed MatMul weight, ...)."""
    if node.op_type == "Constant" or not node.inputs or _subgraphs(node):
        return False
    if not all(v is None or is_constant(v) for v in node.inputs):
        return False
    return any(v.dtype in FLOATS for v in node.outputs)


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    return [a.value for a in node.attributes.values() if isinstance(a.value, ir.Graph)]


def preprocessing_hints(model: ir.Model) -> list[str]:
    """Lines saying what ``onnxquant preprocess`` would improve in ``model`` (a prepared model:
    Constant nodes already lifted, element types inferred); empty when it was pre-processed."""
    if model.metadata_props.get(PREPROCESSED_KEY):
        return []
    hints = []
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    folded = [n for n in nodes if _computes_a_float_constant(n)]
    if folded:
        example = folded[0]
        hints.append(f"{len(folded)} nodes compute float constants at run time (e.g. "
                     f"'{example.name}', {example.op_type}): `onnxquant preprocess` folds them, "
                     "so weights computed this way are quantized too")
    untyped = [(n, v) for n in nodes for v in n.outputs if v.name and v.dtype is None]
    if untyped:
        node, value = untyped[0]
        hints.append(f"{len(untyped)} tensors have no known element type (e.g. '{value.name}' "
                     f"from {node.op_type}), so nodes reading them may stay float: "
                     "`onnxquant preprocess` infers more (--model-type for fused transformers)")
    return hints
