"""``quantize_static``, ``quantize`` and the configs of ``onnxruntime.quantization.quantize``.

The signatures are onnxruntime's (all arguments may be positional, as there). Every option is
translated into one :class:`onnxquant.StaticQuantConfig` by
:func:`onnxquant.ort._options._to_native_config`, whose docstring lists how each ``extra_options``
key is handled; the work is then done by :func:`onnxquant.quantize_static`.

Differences from onnxruntime, on purpose:

* The functions return the :class:`onnxquant.QuantizationResult` (onnxruntime returns ``None``).
* The output path may not be the input path; nothing is written when quantization fails.
* If/Loop/Scan bodies are quantized unless ``extra_options={"EnableSubgraph": False}``.
* ``use_external_data_format=False`` means "decide by size" instead of failing above 2 GB.
* ``quantize_dynamic`` is in :mod:`onnxquant.ort._dynamic`.
* ``QFLOAT8E4M3FN`` with ``QuantFormat.QOperator`` quantizes MatMuls only (com.microsoft
  QLinearMatMul, which onnxruntime's CPU provider cannot run; use QDQ).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from onnxquant.core.model_io import ModelInput
from onnxquant.dynamic.api import DynamicQuantizationResult
from onnxquant.ort._dynamic import quantize_dynamic
from onnxquant.ort._errors import UnsupportedConfigError
from onnxquant.ort._options import _to_native_config
from onnxquant.ort._static_cache import check_calibration_source, quantize_with_cache
from onnxquant.ort.calibrate import CalibrationDataReader, CalibrationMethod, _method
from onnxquant.ort.quant_utils import QuantFormat, QuantType
from onnxquant.static import api
from onnxquant.weight_only.api import WeightOnlyResult

__all__ = ["QuantConfig", "StaticQuantConfig", "DynamicQuantConfig", "quantize_static",
           "quantize_dynamic", "quantize"]


class QuantConfig:
    """Options shared by onnxruntime's static and dynamic configs (``None`` lists become ``[]``).

    Args:
        activation_type: Element type of activations.
        weight_type: Element type of weights.
        op_types_to_quantize: Op types to quantize; empty means all.
        nodes_to_quantize: Node names to quantize; empty means all.
        nodes_to_exclude: Node names to keep float.
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights (for CPUs without VNNI).
        use_external_data_format: Save tensors in ``<output>.data``.
    """

    def __init__(
        self,
        activation_type: QuantType = QuantType.QUInt8,
        weight_type: QuantType = QuantType.QInt8,
        op_types_to_quantize: Collection[str] | None = None,
        nodes_to_quantize: Collection[str] | None = None,
        nodes_to_exclude: Collection[str] | None = None,
        per_channel: bool = False,
        reduce_range: bool = False,
        use_external_data_format: bool = False,
    ) -> None:
        self.op_types_to_quantize = op_types_to_quantize or []
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.weight_type = weight_type
        self.activation_type = activation_type
        self.nodes_to_quantize = nodes_to_quantize or []
        self.nodes_to_exclude = nodes_to_exclude or []
        self.use_external_data_format = use_external_data_format


class StaticQuantConfig(QuantConfig):
    """onnxruntime's static config, for :func:`quantize`; the arguments are those of
    :func:`quantize_static`."""

    def __init__(
        self,
        calibration_data_reader: CalibrationDataReader,
        calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
        quant_format: QuantFormat = QuantFormat.QDQ,
        activation_type: QuantType = QuantType.QInt8,
        weight_type: QuantType = QuantType.QInt8,
        op_types_to_quantize: Collection[str] | None = None,
        nodes_to_quantize: Collection[str] | None = None,
        nodes_to_exclude: Collection[str] | None = None,
        per_channel: bool = False,
        reduce_range: bool = False,
        use_external_data_format: bool = False,
        calibration_providers: Collection[str] | None = None,
        extra_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            activation_type=activation_type,
            weight_type=weight_type,
            op_types_to_quantize=op_types_to_quantize,
            nodes_to_quantize=nodes_to_quantize,
            nodes_to_exclude=nodes_to_exclude,
            per_channel=per_channel,
            reduce_range=reduce_range,
            use_external_data_format=use_external_data_format,
        )
        self.calibration_data_reader = calibration_data_reader
        self.calibrate_method = calibrate_method
        self.quant_format = quant_format
        self.calibration_providers = calibration_providers
        self.extra_options = extra_options or {}


class DynamicQuantConfig(QuantConfig):
    """onnxruntime's dynamic config, for :func:`quantize`; the arguments are those of
    :func:`quantize_dynamic` (activations are always uint8)."""

    def __init__(
        self,
        weight_type: QuantType = QuantType.QInt8,
        op_types_to_quantize: Collection[str] | None = None,
        nodes_to_quantize: Collection[str] | None = None,
        nodes_to_exclude: Collection[str] | None = None,
        per_channel: bool = False,
        reduce_range: bool = False,
        use_external_data_format: bool = False,
        extra_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            weight_type=weight_type,
            op_types_to_quantize=op_types_to_quantize,
            nodes_to_quantize=nodes_to_quantize,
            nodes_to_exclude=nodes_to_exclude,
            per_channel=per_channel,
            reduce_range=reduce_range,
            use_external_data_format=use_external_data_format,
        )
        self.extra_options = extra_options or {}


def quantize_static(
    model_input: ModelInput,
    model_output: str | os.PathLike,
    calibration_data_reader: CalibrationDataReader | None = None,
    quant_format: QuantFormat = QuantFormat.QDQ,
    op_types_to_quantize: Collection[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    activation_type: QuantType = QuantType.QInt8,
    weight_type: QuantType = QuantType.QInt8,
    nodes_to_quantize: Collection[str] | None = None,
    nodes_to_exclude: Collection[str] | None = None,
    use_external_data_format: bool = False,
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
    calibration_providers: Collection[str] | None = None,
    extra_options: Mapping[str, Any] | None = None,
    calibration_cache_path: str | os.PathLike | None = None,
) -> api.QuantizationResult:
    """Quantize a float model statically into QDQ format, with onnxruntime's signature.

    Args:
        model_input: Path or ``onnx.ModelProto`` (never modified).
        model_output: Where to write the quantized model (not the input path).
        calibration_data_reader: A reader with ``get_next()``; any feed source that
            :func:`onnxquant.quantize_static` accepts also works.
        quant_format: ``QuantFormat.QDQ`` or ``QuantFormat.QOperator``.
        op_types_to_quantize: Op types to quantize; ``None`` or empty means all.
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights (for CPUs without VNNI).
        activation_type: Element type of activations.
        weight_type: Element type of weights (QInt8 activations need QInt8 weights).
        nodes_to_quantize: Node names to quantize; ``None`` or empty means all.
        nodes_to_exclude: Node names to keep float.
        use_external_data_format: True: save tensors in ``<output>.data``; False: by size.
        calibrate_method: ``MinMax``, ``Entropy``, ``Percentile`` or ``Distribution``.
        calibration_providers: onnxruntime execution providers used for calibration.
        extra_options: onnxruntime's option keys, see :mod:`onnxquant.ort._options`.
        calibration_cache_path: onnxruntime's JSON calibration cache: its ranges are used
            when it exists and was made with the same ``SmoothQuant`` setting; otherwise
            the ranges are calibrated and written there (see :mod:`onnxquant.ort._static_cache`).

    Returns:
        The :class:`onnxquant.QuantizationResult` of the run.

    Raises:
        onnxquant.core.errors.QuantizationError: Unsupported or invalid options (invalid ones are
            also ``ValueError``), or a failure while quantizing; nothing is written then.
        CalibrationCacheError: (a ``ValueError``) No reader and no usable cache, or a cache
            made with another ``calibrate_method``.
    """
    config = _to_native_config(
        quant_format=quant_format,
        op_types_to_quantize=op_types_to_quantize,
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=activation_type,
        weight_type=weight_type,
        nodes_to_quantize=nodes_to_quantize,
        nodes_to_exclude=nodes_to_exclude,
        use_external_data_format=use_external_data_format,
        calibrate_method=calibrate_method,
        calibration_providers=calibration_providers,
        extra_options=extra_options,
    )
    if calibration_cache_path is not None:
        return quantize_with_cache(model_input, model_output, calibration_data_reader, config,
                                   calibration_cache_path, _method(calibrate_method))
    check_calibration_source(calibration_data_reader, smooth_quant=config.smooth_quant)
    return api.quantize_static(model_input, model_output, calibration_data_reader, config)


_DYNAMIC_FIELDS = (
    "op_types_to_quantize", "per_channel", "reduce_range", "weight_type", "nodes_to_quantize",
    "nodes_to_exclude", "use_external_data_format", "extra_options",
)
_STATIC_FIELDS = (
    "calibration_data_reader", "quant_format", "op_types_to_quantize", "per_channel",
    "reduce_range", "activation_type", "weight_type", "nodes_to_quantize", "nodes_to_exclude",
    "use_external_data_format", "calibrate_method", "calibration_providers", "extra_options",
)


def _is_config(config: object, cls: type, fields: tuple[str, ...]) -> bool:
    """``config`` is our ``cls`` or onnxruntime's class of the same name (with its fields)."""
    return isinstance(config, cls) or (
        type(config).__name__ == cls.__name__ and all(hasattr(config, f) for f in fields))


