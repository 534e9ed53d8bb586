"""Names of ``onnxruntime.quantization.quant_utils``: enums with the same member names and integer
values, the numeric helpers (:mod:`onnxquant.ort._quant_numerics`) and
:func:`write_calibration_table` (:mod:`onnxquant.ort._trt_table`).

Each enum prints as its member name and has ``from_string`` (exact member name first, then
case-insensitive, so ``"QUInt8"`` and the CLI spelling ``"quint8"`` both work).
"""

from __future__ import annotations

import enum
import os
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto

from onnxquant.core import qtypes
from onnxquant.ort._errors import InvalidOptionError
from onnxquant.ort._quant_numerics import (
    FLOAT8_TYPES,
    MODEL_SIZE_THRESHOLD,
    ONNX_TYPE_TO_NP_TYPE,
    compute_scale_zp,
    compute_scale_zp_float8,
    get_qmin_qmax_for_qType,
    get_qrange_for_qType,
    pack_bytes_to_4bit,
    quantize_data,
    quantize_nparray,
)
from onnxquant.ort._quant_utils_extra import (
    add_infer_metadata,
    compute_scale_zp_blocked,
    get_opset_version,
    model_has_external_data,
    model_has_infer_metadata,
    ms_domain,
    quantize_onnx_initializer,
    snap_zero_point_to_uint8,
    update_opset_version,
)
from onnxquant.ort._trt_table import write_calibration_table

__all__ = [
    "QuantType",
    "QuantFormat",
    "QuantizationMode",
    "load_model_with_shape_infer",
    "write_calibration_table",
    "FLOAT8_TYPES",
    "MODEL_SIZE_THRESHOLD",
    "ONNX_TYPE_TO_NP_TYPE",
    "compute_scale_zp",
    "compute_scale_zp_float8",
    "get_qmin_qmax_for_qType",
    "get_qrange_for_qType",
    "pack_bytes_to_4bit",
    "quantize_data",
    "quantize_nparray",
    "add_infer_metadata",
    "compute_scale_zp_blocked",
    "get_opset_version",
    "model_has_external_data",
    "model_has_infer_metadata",
    "ms_domain",
    "quantize_onnx_initializer",
    "snap_zero_point_to_uint8",
    "update_opset_version",
]


def _member(cls: type[enum.Enum], text: str) -> enum.Enum:
    if text in cls.__members__:
        return cls[text]
    folded = {name.lower(): member for name, member in cls.__members__.items()}
    key = str(text).strip().lower()
    if key in folded:
        return folded[key]
    raise InvalidOptionError(
        f"unknown {cls.__name__} {text!r}; choose one of {', '.join(cls.__members__)}"
    )


class QuantType(enum.Enum):
    """Quantized element type, as in onnxruntime (``QInt8`` = 0 … ``QUInt4`` = 6)."""

    QInt8 = 0
    QUInt8 = 1
    QFLOAT8E4M3FN = 2
    QInt16 = 3
    QUInt16 = 4
    QInt4 = 5
    QUInt4 = 6

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def from_string(t: str) -> QuantType:
        """Returns the member named ``t`` (e.g. ``"QUInt8"`` or ``"quint8"``).

        Raises:
            ValueError: (an :class:`~onnxquant.core.errors.QuantizationError`) for an unknown name.
        """
        return _member(QuantType, t)  # type: ignore[return-value]

    @property
    def tensor_type(self) -> int:
        """The ONNX ``TensorProto`` element type (``TensorProto.INT8`` …)."""
        return _TENSOR_TYPES[self]

    @property
    def qtype(self) -> qtypes.QuantType:
        """The onnxquant value object for this type (``onnxquant.INT8`` …)."""
        return _QTYPES[self]


_QTYPES = {
    QuantType.QInt8: qtypes.INT8,
    QuantType.QUInt8: qtypes.UINT8,
    QuantType.QFLOAT8E4M3FN: qtypes.FLOAT8E4M3FN,
    QuantType.QInt16: qtypes.INT16,
    QuantType.QUInt16: qtypes.UINT16,
    QuantType.QInt4: qtypes.INT4,
    QuantType.QUInt4: qtypes.UINT4,
}
_TENSOR_TYPES = {
    QuantType.QInt8: TensorProto.INT8,
    QuantType.QUInt8: TensorProto.UINT8,
    QuantType.QFLOAT8E4M3FN: TensorProto.FLOAT8E4M3FN,
    QuantType.QInt16: TensorProto.INT16,
    QuantType.QUInt16: TensorProto.UINT16,
    QuantType.QInt4: TensorProto.INT4,
    QuantType.QUInt4: TensorProto.UINT4,
}


class QuantFormat(enum.Enum):
    """Output representation: ``QOperator`` = 0 (QLinear* operators), ``QDQ`` = 1."""

    QOperator = 0
    QDQ = 1

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def from_string(format: str) -> QuantFormat:  # noqa: A002 - onnxruntime's parameter name
        """Returns the member named ``format`` (case-insensitive fallback).

        Raises:
            ValueError: (an :class:`~onnxquant.core.errors.QuantizationError`) for an unknown name.
        """
        return _member(QuantFormat, format)  # type: ignore[return-value]


class QuantizationMode(enum.Enum):
    """onnxruntime's quantizer mode: ``IntegerOps`` = 0 (dynamic), ``QLinearOps`` = 1 (static)."""

    IntegerOps = 0
    QLinearOps = 1

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def from_string(mode: str) -> QuantizationMode:
        """Returns the member named ``mode`` (case-insensitive fallback).

        Raises:
            ValueError: (an :class:`~onnxquant.core.errors.QuantizationError`) for an unknown name.
        """
        return _member(QuantizationMode, mode)  # type: ignore[return-value]


def load_model_with_shape_infer(model_path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model with ONNX shape inference applied (external data loaded too).

    Inference runs file to file (``infer_shapes_path``), so models above 2 GB work; the
    inferred copy lives in a private temporary folder that is always removed. The model is
    marked as inferred in its metadata (:func:`model_has_infer_metadata`).

    Raises:
        onnxquant.core.errors.ModelLoadError: The file is missing, its external data lies outside
            its folder, or shape inference fails.
        onnxquant.core.errors.UnsupportedModelError: The model is invalid.
    """
    from onnx.external_data_helper import load_external_data_for_model

    from onnxquant.core.errors import ModelLoadError
    from onnxquant.core.front_door import open_model

    path = Path(model_path)
    open_model(path)  # the front door: valid, and its external data inside its folder
    with tempfile.TemporaryDirectory(prefix="onnxquant-") as tmp:
        inferred = Path(tmp) / path.name
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
            model = onnx.load(str(inferred), load_external_data=False)
        except Exception as err:  # onnx raises several unrelated types
            raise ModelLoadError(
                f"shape inference failed on '{path}': {err}; check the model with "
                "onnx.checker.check_model") from err
    load_external_data_for_model(model, str(path.parent))
    add_infer_metadata(model)
    return model
