"""Dynamic quantization: weights quantized offline, activation scale and zero point computed
at run time (QOperator form with MatMulInteger/ConvInteger/contrib ops, or QDQ form with a
model-local ``ComputeQuantizationParameters`` function)."""
