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

from onnxquant.calibration.cache import load_cache, save_cache
from onnxquant.calibration.evaluation import HoldBack, evaluate_quantized
from onnxquant.calibration.histogram import HistogramObserver
from onnxquant.calibration.methods import distribution_stats
from onnxquant.calibration.runner import (
    CalibrationResult,
    calibrate_ranges,
    first_feeds,
    ranges_from_statistics,
)
from onnxquant.calibration.settings import CalibrationMethod, tensor_range
from onnxquant.core import front_door, model_io
from onnxquant.core.errors import CalibrationError
from onnxquant.core.float_scales import std_range
from onnxquant.core.graph import HALF_QDQ_OPSET, has_half_values
from onnxquant.core.model_io import clone_model
from onnxquant.preprocess import passes as preprocess
from onnxquant.preprocess.hints import preprocessing_hints
from onnxquant.static import _overrides
from onnxquant.static._latency_guard import guard_enabled, guard_latency
from onnxquant.static.config import StaticQuantConfig
from onnxquant.static.corrections.equalization import equalize_layers
from onnxquant.static.corrections.pipeline import (
    correct_float_model,
    correct_planned_biases,
    corrected_calibration,
    note_corrected_biases,
)
from onnxquant.static.planner import (
    build_plan,
    forced_nodes,
    select_nodes,
    tensors_to_calibrate,
)
from onnxquant.static.result import QuantizationResult
from onnxquant.static.verify import emit_verified

__all__ = ["QuantizationResult", "quantize_static", "calibrate", "calibrate_prepared",
           "plan_ranges"]

logger = logging.getLogger(__name__)


def prepare_model(model_input: Any, config: StaticQuantConfig) -> ir.Model:
    """Load, check and prepare a private copy of the model for quantization."""
    model, _ = front_door.open_model(model_input, upgrade_opset=config.upgrade_opset)
    model = _at_opset(model, config)
    preprocess.prepare_for_quantization(model, fold_bn=config.fold_batchnorm)
    return model


def _at_opset(model: ir.Model, config: StaticQuantConfig) -> ir.Model:
    required = config.required_opset()
    if has_half_values(model):
        required = max(required, HALF_QDQ_OPSET)  # float16 QuantizeLinear/DequantizeLinear
    if model_io.default_opset(model) < required:
        return model_io.convert_opset(model, required)
    return model


def _calibrate(model: ir.Model, nodes: list, data: Any, config: StaticQuantConfig, *,
               for_check: bool = True, hold_back: HoldBack | None = None
               ) -> CalibrationResult:
    """Ranges from the data or the cache; with ``for_check``, the first feeds are kept for the
    finiteness check after emission (``config.verify_finite``); ``hold_back`` sets feeds
    aside for measuring the accuracy."""
    names = tensors_to_calibrate(nodes, config.format, forced_nodes(nodes, config))
    names |= _overrides.convert_tensors(nodes, config)
    settings = config.calibration_settings()
    cache = config.calibration_cache
    keep = config.verify_feeds if config.verify_finite and for_check else 0
    if config.needs_correction_feeds and for_check:
        keep = max(keep, config.correction_feeds)
    if for_check and guard_enabled(config):
        keep = max(keep, 1)  # the latency guard times the models on it
    if cache is not None and Path(cache).exists():
        statistics, samples = load_cache(cache, settings, names)
        logger.info("calibration statistics loaded from '%s'", cache)
        cached = ranges_from_statistics(statistics, samples, settings)
        cached.feeds = _feeds_for_check(model, data, keep, hold_back)
        return cached
    if data is None:
        raise CalibrationError(
            "no calibration data was given (and no calibration cache exists); pass a reader, "
            "an iterable of {input_name: array} dicts or a data folder")
    result = calibrate_ranges(
        model, names, data, settings=settings, providers=config.providers,
        max_samples=config.max_calibration_samples, progress=config.progress,
        workers=config.calibration_workers, keep_feeds=keep, hold_back=hold_back,
        backend=config.calibration_backend, ray_address=config.ray_address)
    if cache is not None:
        save_cache(cache, result.statistics, result.samples, settings)
    return result


def calibrate_prepared(model: ir.Model, nodes: list, data: Any, config: StaticQuantConfig, *,
                       hold_back: HoldBack | None = None) -> CalibrationResult:
    """Calibrate a prepared model's selected nodes as :func:`quantize_static` does (cache,
    workers, the feeds kept for the finiteness check, ``hold_back``)."""
    return _calibrate(model, nodes, data, config, hold_back=hold_back)


def plan_ranges(calibration: CalibrationResult, config: StaticQuantConfig
                ) -> dict[str, tuple[float, float]]:
    """The ranges to plan with: the calibrated ones, except that a tensor overridden to a wider
    type than the config's activations takes its min/max range (histogram methods clip for
    the narrow grid; 16 bits resolve the whole range)."""
    ranges = dict(calibration.ranges)
    bits = config.activation_type.bits
    minmax = dataclasses.replace(config.calibration_settings(),
                                 method=CalibrationMethod.MINMAX)
    for name, override in config.tensors.items():
        observer = calibration.statistics.get(name)
        if (override.quant_type is None or override.quant_type.bits <= bits
                or observer is None or not observer.observed):
            continue
        ranges[name] = tensor_range(observer, minmax)
    if config.float8_from_std:
        ranges.update(_float8_ranges(calibration, config))
    return ranges


