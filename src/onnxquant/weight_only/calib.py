"""Stream calibration feeds through onnxruntime and accumulate GPTQ Hessians.

A private copy of the model gets every target MatMul's A input as an extra graph output; each
feed is run once and every distinct A tensor updates one
:class:`~onnxquant.weight_only.gptq.HessianAccumulator` (``K x K``, independent of the number of
samples). Activations are dropped right after each update. Only MatMuls of the main graph are
calibrated; targets inside If/Loop/Scan bodies fall back to RTN (their A values are not
addressable from outside the body).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxquant.calibration.readers import count_feeds, iter_feeds, validate_feed
from onnxquant.errors import CalibrationError
from onnxquant.model_io import clone_model

__all__ = ["collect_hessians"]

logger = logging.getLogger(__name__)


def collect_hessians(
    model: ir.Model,
    activations: dict[str, int],
    data: Any,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    max_samples: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], int]:
    """One Hessian accumulator per activation name, filled from ``data``.

    Args:
        model: The float model (not modified).
        activations: Name of each MatMul A tensor of the main graph -> K (its last dimension).
        data: A reader with ``get_next()``, an iterable of feed dicts, a feed dict or a folder.
        providers: onnxruntime execution providers.
        max_samples: Stop after this many feeds.
        progress: Show a progress bar.

    Returns:
        (accumulators by activation name, number of feeds used).

    Raises:
        CalibrationError: No feeds, a feed onnxruntime rejects, or an activation whose last
            dimension is not K.
    """
    from onnxquant.calibration.runner import input_specs, make_session, run_batch
    from onnxquant.weight_only.gptq import HessianAccumulator

    accumulators = {name: HessianAccumulator(k) for name, k in activations.items()}
    specs, optional = input_specs(model)
    graph_inputs = {v.name for v in model.graph.inputs}
    exposed = [name for name in activations if name not in graph_inputs]
    augmented = clone_model(model)
    values = _values_by_name(augmented.graph)
    existing = {v.name for v in augmented.graph.outputs}
    for name in exposed:
        if name not in existing:
            value = values[name]
            if value.type is None:
                value.type = ir.TensorType(ir.DataType.FLOAT)
            augmented.graph.outputs.append(value)
    workdir = Path(tempfile.mkdtemp(prefix="onnxquant-gptq-"))
    samples = 0
    try:
        session = make_session(augmented, providers, workdir)
        del augmented, values
        total = count_feeds(data)
        if max_samples is not None:
            total = min(total, max_samples) if total is not None else max_samples
        with tqdm(total=total, desc="GPTQ calibration", unit="sample",
                  disable=not progress) as bar:
            for index, raw in enumerate(iter_feeds(data, specs=specs)):
                if max_samples is not None and index >= max_samples:
                    break
                feed = validate_feed(raw, specs, index=index, optional=optional)
                results = run_batch(session, exposed, feed, index)
                for name, array in zip(exposed, results, strict=True):
                    _update(accumulators[name], name, array, activations[name])
                del results
                for name in activations:
                    if name in graph_inputs:
                        _update(accumulators[name], name, feed[name], activations[name])
                samples += 1
                bar.update(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if samples == 0:
        raise CalibrationError(
            "the calibration data yielded no feeds; GPTQ needs at least one "
            "{input_name: array} dict")
    return accumulators, samples


def _update(accumulator: Any, name: str, array: np.ndarray, k: int) -> None:
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[-1] != k:
        raise CalibrationError(
            f"activation '{name}' has shape {list(array.shape)}; GPTQ expected its last "
            f"dimension to be K = {k}")
    accumulator.update(array.astype(np.float32, copy=False))


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values
