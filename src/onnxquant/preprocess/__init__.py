"""Pre-processing: passes over an ``onnx_ir.Model`` with a contract each.

The user-facing step is :func:`preprocess` (also ``onnxquant.preprocess``) with a
:class:`PreprocessConfig`: symbolic shape inference that never aborts
(:func:`infer_symbolic_shapes`), onnxruntime's basic graph optimization (:func:`optimize_graph`)
and ONNX shape inference with data propagation (:func:`infer_onnx_shapes`), each usable alone.

Quantization itself prepares every model with :func:`prepare_for_quantization` (module
:mod:`onnxquant.preprocess.passes`): unique names, Constant weights lifted, BatchNormalization
and constant-Add folding into Conv, element-type inference.
"""

from onnxquant.preprocess.api import PREPROCESSED_KEY, preprocess
from onnxquant.preprocess.config import PreprocessConfig
from onnxquant.preprocess.onnx_shapes import infer_onnx_shapes
from onnxquant.preprocess.optimize import OptimizeResult, optimize_graph
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
from onnxquant.preprocess.report import (
    ShapeCensus,
    StepReport,
    UnknownShapes,
    explain_unknown,
    shape_census,
)
from onnxquant.preprocess.result import PreprocessResult
from onnxquant.preprocess.symbolic_shapes import infer_symbolic_shapes

__all__ = ["preprocess", "PreprocessConfig", "PreprocessResult", "PREPROCESSED_KEY",
           "infer_symbolic_shapes", "optimize_graph", "OptimizeResult", "infer_onnx_shapes",
           "StepReport", "ShapeCensus", "UnknownShapes", "shape_census", "explain_unknown",
           "BATCHNORM_FOLDED", "prepare", "prepare_for_quantization", "fix_names",
           "lift_constants", "fold_batchnorm", "infer_types", "annotated_values",
           "drop_inferred_shapes"]
