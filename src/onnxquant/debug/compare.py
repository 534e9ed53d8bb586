"""``onnxquant.compare``: run a float model and its quantized form side by side and find where
accuracy goes.

One pass over the data runs four onnxruntime sessions per sample — the float model with the
matched tensors exposed, the quantized model as the user runs it (outputs), the quantized model
with its quantized tensors exposed (accumulated error per layer), and the quantized model cut
at every quantized activation and fed the float values (each layer's own error) — and folds
each result into streaming accumulators, so memory does not grow with the number of samples.
Then the layers with the worst isolated error are put back in float one at a time on the first
samples, to measure how much the output SQNR would gain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from onnxquant.calibration.readers import iter_feeds, validate_feed
from onnxquant.calibration.runner import feed_total
from onnxquant.calibration.session import input_specs
from onnxquant.core import front_door, model_io, tempdirs
from onnxquant.core.errors import CalibrationError
from onnxquant.core.metrics import ErrorAccumulator
from onnxquant.debug._runs import Sessions, StreamingHistogram
from onnxquant.debug.matching import Matching, match_models
from onnxquant.debug.report import (
    ActivationStats,
    ComparisonReport,
    LayerStats,
    OutputStats,
)
from onnxquant.debug.sensitivity import MAX_OP_TYPES, Sensitivity, measure_sensitivity

__all__ = ["compare", "SENSITIVITY_VALUES"]

SENSITIVITY_VALUES = 1 << 16
"""Output values (all outputs of all kept samples) a sensitivity measurement aims for."""
MIN_SENSITIVITY_SAMPLES, MAX_SENSITIVITY_SAMPLES = 1, 32
OWN_ERROR_SAMPLES = 4
"""Samples over which an activation's own quantization error (its float values through its
grid alone) is measured: a property of its parameters, stable after a few samples."""

logger = logging.getLogger(__name__)


def compare(
    float_model: model_io.ModelInput,
    quantized_model: model_io.ModelInput,
    data: Any,
    *,
    max_samples: int | None = None,
    layer_samples: int = 8,
    sensitivity_layers: int = 8,
    sensitivity_samples: int | None = None,
    histograms: int = 8,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: bool = False,
) -> ComparisonReport:
    """Compare a quantized model with its float model, layer by layer.

    Args:
        float_model: The float model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``).
        quantized_model: Its quantized form (QDQ or QOperator, made by any tool).
        data: Inputs, in any form calibration takes (reader, iterable of feed dicts, folder).
        max_samples: Compare the outputs on at most this many samples.
        layer_samples: Samples (the first ones) over which layers, weights and activations
            are compared: a layer's error is stable over a few samples of many values each,
            and these runs cost four times an inference.
        sensitivity_layers: How many layers (those with the worst isolated SQNR) to measure
            exactly by putting each back in float; 0 skips the measurement.
        sensitivity_samples: Samples each of those measurements runs (the first ones); by
            default as many as give :data:`SENSITIVITY_VALUES` output values (1 to 32): a
            segmentation map needs one, a two-class classifier all 32.
        histograms: How many of the worst activations get a value histogram.
        providers: onnxruntime execution providers.
        progress: Show a progress bar.

    Returns:
        A :class:`~onnxquant.debug.report.ComparisonReport`.

    Raises:
        ModelLoadError, UnsupportedModelError: A model cannot be loaded or is invalid.
        FeedError, CalibrationError: The data does not fit the float model, or onnxruntime
            fails on a sample.
    """
    start = time.perf_counter()
    float_ir, float_source = front_door.open_model(float_model)
    quant_ir, quant_source = front_door.open_model(quantized_model)
    matching = match_models(float_ir, quant_ir)
    with tempdirs.private_dir(None, "onnxquant-compare-") as workdir:
        sessions = Sessions(float_ir, quant_ir, matching, providers, workdir)
        state = _State(matching, sessions, keep=sensitivity_samples if sensitivity_layers else 0,
                       histograms=histograms, layer_samples=layer_samples)
        state.adaptive_keep = sensitivity_samples is None and sensitivity_layers > 0
        ready = time.perf_counter()
        specs, optional = input_specs(float_ir)
        feeds = iter_feeds(data, specs=specs)
        total = feed_total(data, max_samples)
        with tqdm(total=total, desc="comparing", unit="sample", disable=not progress) as bar:
            for index, raw in enumerate(feeds):
                if max_samples is not None and index >= max_samples:
                    break
                state.add(validate_feed(raw, specs, index=index, optional=optional), index)
                bar.update(1)
        if not state.samples:
            raise CalibrationError("no samples to compare: the data gave no feeds")
        passed = time.perf_counter()
        sensitivity = measure_sensitivity(
            matching, quant_ir, sessions, state.kept, state.ranked(),
            layers=sensitivity_layers, op_types=MAX_OP_TYPES if sensitivity_layers else 0,
            progress=progress)
        logger.info("compare: models matched and sessions made in %.1f s, %d samples in %.1f "
                    "s, %d sensitivities in %.1f s", ready - start, state.samples,
                    passed - ready, len(sensitivity.layers) + len(sensitivity.op_types),
                    time.perf_counter() - passed)
    report = state.report(sensitivity, histograms)
    report.float_model = str(float_source.path or float_source.description)
    report.quantized_model = str(quant_source.path or quant_source.description)
    report.seconds = time.perf_counter() - start
    return report


class _State:
    """The accumulators of one comparison pass."""

    def __init__(self, matching: Matching, sessions: Sessions, keep: int | None,
                 histograms: int, layer_samples: int) -> None:
        self.adaptive_keep = False
        self.matching = matching
        self.layer_samples = layer_samples
        self.sessions = sessions
        self.samples = 0
        self.keep = keep or 0
        self.kept: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        self.outputs = {name: ErrorAccumulator() for name in sessions.output_names}
        self.layers = [ErrorAccumulator(agreement=False) for _ in matching.layers]
        self.isolated = [ErrorAccumulator(agreement=False) for _ in matching.layers]
        self.incomparable: set[int] = set()
        self.activations = {k: ErrorAccumulator(agreement=False) for k in matching.activations}
        self.shared: set[int] = set()  # layers whose output is a matched activation
        for i, layer in enumerate(matching.layers):
            match = matching.activations.get(layer.reference)
            if layer.quantized is not None and match is not None and \
                    match.tensor is layer.quantized:
                self.layers[i] = self.activations[layer.reference]
                self.shared.add(i)
        self.own = {k: ErrorAccumulator(agreement=False) for k in matching.activations}
        self.histogram_count = histograms
        self.histograms: dict[str, StreamingHistogram] = {}

    def add(self, feed: dict[str, np.ndarray], index: int) -> None:
        floats = self._add_layers(feed, index) if self.samples < self.layer_samples else None
        reference, outputs = self.sessions.run_outputs(feed, index, floats)
        for name, acc in self.outputs.items():
            acc.update(reference[name], outputs[name])
        if self.adaptive_keep and not self.samples:
            values = sum(int(np.asarray(reference[name]).size) for name in self.outputs)
            wanted = -(-SENSITIVITY_VALUES // max(values, 1))
            self.keep = min(max(wanted, MIN_SENSITIVITY_SAMPLES), MAX_SENSITIVITY_SAMPLES)
        if len(self.kept) < self.keep:
            self.kept.append(({k: np.array(v) for k, v in feed.items()},
                              {name: np.array(reference[name]) for name in self.outputs}))
        self.samples += 1

    def _add_layers(self, feed: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        """Fold one sample into the layer, activation and histogram statistics; returns the
        float model's values (its outputs included)."""
        floats, quant, isolated = self.sessions.run_layers(feed, index)
        self._add_activations(floats, quant)
        for i, layer in enumerate(self.matching.layers):
            reference = floats.get(layer.reference)
            if reference is None or i in self.incomparable:
                continue
            try:
                if i not in self.shared:
                    self.layers[i].update(reference,
                                          self.sessions.layer_value(layer, quant))
                self.isolated[i].update(reference, self.sessions.layer_value(layer, isolated))
            except (ValueError, KeyError) as err:
                logger.debug("layer %s is not comparable: %s", layer.name, err)
                self.incomparable.add(i)
        if not self.samples:
            self._choose_histograms(floats)
        return floats

    def _add_activations(self, floats: dict[str, np.ndarray],
                         quant: dict[str, np.ndarray]) -> None:
        for key, match in self.matching.activations.items():
            reference = floats.get(key)
            value = quant.get(match.tensor.value.name or "")
            if reference is None or value is None or reference.size != value.size:
                continue
            self.activations[key].update(reference,
                                         match.params.dequantize(value, np.float32))
            if self.samples < OWN_ERROR_SAMPLES:
                self.own[key].update(reference,
                                     match.params.fake_quantize(reference, np.float32))
            if key in self.histograms:
                self.histograms[key].update(reference)

    def _choose_histograms(self, floats: dict[str, np.ndarray]) -> None:
        """Histograms for the activations whose own quantization error is worst on the first
        sample (twice as many as reported, in case the ranking moves), counted from it on."""
        seen = [k for k in self.own if self.own[k].samples]
        seen.sort(key=lambda k: self.own[k].sqnr_db)
        for key in seen[: 2 * self.histogram_count]:
            histogram = StreamingHistogram(*self.matching.activations[key].params.grid_bounds())
            histogram.update(floats[key])
            self.histograms[key] = histogram

    def ranked(self) -> list[int]:
        """Comparable layers, worst isolated SQNR first."""
        candidates = [i for i in range(len(self.layers))
                      if i not in self.incomparable and self.isolated[i].samples]
        return sorted(candidates, key=lambda i: self.isolated[i].sqnr_db)

    def report(self, sensitivity: Sensitivity, histogram_count: int) -> ComparisonReport:
        outputs = {name: OutputStats(name, acc.sqnr_db, acc.cosine, acc.argmax_agreement)
                   for name, acc in self.outputs.items()}
        layers = []
        for i, layer in enumerate(self.matching.layers):
            measured = i not in self.incomparable and self.layers[i].samples > 0
            layers.append(LayerStats(
                layer.name, layer.op_type,
                self.layers[i].sqnr_db if measured else None,
                self.isolated[i].sqnr_db if measured else None,
                sensitivity.layers.get(i), layer.reference, layer.layer.node.name or ""))
        activations = {}
        for key, match in self.matching.activations.items():
            low, high = match.params.grid_bounds()
            seen = self.activations[key].samples > 0
            activations[key] = ActivationStats(
                key, self.activations[key].sqnr_db if seen else None,
                self.own[key].sqnr_db if seen else None, match.params.describe(), low, high)
        worst = sorted((k for k in self.histograms if activations[k].quantization_sqnr_db
                        is not None),
                       key=lambda k: activations[k].quantization_sqnr_db)  # type: ignore[arg-type,return-value]
        return ComparisonReport(
            outputs=outputs, layers=layers,
            weights={name: m.sqnr_db for name, m in self.matching.weights.items()
                     if not m.corrected},
            activations=activations,
            histograms=[self.histograms[k].result(k) for k in worst[:histogram_count]],
            op_type_sensitivity=dict(sensitivity.op_types),
            samples=self.samples, sensitivity_samples=len(self.kept),
            layer_samples=min(self.samples, self.layer_samples),
            unmatched={"weights": self.matching.unmatched_weights,
                       "activations": self.matching.unmatched_activations})
