"""GPTQ's Hessian accumulation sharded across the workers of a Ray cluster.

The float model, with every wanted MatMul input exposed as an output, is shipped once through
Ray's object store (models over protobuf's 2 GB limit are refused, as for static calibration);
each worker runs it whole over shards of consecutive feeds with the same capture code as one
process (:func:`~onnxquant.weight_only._capture.capture`) into fresh
:class:`~onnxquant.weight_only._hessian.HessianAccumulator` s — per input, the float64 sum
``Σ xᵀx`` and the row count (or, while they are fewer than K/2, the float32 rows themselves) —
and returns them. The driver merges them in shard order, so only the summation order differs
from one process: the Hessians agree to float64 rounding. Connection, sharding, the single retry
of a failed shard and the error naming it come from
:func:`onnxquant.calibration.ray_cluster.map_shards`.

A result holds up to one dense Hessian per input, so shards are larger than static calibration's:
about ``total / (2 * workers)`` feeds each (at least ``SHARD_FEEDS``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import onnx_ir as ir

from onnxquant.calibration.parallel import shard_session
from onnxquant.calibration.ray_cluster import (
    RAY_MISSING,
    SHARD_FEEDS,
    map_shards,
    model_bytes,
    ray_available,
)
from onnxquant.core.errors import CalibrationError
from onnxquant.weight_only._capture import accumulate, capture, expose_activations
from onnxquant.weight_only._hessian import HessianAccumulator

__all__ = ["collect_on_ray", "shard_size"]


@dataclasses.dataclass
class _Hessians:
    """The GPTQ job of a Ray worker: capture the activations of a shard into accumulators."""

    providers: list[str]
    activations: dict[str, int]
    exposed: list[str]
    _session: Any = None

    def open(self, model: bytes) -> None:
        self._session = shard_session(model, self.providers, 1)

    def run(self, first: int, feeds: list[dict]) -> tuple[dict[str, HessianAccumulator], int]:
        accumulators, update = accumulate(self.activations)
        count = capture(self._session, list(self.activations), self.exposed,
                        enumerate(feeds, first), update)
        return accumulators, count


def shard_size(total: int | None, workers: int) -> int:
    """Feeds per shard: about two shards per worker, at least ``SHARD_FEEDS``."""
    if total is None:
        return 4 * SHARD_FEEDS
    return max(SHARD_FEEDS, -(-total // (2 * workers)))


def collect_on_ray(model: ir.Model, activations: dict[str, int], feeds: Iterable[dict], *,
                   providers: Sequence[str], workers: int, address: str | None,
                   total: int | None, progress: bool
                   ) -> tuple[dict[str, HessianAccumulator], int]:
    """One accumulator per activation name, filled from validated ``feeds`` on Ray workers.

    Returns:
        (accumulators by activation name, number of feeds used).

    Raises:
        CalibrationError: Ray is missing or unreachable, the model is over 2 GB, or a shard
            failed twice (the error names it and both workers).
    """
    if not ray_available():  # before the model is serialized
        raise CalibrationError(RAY_MISSING)
    accumulators, _ = accumulate(activations)

    def merge(shard: dict[str, HessianAccumulator]) -> None:
        for name, accumulator in shard.items():
            accumulators[name].merge(accumulator)

    augmented, exposed = expose_activations(model, activations)
    job = _Hessians(list(providers), dict(activations), exposed)
    samples = map_shards(model_bytes(augmented), job, feeds, merge, workers=workers,
                         address=address, total=total, progress=progress,
                         shard_feeds=shard_size(total, workers), desc="GPTQ calibration (ray)")
    return accumulators, samples
