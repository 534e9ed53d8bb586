"""Run calibration data through onnxruntime and observe tensor ranges.

A private copy of the model is augmented (``augment.expose_ranges``) so that one inference per
batch yields the (min, max) of every requested tensor; the session is built from bytes (or, for
models with external data or over 2 GB, from a private temporary folder that is always
removed). Feeds are validated against the model inputs before they reach onnxruntime.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxquant.calibration.augment import expose_ranges
from onnxquant.calibration.observers import MinMaxObserver
from onnxquant.calibration.readers import InputSpec, count_feeds, iter_feeds, validate_feed
from onnxquant.errors import CalibrationError
from onnxquant.model_io import PROTOBUF_LIMIT, clone_model, model_size_bytes

__all__ = ["CalibrationResult", "calibrate_ranges", "input_specs", "make_session"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CalibrationResult:
    """Observed ranges per tensor name, and what calibration saw."""

    ranges: dict[str, tuple[float, float]]
    samples: int
    unobserved: list[str]
    nonfinite: dict[str, int]


def input_specs(model: ir.Model) -> tuple[list[InputSpec], set[str]]:
    """The model's feedable inputs, and the names of those that may be omitted.

    Inputs that also have an initializer (IR < 4 style defaults) are optional.
    """
    specs, optional = [], set()
    for value in model.graph.inputs:
        name = value.name or ""
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (str(d) if d is not None else None)
                          for d in value.shape)
        specs.append(InputSpec(name=name, dtype=dtype, shape=shape))
        if name in model.graph.initializers:
            optional.add(name)
    return specs, optional


def make_session(
    model: ir.Model, providers: Sequence[str], workdir: Path
) -> ort.InferenceSession:
    """An onnxruntime session for ``model`` (from bytes, or from ``workdir`` when large)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    has_external = any(
        isinstance(v.const_value, ir.ExternalTensor)
        for g in (model.graph, *model.graph.subgraphs())
        for v in g.initializers.values()
    )
    try:
        if has_external or model_size_bytes(model) > PROTOBUF_LIMIT - (64 << 20):
            path = workdir / "augmented.onnx"
            ir.save(model, path, external_data="augmented.onnx.data")
            return ort.InferenceSession(str(path), options, providers=list(providers))
        proto = ir.serde.serialize_model(model)
        data = proto.SerializeToString()
        del proto  # keep one serialized copy alive while onnxruntime builds its own
        return ort.InferenceSession(data, options, providers=list(providers))
    except Exception as err:
        raise CalibrationError(
            f"onnxruntime could not load the model for calibration: {err}. Check that the "
            "float model runs in onnxruntime with these providers"
        ) from err


def calibrate_ranges(
    model: ir.Model,
    tensor_names: Iterable[str],
    data: Any,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    observer_factory: Callable[[], MinMaxObserver] = MinMaxObserver,
    max_samples: int | None = None,
    progress: bool = False,
) -> CalibrationResult:
    """Observe the range of each named tensor over the calibration data.

    Args:
        model: The (prepared) float model; not modified.
        tensor_names: Float tensors whose ranges are needed.
        data: A reader with ``get_next()``, an iterable of feed dicts, or a folder path.
        providers: onnxruntime execution providers for the calibration session.
        observer_factory: Creates one observer per tensor.
        max_samples: Stop after this many feeds.
        progress: Show a progress bar.

    Raises:
        CalibrationError: No feeds, a feed onnxruntime rejects, or no finite range for a tensor.
    """
    augmented = clone_model(model)
    outputs = expose_ranges(augmented, tensor_names)
    specs, optional = input_specs(model)
    observers = {name: observer_factory() for name in outputs}
    output_names = list(outputs.values())
    workdir = Path(tempfile.mkdtemp(prefix="onnxquant-calib-"))
    try:
        session = make_session(augmented, providers, workdir)
        del augmented
        samples = _run(session, output_names, list(outputs), observers, data, specs, optional,
                       max_samples=max_samples, progress=progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _collect(observers, samples)


def _run(session, output_names, keys, observers, data, specs, optional, *, max_samples, progress):
    total = count_feeds(data)
    if max_samples is not None:
        total = min(total, max_samples) if total is not None else max_samples
    samples = 0
    bar = tqdm(total=total, desc="calibrating", unit="sample", disable=not progress)
    try:
        for index, raw in enumerate(iter_feeds(data, specs=specs)):
            if max_samples is not None and samples >= max_samples:
                break
            feed = validate_feed(raw, specs, index=index, optional=optional)
            try:
                results = session.run(output_names, feed) if output_names else []
            except Exception as err:
                raise CalibrationError(
                    f"onnxruntime failed on calibration feed {index}: {err}"
                ) from err
            for key, pairs in zip(keys, results, strict=True):
                observers[key].update(pairs)
            samples += 1
            bar.update(1)
    finally:
        bar.close()
    if samples == 0:
        raise CalibrationError(
            "the calibration data yielded no feeds; give at least one "
            "{input_name: array} dict (a reader whose get_next() returns None at once is empty)"
        )
    return samples


def _collect(observers: dict[str, MinMaxObserver], samples: int) -> CalibrationResult:
    ranges, unobserved, nonfinite = {}, [], {}
    for name, obs in observers.items():
        if obs.nonfinite_batches:
            nonfinite[name] = obs.nonfinite_batches
        if obs.observed:
            ranges[name] = obs.result()
        else:
            unobserved.append(name)
    only_nonfinite = [n for n in nonfinite if n in unobserved]
    if only_nonfinite:
        raise CalibrationError(
            f"every calibration batch gave NaN/Inf values for tensor '{only_nonfinite[0]}'"
            f"{f' (and {len(only_nonfinite) - 1} more)' if len(only_nonfinite) > 1 else ''}; "
            "check the calibration data (NaN/Inf inputs) and that the float model is finite on it"
        )
    if nonfinite:
        worst = ", ".join(f"'{n}' ({c} batches)" for n, c in list(nonfinite.items())[:5])
        logger.warning(
            "NaN/Inf values during calibration were left out of the ranges of %d tensors: %s",
            len(nonfinite), worst,
        )
    return CalibrationResult(ranges=ranges, samples=samples, unobserved=unobserved,
                             nonfinite=nonfinite)
