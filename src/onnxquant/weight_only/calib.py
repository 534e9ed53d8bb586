"""Stream calibration feeds through onnxruntime and accumulate GPTQ Hessians.

Every target MatMul's A input is made an output; each feed is run once and every distinct A
tensor updates one :class:`~onnxquant.weight_only._hessian.HessianAccumulator` (its memory is
bounded by the ``K x K`` Hessian, independent of the number of samples). Activations are dropped
right after each update. A large model runs in segments (see ``_segments``), so that onnxruntime
holds one segment's weights at a time; a small one, or one with subgraphs, runs whole from a
private copy of its graph (the weights are never copied). Only MatMuls of the main graph are
calibrated; targets inside If/Loop/Scan bodies fall back to RTN (their A values are not
addressable from outside the body).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxquant.calibration.evaluation import HoldBack
from onnxquant.calibration.readers import count_feeds
from onnxquant.calibration.runner import calibration_feeds
from onnxquant.calibration.session import input_specs, make_session, run_batch
from onnxquant.core import tempdirs
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import clone_model, model_size_bytes
from onnxquant.weight_only._hessian import HessianAccumulator
from onnxquant.weight_only._segments import plan_segments, run_segments

__all__ = ["collect_hessians", "SEGMENTED_MODEL_BYTES"]

logger = logging.getLogger(__name__)

SEGMENTED_MODEL_BYTES = 64 << 20  # models from this size on are calibrated in 8 segments


def collect_hessians(
    model: ir.Model,
    activations: dict[str, int],
    data: Any,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    max_samples: int | None = None,
    progress: bool = False,
    segment_bytes: int | None = None,
    hold_back: HoldBack | None = None,
) -> tuple[dict[str, HessianAccumulator], int]:
    """One Hessian accumulator per activation name, filled from ``data``.

    Args:
        model: The float model (not modified).
        activations: Name of each MatMul A tensor of the main graph -> K (its last dimension).
        data: A reader with ``get_next()``, an iterable of feed dicts, a feed dict or a folder.
        providers: onnxruntime execution providers.
        max_samples: Stop after this many feeds.
        progress: Show a progress bar.
        segment_bytes: Most initializer bytes per onnxruntime session (default: an eighth of
            the model from :data:`SEGMENTED_MODEL_BYTES` on, else the whole model).
        hold_back: Sets feeds aside for measuring the accuracy (``max_samples`` then counts
            the calibration feeds only).

    Returns:
        (accumulators by activation name, number of feeds used).

    Raises:
        CalibrationError: No feeds, a feed onnxruntime rejects, or an activation whose last
            dimension is not K.
    """
    accumulators = {name: HessianAccumulator(k) for name, k in activations.items()}

    def update(name: str, array: np.ndarray) -> None:
        if name in accumulators:
            _update(accumulators[name], name, array, activations[name])

    with tempdirs.private_dir(None, "onnxquant-gptq-") as workdir:
        segments = plan_segments(model, activations, _budget(model, segment_bytes))
        if segments:
            logger.info("GPTQ calibration in %d segments", len(segments))
            # The feeds are only read (and stored) first; the bar of run_segments shows the
            # inference, segment by segment.
            feeds = _feeds(model, data, max_samples, False, hold_back)
            samples = run_segments(model, segments, feeds, update, providers=providers,
                                   workdir=workdir, progress=progress)
        else:
            feeds = _feeds(model, data, max_samples, progress, hold_back)
            samples = _run_whole(model, list(activations), feeds, update, providers, workdir)
    if samples == 0:
        raise CalibrationError(
            "the calibration data yielded no feeds; GPTQ needs at least one "
            "{input_name: array} dict")
    return accumulators, samples


def _budget(model: ir.Model, segment_bytes: int | None) -> int:
    if segment_bytes is not None:
        return segment_bytes
    total = model_size_bytes(model)
    return total // 8 if total >= SEGMENTED_MODEL_BYTES else total + 1


def _feeds(model: ir.Model, data: Any, max_samples: int | None, progress: bool,
           hold_back: HoldBack | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Validated feeds, at most ``max_samples``, without those ``hold_back`` sets aside,
    with a progress bar."""
    specs, optional = input_specs(model)
    total = count_feeds(data)
    if hold_back is not None:
        total = hold_back.calibration_count(total)
    if max_samples is not None:
        total = min(total, max_samples) if total is not None else max_samples
    with tqdm(total=total, desc="GPTQ calibration", unit="sample", disable=not progress) as bar:
        for feed in calibration_feeds(data, specs, optional, max_samples, hold_back):
            yield feed
            bar.update(1)


def _run_whole(model: ir.Model, names: list[str], feeds: Iterator[dict],
               update: Callable[[str, np.ndarray], None], providers: Sequence[str],
               workdir: Path) -> int:
    """One session over a copy of the graph that also outputs every activation in ``names``."""
    graph_inputs = {v.name for v in model.graph.inputs}
    exposed = [name for name in names if name not in graph_inputs]
    augmented = clone_model(model)
    values = _values_by_name(augmented.graph)
    existing = {v.name for v in augmented.graph.outputs}
    for name in exposed:
        if name not in existing:
            value = values[name]
            if value.type is None:
                value.type = ir.TensorType(ir.DataType.FLOAT)
            augmented.graph.outputs.append(value)
    session = make_session(augmented, providers, workdir)
    del augmented, values
    samples = 0
    for index, feed in enumerate(feeds):
        results = run_batch(session, exposed, feed, index)
        for name, array in zip(exposed, results, strict=True):
            update(name, array)
        del results
        for name in names:
            if name in graph_inputs:
                update(name, feed[name])
        samples += 1
    return samples


def _update(accumulator: HessianAccumulator, name: str, array: np.ndarray, k: int) -> None:
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[-1] != k:
        raise CalibrationError(
            f"activation '{name}' has shape {list(array.shape)}; GPTQ expected its last "
            f"dimension to be K = {k}")
    accumulator.update(array)


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values
