"""The native entry point: ``quantize_static`` (load → prepare → select → calibrate → plan →
emit → save)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxquant import preprocess
from onnxquant.calibration.cache import load_cache, save_cache
from onnxquant.calibration.runner import (
    CalibrationResult,
    calibrate_ranges,
    first_feeds,
    ranges_from_statistics,
)
from onnxquant.core import front_door, model_io
from onnxquant.core.errors import CalibrationError
from onnxquant.core.plan import QuantPlan
from onnxquant.static.config import StaticQuantConfig
from onnxquant.static.planner import build_plan, select_nodes, tensors_to_calibrate
from onnxquant.static.verify import emit_verified

__all__ = ["QuantizationResult", "quantize_static", "calibrate"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantizationResult:
    """What a quantization run did.

    Attributes:
        plan: Every decision and parameter.
        output_files: Paths written (model, then external data if any).
        float_bytes: Size of the input model (file plus external data; tensors when in memory).
        quantized_bytes: Size of the written files.
        calibration_samples: Number of feeds used.
        seconds: Wall time of the whole run.
        unobserved: Tensors that calibration could not observe (they stay float).
    """

    plan: QuantPlan
    output_files: list[Path]
    float_bytes: int
    quantized_bytes: int
    calibration_samples: int
    seconds: float
    unobserved: list[str]


def prepare_model(model_input: Any, config: StaticQuantConfig) -> ir.Model:
    """Load, check and prepare a private copy of the model for quantization."""
    model, _ = front_door.open_model(model_input, upgrade_opset=config.upgrade_opset)
    model = _at_opset(model, config)
    preprocess.prepare_for_quantization(model, fold_bn=config.fold_batchnorm)
    return model


def _at_opset(model: ir.Model, config: StaticQuantConfig) -> ir.Model:
    required = config.required_opset()
    if model_io.default_opset(model) < required:
        return model_io.convert_opset(model, required)
    return model


def _calibrate(model: ir.Model, nodes: list, data: Any, config: StaticQuantConfig, *,
               for_check: bool = True) -> CalibrationResult:
    """Ranges from the data or the cache; with ``for_check``, the first feeds are kept for the
    finiteness check after emission (``config.verify_finite``)."""
    names = tensors_to_calibrate(nodes, config.format)
    settings = config.calibration_settings()
    cache = config.calibration_cache
    keep = config.verify_feeds if config.verify_finite and for_check else 0
    if cache is not None and Path(cache).exists():
        statistics, samples = load_cache(cache, settings, names)
        logger.info("calibration statistics loaded from '%s'", cache)
        cached = ranges_from_statistics(statistics, samples, settings)
        cached.feeds = _feeds_for_check(model, data, keep)
        return cached
    if data is None:
        raise CalibrationError(
            "no calibration data was given (and no calibration cache exists); pass a reader, "
            "an iterable of {input_name: array} dicts or a data folder")
    result = calibrate_ranges(
        model, names, data, settings=settings, providers=config.providers,
        max_samples=config.max_calibration_samples, progress=config.progress,
        workers=config.calibration_workers, keep_feeds=keep)
    if cache is not None:
        save_cache(cache, result.statistics, result.samples, settings)
    return result


def _feeds_for_check(model: ir.Model, data: Any, count: int) -> list[dict]:
    """The first feeds of ``data`` for the finiteness check when statistics came from a
    cache (none when there is no data or it does not fit the model)."""
    if data is None or count <= 0:
        return []
    try:
        return first_feeds(model, data, count)
    except CalibrationError as err:
        logger.warning("finiteness check skipped: the calibration data is unusable (%s)", err)
        return []


def calibrate(
    model_input: model_io.ModelInput,
    calibration_data: Any,
    config: StaticQuantConfig | None = None,
) -> CalibrationResult:
    """Calibrate only: the activation ranges ``quantize_static`` would use with ``config``.

    Args:
        model_input: Path, ``onnx.ModelProto`` or ``onnx_ir.Model`` (never modified).
        calibration_data: A reader, an iterable of feed dicts, a data folder — or None when
            ``config.calibration_cache`` exists.
        config: Settings (method, its parameters, node selection, workers, cache).

    Returns:
        The ranges per tensor, with the statistics they came from.
    """
    config = config or StaticQuantConfig()
    model = prepare_model(model_input, config)
    return _calibrate(model, select_nodes(model, config), calibration_data, config,
                      for_check=False)


def quantize_static(
    model_input: model_io.ModelInput,
    model_output: str | os.PathLike,
    calibration_data: Any,
    config: StaticQuantConfig | None = None,
) -> QuantizationResult:
    """Quantize a float model statically (QDQ or QOperator format, see ``config.format``).

    Args:
        model_input: Path, ``onnx.ModelProto`` or ``onnx_ir.Model`` (never modified).
        model_output: Where to write the quantized model (atomically; never the input path).
        calibration_data: A reader with ``get_next()`` (ORT style), an iterable of
            ``{input_name: array}`` dicts, or a folder of ``.npz`` files / ONNX test-data sets.
        config: Settings; defaults to ``StaticQuantConfig()`` (U8S8 QDQ, MinMax, per tensor).

    Returns:
        A :class:`QuantizationResult` with the plan and the files written.

    Raises:
        onnxquant.core.errors.QuantizationError: With a message naming the file, node, tensor or
            input at fault. Nothing is written on failure.
    """
    config = config or StaticQuantConfig()
    start = time.perf_counter()
    entry = front_door.enter(model_input, model_output, upgrade_opset=config.upgrade_opset,
                             min_opset=config.required_opset())
    model = entry.model
    annotated = preprocess.prepare_for_quantization(model, fold_bn=config.fold_batchnorm)
    float_bytes = entry.source.float_bytes(model)  # after Constant weights became initializers
    nodes = select_nodes(model, config)
    calibration = _calibrate(model, nodes, calibration_data, config)
    plan = build_plan(nodes, calibration.ranges, config)
    model, plan = emit_verified(model, plan, calibration, config, annotated=annotated)
    preprocess.drop_inferred_shapes(model, annotated)
    written = model_io.save_model(model, entry.output, external_data=config.external_data)
    return QuantizationResult(
        plan=plan,
        output_files=written,
        float_bytes=float_bytes,
        quantized_bytes=sum(p.stat().st_size for p in written),
        calibration_samples=calibration.samples,
        seconds=time.perf_counter() - start,
        unobserved=calibration.unobserved,
    )
