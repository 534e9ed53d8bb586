"""Per-channel statistics of float tensors over calibration data.

The corrections need a statistic per *channel* of an activation, not per tensor: SmoothQuant's
migration strength is ``max|X_j|`` per input channel ``j`` of a MatMul (Xiao et al. 2023,
"SmoothQuant"), and empirical bias correction needs the mean ``E[x_i]`` of every input channel
of a Conv or MatMul (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction"; Banner et al. 2019). For a tensor and its channel axis ``c``, channel ``i``
collects every value ``x[..., i, ...]`` (index ``i`` on axis ``c``) of every feed, and we keep
its running minimum, maximum and sum (float64), so outputs are never stored.

The model runs in onnxruntime as a copy with the tensors added as graph outputs; graph inputs
are read straight from the feeds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxquant.calibration.session import make_session, run_batch
from onnxquant.core import tempdirs
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import clone_model

__all__ = ["ChannelStats", "channel_statistics"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ChannelStats:
    """Statistics of one tensor per channel (1-D float64 arrays, one value per channel).

    Attributes:
        low: Per-channel minimum.
        high: Per-channel maximum.
        mean: Per-channel mean.
        count: Number of values each channel saw (over all feeds).
    """

    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray
    count: int

    @property
    def absmax(self) -> np.ndarray:
        """Per-channel largest magnitude ``max(|low|, |high|)``."""
        return np.maximum(np.abs(self.low), np.abs(self.high))


class _Accumulator:
    """Running per-channel min, max and sum of one tensor."""

    def __init__(self, name: str, axis: int) -> None:
        self.name, self.axis = name, axis
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        rows = self._rows(np.asarray(array))
        if rows.shape[1] == 0:
            return
        low, high = rows.min(axis=1), rows.max(axis=1)
        total = rows.sum(axis=1)
        if self.low is None or self.high is None or self.total is None:
            self.low, self.high, self.total = low, high, total
        elif self.low.shape != low.shape:
            raise CalibrationError(
                f"tensor {self.name!r} has {low.shape[0]} channels on axis {self.axis} in one "
                f"feed and {self.low.shape[0]} in another; per-channel statistics need a fixed "
                "channel count")
        else:
            self.low = np.minimum(self.low, low)
            self.high = np.maximum(self.high, high)
            self.total += total
        self.count += rows.shape[1]

    def _rows(self, array: np.ndarray) -> np.ndarray:
        """``array`` as float64 ``[channels, values]``."""
        if array.ndim == 0 or not -array.ndim <= self.axis < array.ndim:
            raise CalibrationError(
                f"tensor {self.name!r} has rank {array.ndim}: channel axis {self.axis} does "
                "not exist; give an axis within its rank")
        moved = np.moveaxis(array.astype(np.float64, copy=False), self.axis, 0)
        return moved.reshape(moved.shape[0], -1)

    def result(self) -> ChannelStats | None:
        if self.low is None or self.high is None or self.total is None:
            return None
        return ChannelStats(low=self.low, high=self.high, mean=self.total / self.count,
                            count=self.count)


def _graph_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Graph inputs and node outputs of ``graph`` (not of its subgraphs), by name."""
    values = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        values.update((v.name, v) for v in node.outputs if v.name)
    return values


def _expose(model: ir.Model, names: list[str]) -> None:
    """Make the named values graph outputs of ``model`` (a private copy)."""
    values = _graph_values(model.graph)
    for name in names:
        if not values[name].is_graph_output():
            model.graph.outputs.append(values[name])


def channel_statistics(
    model: ir.Model,
    tensors: Mapping[str, int],
    feeds: Iterable[dict[str, np.ndarray]],
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, ChannelStats]:
    """Per-channel minimum, maximum and mean of tensors of ``model`` over ``feeds``.

    Args:
        model: The float model (not changed; a copy runs).
        tensors: Tensor name -> channel axis (negative counts from the end). A tensor may be a
            graph input or a node output of the main graph; other names are skipped.
        feeds: ``{input name: array}`` dicts, read once, in order.
        providers: onnxruntime execution providers.

    Returns:
        Tensor name -> :class:`ChannelStats`, for every found tensor that saw data.

    Raises:
        CalibrationError: onnxruntime cannot load the model or fails on a feed, a tensor has no
            such axis, or its channel count changes between feeds.
    """
    if not tensors:
        return {}
    work = clone_model(model)
    values = _graph_values(work.graph)
    inputs = {v.name for v in work.graph.inputs}
    found = {name: axis for name, axis in tensors.items() if name in values}
    if len(found) < len(tensors):
        logger.debug("no per-channel statistics for %s: not in the main graph",
                     sorted(set(tensors) - set(found)))
    exposed = [name for name in found if name not in inputs]
    _expose(work, exposed)
    accumulators = {name: _Accumulator(name, axis) for name, axis in found.items()}
    with tempdirs.private_dir(None, "onnxquant-stats-") as workdir:
        session = make_session(work, providers, workdir) if exposed else None
        del work
        wanted = {i.name for i in session.get_inputs()} if session is not None else set()
        for index, feed in enumerate(feeds):
            if session is not None:
                batch = {k: v for k, v in feed.items() if k in wanted}
                results = run_batch(session, exposed, batch, index)
                for name, array in zip(exposed, results, strict=True):
                    accumulators[name].update(array)
            for name in found.keys() & inputs & feed.keys():
                accumulators[name].update(feed[name])
    stats = {name: acc.result() for name, acc in accumulators.items()}
    return {name: s for name, s in stats.items() if s is not None}