AnyResult = api.QuantizationResult | DynamicQuantizationResult | WeightOnlyResult


def quantize(
    model_input: ModelInput, model_output: str | os.PathLike, quant_config: QuantConfig
) -> AnyResult:
    """Quantize with a config object, dispatching on its type as onnxruntime does.

    Args:
        model_input: Path or ``onnx.ModelProto``.
        model_output: Where to write the quantized model.
        quant_config: A :class:`StaticQuantConfig`, :class:`DynamicQuantConfig` or weight-only
            config (``matmul_4bits_quantizer.*WeightOnlyQuantConfig``; written with external
            data, as onnxruntime does) — this package's, or onnxruntime's own.

    Returns:
        The :class:`onnxquant.QuantizationResult` of the run (a
        :class:`onnxquant.weight_only.WeightOnlyResult` for weight-only configs).

    Raises:
        UnsupportedConfigError: (a ``TypeError`` and ``QuantizationError``) for unknown
            configs.
    """
    kind = type(quant_config).__name__
    if _is_config(quant_config, DynamicQuantConfig, _DYNAMIC_FIELDS):
        options = {name: getattr(quant_config, name) for name in _DYNAMIC_FIELDS}
        return quantize_dynamic(model_input, model_output, **options)
    if not _is_config(quant_config, StaticQuantConfig, _STATIC_FIELDS):
        from onnxquant.ort.matmul_4bits_quantizer import (
            is_weight_only_config,
            quantize_weight_only,
        )

        if is_weight_only_config(quant_config):
            return quantize_weight_only(model_input, model_output, quant_config)
        raise UnsupportedConfigError(f"quantize() needs a StaticQuantConfig, got {kind}.")
    options = {name: getattr(quant_config, name) for name in _STATIC_FIELDS}
    return quantize_static(model_input, model_output, **options)
