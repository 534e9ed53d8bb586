"""Element types through onnxruntime's contrib ops (``com.microsoft``).

ONNX shape inference knows no ``com.microsoft`` schema, so after a transformer optimizer has
fused SkipLayerNormalization, BiasGelu, Attention, ... every tensor downstream of them has no
element type, and quantization cannot tell that a MatMul reads float32 ("inputs are not
float32"). These ops compute in the element type of their float inputs; the exceptions (integer
outputs such as EmbedLayerNormalization's mask index) are listed in :data:`INTEGER_OUTPUTS`.
:func:`infer_contrib_types` types their outputs so that ONNX shape inference can carry the types
on through the standard ops after them.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["infer_contrib_types", "INTEGER_OUTPUTS"]

CONTRIB_DOMAIN = "com.microsoft"
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)

INTEGER_OUTPUTS: dict[tuple[str, int], ir.DataType] = {
    ("EmbedLayerNormalization", 1): ir.DataType.INT32,  # mask_index
}
"""Contrib-op outputs of a fixed integer type: (op type, output index) -> type."""

NOT_FLOAT_OPS = frozenset({
    "DynamicQuantizeMatMul", "MatMulInteger16", "QAttention", "QEmbedLayerNormalization",
    "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearSoftmax",
    "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearWhere",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLSTM", "MatMulIntegerToFloat",
    "QLinearConv", "QOrderedAttention", "QOrderedGelu", "QOrderedLayerNormalization",
    "QOrderedLongformerAttention", "QOrderedMatMul",
})
"""Contrib ops whose outputs do not simply follow a float input (quantized forms): left
alone."""


def _float_input_type(node: ir.Node) -> ir.DataType | None:
    for value in node.inputs:
        if value is not None and value.dtype in FLOATS:
            return value.dtype
    return None


def infer_contrib_types(model: ir.Model) -> int:
    """Give the untyped outputs of ``com.microsoft`` ops the element type of their first float
    input (or their fixed integer type); returns how many outputs were typed. Ops of unknown
    kind (quantized forms) and ops without a typed float input are left alone."""
    typed = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            if node.domain != CONTRIB_DOMAIN or node.op_type in NOT_FLOAT_OPS:
                continue
            float_type = _float_input_type(node)
            for index, value in enumerate(node.outputs):
                if value.dtype is not None or not value.name:
                    continue
                dtype = INTEGER_OUTPUTS.get((node.op_type, index), float_type)
                if dtype is None:
                    continue
                value.dtype = dtype
                typed += 1
    return typed