def _float8_ranges(calibration: CalibrationResult, config: StaticQuantConfig
                   ) -> dict[str, tuple[float, float]]:
    """Distribution calibration with float8 activations (onnxruntime's rule): the range whose
    float8 scale is ``std / std(float8 grid)``, from each tensor's standard deviation."""
    ranges = {}
    for name, observer in calibration.statistics.items():
        override = config.tensors.get(name)
        if override is not None and override.quant_type is not None:
            continue
        if isinstance(observer, HistogramObserver) and observer.moments and observer.observed:
            low, high = std_range(distribution_stats(observer)[1], config.activation_type)
            ranges[name] = (float(low), float(high))
    return ranges


def _feeds_for_check(model: ir.Model, data: Any, count: int,
                     hold_back: HoldBack | None) -> list[dict]:
    """The first feeds of ``data`` for the finiteness check when statistics came from a
    cache (none when there is no data or it does not fit the model), and the feeds
    ``hold_back`` takes for measuring the accuracy."""
    if data is None or (count <= 0 and hold_back is None):
        return []
    try:
        return first_feeds(model, data, count, hold_back)
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
    *,
    eval_data: Any = None,
    target: Any = None,
) -> QuantizationResult:
    """Quantize a float model statically (QDQ or QOperator format, see ``config.format``).

    After writing, the quantized model's outputs are compared with the float model's
    (``result.fidelity``: SQNR, cosine, argmax agreement per output) on ``eval_data`` when
    given; otherwise every 10th calibration feed (at most 16) is held back from calibration
    for this (with fewer than 10 feeds, the first calibration feeds are used and the summary
    says so). ``config.evaluate=False`` turns this off. ``config.progress=True`` shows
    progress bars; ``result.summary()`` returns the text ``onnxquant static`` prints.

    Args:
        model_input: Path, ``onnx.ModelProto`` or ``onnx_ir.Model`` (never modified).
        model_output: Where to write the quantized model (atomically; never the input path).
        calibration_data: A reader with ``get_next()`` (ORT style), an iterable of
            ``{input_name: array}`` dicts, or a folder of ``.npz`` files / ONNX test-data sets.
        config: Settings; defaults to ``StaticQuantConfig()`` (U8S8 QDQ, MinMax, per tensor).
        eval_data: Feeds to measure the accuracy on (same kinds as ``calibration_data``);
            when given, no calibration feed is held back.
        target: An :class:`onnxquant.AccuracyTarget`: search for a model that meets it
            (``result.target`` says whether it did, with every candidate tried).

    Returns:
        A :class:`QuantizationResult` with the plan, the files written and the fidelity.

    Raises:
        onnxquant.core.errors.QuantizationError: With a message naming the file, node, tensor or
            input at fault. Nothing is written on failure — except that a FeedError or
            EvaluationError from ``eval_data`` comes after the model was written.
    """
    config = config or StaticQuantConfig()
    if target is not None:  # onnxquant.AccuracyTarget: the search lives in onnxquant.target
        return target.quantize(model_input, model_output, calibration_data, config, eval_data)
    start = time.perf_counter()
    entry = front_door.enter(model_input, model_output, upgrade_opset=config.upgrade_opset,
                             min_opset=config.required_opset())
    model = _at_opset(entry.model, config)
    _overrides.check_names(model, config)
    annotated = preprocess.prepare_for_quantization(model, fold_bn=config.fold_batchnorm)
    float_bytes = entry.source.float_bytes(model)  # after Constant weights became initializers
    hints = preprocessing_hints(model)
    if config.equalize_layers:  # data-free: calibrate the equalized model
        equalize_layers(model)
    nodes = select_nodes(model, config)
    hold_back = HoldBack() if config.evaluate and eval_data is None else None
    calibration = _calibrate(model, nodes, calibration_data, config, hold_back=hold_back)
    settings = config.calibration_settings()
    calibration = corrected_calibration(calibration, correct_float_model(
        model, config, calibration.feeds, settings, equalize=False), settings)
    ranges = plan_ranges(calibration, config)
    plan = build_plan(nodes, ranges, config)
    if correct_planned_biases(model, plan, config, calibration.feeds):
        plan = build_plan(nodes, ranges, config)
        note_corrected_biases(model, plan)
    checked = dataclasses.replace(calibration, feeds=calibration.feeds[:config.verify_feeds])
    pristine = clone_model(model) if guard_enabled(config) else None
    planned = plan
    model, plan = emit_verified(model, plan, checked, config, annotated=annotated,
                                ranges=ranges)
    if pristine is not None:  # never slower than float: time both models, re-plan if slower
        model, plan = guard_latency(pristine, model, plan, planned, checked, config,
                                    ranges=ranges, annotated=annotated)
        del pristine
    preprocess.drop_inferred_shapes(model, annotated)
    written = model_io.save_model(model, entry.output, external_data=config.external_data)
    del model
    fidelity = None
    if config.evaluate or eval_data is not None:
        fidelity = evaluate_quantized(
            model_input, written[0], eval_data=eval_data, hold_back=hold_back,
            data_path=calibration_data, float_bytes=float_bytes, providers=config.providers,
            progress=config.progress)
    return QuantizationResult(
        plan=plan,
        output_files=written,
        float_bytes=float_bytes,
        quantized_bytes=sum(p.stat().st_size for p in written),
        calibration_samples=calibration.samples,
        seconds=time.perf_counter() - start,
        unobserved=calibration.unobserved,
        fidelity=fidelity,
        hints=hints,
    )
