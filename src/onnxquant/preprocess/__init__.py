"""Graph preparation before quantization: passes over an ``onnx_ir.Model`` with a contract each
(unique names, Constant weights lifted, BatchNormalization and constant-Add folding into Conv,
element-type inference)."""

from onnxquant.preprocess.passes import (
    BATCHNORM_FOLDED,
    annotated_values,
    drop_inferred_shapes,
    fix_names,
    fold_batchnorm,
    infer_types,
    lift_constants,
    prepare,
    prepare_for_quantization,
)

__all__ = ["BATCHNORM_FOLDED", "prepare", "prepare_for_quantization", "fix_names",
           "lift_constants", "fold_batchnorm", "infer_types", "annotated_values",
           "drop_inferred_shapes"]
