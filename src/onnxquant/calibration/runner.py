"""Run calibration data through onnxruntime and observe tensor statistics.

A private copy of the model is augmented (``augment.expose_tensors``) so that one inference per
batch yields what every requested tensor's observer needs — (min, max) pairs reduced in the
graph for MinMax, the values themselves for histogram methods. Observers keep fixed-size state,
so memory does not grow with the number of samples. The session is built from bytes (or, for
models with external data or over 2 GB, from a private temporary folder that is always
removed). Feeds are validated against the model inputs before they reach onnxruntime.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxquant.calibration.augment import expose_tensors
from onnxquant.calibration.evaluation import HoldBack
from onnxquant.calibration.parallel import run_sharded
from onnxquant.calibration.ray_cluster import run_on_ray
from onnxquant.calibration.readers import InputSpec, count_feeds, iter_feeds, validate_feed
from onnxquant.calibration.session import (
    check_loads,
    input_specs,
    make_session,
    run_batch,
    update_observers,
)
from onnxquant.calibration.settings import CalibrationSettings, Observer, tensor_range
from onnxquant.core import tempdirs
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import clone_model

__all__ = [
    "CalibrationResult",
    "calibrate_ranges",
    "collect_statistics",
    "first_feeds",
    "calibration_feeds",
    "ranges_from_statistics",
    "feed_total",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CalibrationResult:
    """Observed ranges per tensor name, and what calibration saw.

    ``feeds`` holds copies of the first validated feeds when they were asked for
    (``keep_feeds``): a one-shot reader cannot be read twice, and the quantized model is checked
    on them after emission.
    """

    ranges: dict[str, tuple[float, float]]
    samples: int
    unobserved: list[str]
    nonfinite: dict[str, int]
    statistics: dict[str, Observer] = dataclasses.field(default_factory=dict, repr=False)
    settings: CalibrationSettings = dataclasses.field(default_factory=CalibrationSettings)
    feeds: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list, repr=False)


def calibrate_ranges(
    model: ir.Model,
    tensor_names: Iterable[str],
    data: Any,
    *,
    settings: CalibrationSettings | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    max_samples: int | None = None,
    progress: bool = False,
    workers: int = 1,
    keep_feeds: int = 0,
    hold_back: HoldBack | None = None,
    backend: str = "local",
    ray_address: str | None = None,
) -> CalibrationResult:
    """Observe every named tensor over the calibration data and derive its range.

    Args:
        model: The (prepared) float model; not modified.
        tensor_names: Float tensors whose ranges are needed.
        data: A reader with ``get_next()``, an iterable of feed dicts, or a folder path.
        settings: Method and parameters; MinMax by default.
        providers: onnxruntime execution providers for the calibration session.
        max_samples: Stop after this many feeds.
        progress: Show a progress bar (with samples/s).
        workers: Processes sharing the inference work (each with its own session); the
            statistics are merged exactly, so the ranges equal a single process's.
        keep_feeds: Keep copies of this many first validated feeds in the result.
        hold_back: Sets some feeds aside for evaluation instead of calibrating on them
            (``max_samples`` then counts the calibration feeds only).
        backend: ``"local"`` (``workers`` processes on this machine) or ``"ray"`` (``workers``
            actors of a Ray cluster, see :mod:`onnxquant.calibration.ray_cluster`).
        ray_address: With ``backend="ray"``: the cluster's ``host:port``; None starts a local
            one (or uses a Ray already initialised in this process).

    Raises:
        CalibrationError: No feeds, a feed onnxruntime rejects, or a tensor whose every batch
            was NaN/Inf; with Ray, Ray missing or a shard that failed twice.
    """
    settings = settings or CalibrationSettings()
    kept: list[dict[str, np.ndarray]] = []
    statistics, samples = collect_statistics(
        model, tensor_names, data, settings=settings, providers=providers,
        max_samples=max_samples, progress=progress, workers=workers,
        keep=(kept, keep_feeds), hold_back=hold_back, backend=backend, ray_address=ray_address)
    result = ranges_from_statistics(statistics, samples, settings)
    result.feeds = kept
    return result


def collect_statistics(
    model: ir.Model,
    tensor_names: Iterable[str],
    data: Any,
    *,
    settings: CalibrationSettings,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    max_samples: int | None = None,
    progress: bool = False,
    workers: int = 1,
    keep: tuple[list[dict[str, np.ndarray]], int] | None = None,
    hold_back: HoldBack | None = None,
    backend: str = "local",
    ray_address: str | None = None,
) -> tuple[dict[str, Observer], int]:
    """Run the data through the augmented model; returns (observer per tensor, samples).

    With ``keep=(list, n)``, copies of the first ``n`` validated feeds are appended to the list.
    With ``hold_back``, the feeds it sets aside are not calibrated on. ``backend`` and
    ``ray_address`` choose where the inference runs (see :func:`calibrate_ranges`).
    """
    augmented = clone_model(model)
    exposed = expose_tensors(augmented, tensor_names, values=settings.wants_values)
    specs, optional = input_specs(model)
    observers = {name: settings.new_observer(kind) for name, (_, kind) in exposed.items()}
    outputs = {name: out for name, (out, _) in exposed.items()}
    with tempdirs.private_dir(None, "onnxquant-calib-") as workdir:
        feeds = calibration_feeds(data, specs, optional, max_samples, hold_back)
        if keep is not None and keep[1] > 0:
            feeds = _keeping(feeds, *keep)
        total = feed_total(data, max_samples, hold_back)
        if backend == "ray":
            samples = run_on_ray(augmented, outputs, observers, feeds, providers=providers,
                                 workers=workers, address=ray_address, total=total,
                                 progress=progress)
        elif workers > 1:
            samples = run_sharded(augmented, outputs, observers, feeds, providers=providers,
                                  workers=workers, workdir=workdir, total=total,
                                  progress=progress)
        else:
            session = _calibration_session(model, augmented, providers, workdir)
            del augmented
            samples = _run(session, outputs, observers, feeds, total=total, progress=progress)
    if samples == 0:
        raise CalibrationError(
            "the calibration data yielded no feeds; give at least one "
            "{input_name: array} dict (a reader whose get_next() returns None at once is empty)"
        )
    return observers, samples


def _calibration_session(model: ir.Model, augmented: ir.Model, providers: Sequence[str],
                         workdir: Path) -> Any:
    """The session over the augmented model. When onnxruntime refuses it, the float model is
    tried too: if onnxruntime refuses that as well, the model is at fault, and the error says
    so with onnxruntime's reason (an UnsupportedModelError, before any feed is read)."""
    try:
        return make_session(augmented, providers, workdir)
    except CalibrationError:
        check_loads(model, providers, workdir, "the float model")
        raise


