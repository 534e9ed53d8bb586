"""Stream calibration feeds through onnxruntime and accumulate GPTQ Hessians.

Every target MatMul's A input is made an output; each feed is run once and every distinct A
tensor updates one :class:`~onnxquant.weight_only._hessian.HessianAccumulator` (its memory is
bounded by the ``K x K`` Hessian, independent of the number of samples). Activations are dropped
right after each update. A large model runs in segments (see ``_segments``), so that onnxruntime
holds one segment's weights at a time; a small one, or one with subgraphs, runs whole from a
private copy of its graph (the weights are never copied). Only MatMuls of the main graph are
calibrated; targets inside If/Loop/Scan bodies fall back to RTN (their A values are not
addressable from outside the body).

With ``backend="ray"`` the same pieces (``_capture``) run on Ray workers, each over a shard of
the feeds, and their accumulators are merged in shard order (``_ray``).
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
from onnxquant.calibration.runner import calibration_feeds, feed_total
from onnxquant.calibration.session import input_specs, make_session
from onnxquant.core import tempdirs
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import model_size_bytes
from onnxquant.weight_only._capture import accumulate, capture, expose_activations
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
    backend: str = "local",
    ray_address: str | None = None,
    workers: int = 1,
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
        backend: ``"local"`` (this process) or ``"ray"``: ``workers`` Ray actors each run the
            whole model over shards of the feeds (see :mod:`onnxquant.weight_only._ray`).
        ray_address: With ``backend="ray"``: the cluster's ``host:port``; None starts a local
            cluster (or uses a Ray already initialised in this process).
        workers: Ray workers (one CPU each).

    Returns:
        (accumulators by activation name, number of feeds used).

    Raises:
        CalibrationError: No feeds, a feed onnxruntime rejects, or an activation whose last
            dimension is not K.
    """
    if backend == "ray":
        from onnxquant.weight_only._ray import collect_on_ray

        feeds = _feeds(model, data, max_samples, False, hold_back)
        accumulators, samples = collect_on_ray(
            model, activations, feeds, providers=providers, workers=workers, address=ray_address,
            total=feed_total(data, max_samples, hold_back), progress=progress)
        return accumulators, _check_samples(samples)
    accumulators, update = accumulate(activations)
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
    return accumulators, _check_samples(samples)


def _check_samples(samples: int) -> int:
    if samples == 0:
        raise CalibrationError(
            "the calibration data yielded no feeds; GPTQ needs at least one "
            "{input_name: array} dict")
    return samples


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
    total = feed_total(data, max_samples, hold_back)
    with tqdm(total=total, desc="GPTQ calibration", unit="sample", disable=not progress) as bar:
        for feed in calibration_feeds(data, specs, optional, max_samples, hold_back):
            yield feed
            bar.update(1)


def _run_whole(model: ir.Model, names: list[str], feeds: Iterator[dict],
               update: Callable[[str, np.ndarray], None], providers: Sequence[str],
               workdir: Path) -> int:
    """One session over a copy of the graph that also outputs every activation in ``names``."""
    augmented, exposed = expose_activations(model, names)
    session = make_session(augmented, providers, workdir)
    del augmented
    return capture(session, names, exposed, enumerate(feeds), update)
