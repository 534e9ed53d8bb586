"""onnxruntime's current module name for the weight-only quantizer; the same API as
:mod:`onnxquant.ort.matmul_4bits_quantizer`."""

from __future__ import annotations

from onnxquant.ort.matmul_4bits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    GPTQWeightOnlyQuantConfig,
    HQQWeightOnlyQuantConfig,
    MatMul4BitsQuantizer,
    MatMulNBitsQuantizer,
    RTNWeightOnlyQuantConfig,
    WeightOnlyQuantConfig,
)

__all__ = [
    "WeightOnlyQuantConfig",
    "DefaultWeightOnlyQuantConfig",
    "RTNWeightOnlyQuantConfig",
    "HQQWeightOnlyQuantConfig",
    "GPTQWeightOnlyQuantConfig",
    "MatMulNBitsQuantizer",
    "MatMul4BitsQuantizer",
]