def feed_total(data: Any, max_samples: int | None, hold_back: HoldBack | None = None
               ) -> int | None:
    """How many feeds a pass over ``data`` will see (for progress bars; None if unknown)."""
    total = count_feeds(data)
    if hold_back is not None:
        total = hold_back.calibration_count(total)
    if max_samples is not None:
        total = min(total, max_samples) if total is not None else max_samples
    return total


def _validated_feeds(data: Any, specs, optional, max_samples: int | None):
    """Validated feeds, at most ``max_samples`` of them, one at a time."""
    for index, raw in enumerate(iter_feeds(data, specs=specs)):
        if max_samples is not None and index >= max_samples:
            return
        yield validate_feed(raw, specs, index=index, optional=optional)


def calibration_feeds(data: Any, specs: Sequence[InputSpec], optional: Collection[str],
                      max_samples: int | None, hold_back: HoldBack | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
    """The validated feeds calibration runs: at most ``max_samples``, without those
    ``hold_back`` sets aside."""
    if hold_back is None:
        return _validated_feeds(data, specs, optional, max_samples)
    return itertools.islice(hold_back.split(_validated_feeds(data, specs, optional, None)),
                            max_samples)


def first_feeds(model: ir.Model, data: Any, count: int,
                hold_back: HoldBack | None = None) -> list[dict[str, np.ndarray]]:
    """Copies of the first ``count`` validated feeds of ``data`` (for a run that took its
    statistics from a cache); with ``hold_back``, the data is read on until it holds its
    evaluation feeds (one pass: a reader can be read only once)."""
    specs, optional = input_specs(model)
    kept: list[dict[str, np.ndarray]] = []
    if hold_back is None:
        for _ in _keeping(_validated_feeds(data, specs, optional, count), kept, count):
            pass
        return kept
    hold_back.scan(_keeping(_validated_feeds(data, specs, optional, None), kept, count))
    return kept


def _keeping(feeds: Iterator[dict], kept: list[dict[str, np.ndarray]],
             count: int) -> Iterator[dict]:
    """``feeds``, appending copies of the first ``count`` to ``kept`` on the way (a reader
    may reuse its arrays)."""
    for feed in feeds:
        if len(kept) < count:
            kept.append({name: np.array(array, copy=True) for name, array in feed.items()})
        yield feed


def _run(session, outputs: dict[str, str], observers, feeds, *, total, progress) -> int:
    keys, output_names = list(outputs), list(outputs.values())
    samples = 0
    with tqdm(total=total, desc="calibrating", unit="sample", disable=not progress) as bar:
        for index, feed in enumerate(feeds):
            update_observers(observers, keys, run_batch(session, output_names, feed, index))
            samples += 1
            bar.update(1)
    return samples


def ranges_from_statistics(
    observers: dict[str, Observer], samples: int, settings: CalibrationSettings
) -> CalibrationResult:
    """Ranges per tensor from collected (or cached) statistics."""
    ranges, unobserved, nonfinite = {}, [], {}
    for name, obs in observers.items():
        bad = _nonfinite(obs)
        if bad:
            nonfinite[name] = bad
        if obs.observed:
            ranges[name] = tensor_range(obs, settings)
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
            "NaN/Inf during calibration (batches for min/max, values for histograms) were left "
            "out of the statistics of %d tensors: %s",
            len(nonfinite), worst,
        )
    return CalibrationResult(ranges=ranges, samples=samples, unobserved=unobserved,
                             nonfinite=nonfinite, statistics=observers, settings=settings)


def _nonfinite(observer: Observer) -> int:
    """Non-finite batches (MinMax pairs) or values (histograms) that were left out."""
    return int(getattr(observer, "nonfinite_batches", 0) or getattr(observer, "nonfinite", 0))
