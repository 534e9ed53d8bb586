"""Which feeds a quantization run measures its accuracy on, and the measurement itself.

In order of preference (:func:`evaluate_quantized`):

1. the caller's evaluation data (``eval_data=``, CLI ``--eval``): every feed of it;
2. calibration feeds held back from calibration (:class:`HoldBack`): every
   :data:`EVAL_EVERY`-th validated feed, at most :data:`EVAL_MAX` of them, goes to evaluation
   instead of calibration — streaming, so a reader of unknown length works. With fewer than
   :data:`EVAL_EVERY` feeds nothing is held back and the first calibration feeds are used,
   labelled as such;
3. :data:`RANDOM_FEEDS` random normal feeds, when every model input is a float tensor
   (symbolic dimensions: 1 on the first axis, :data:`RANDOM_DIM` elsewhere).

Explicit evaluation data must work: its errors are raised. The implicit kinds (2, 3) only
inform: when they fail, a warning is logged and there is no fidelity. Implicit measurement is
skipped for models above :data:`IMPLICIT_MAX_BYTES` (both models are loaded into onnxruntime).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from onnxquant.calibration._validate import SourcedFeed
from onnxquant.calibration.fidelity import RANDOM_SOURCE, Fidelity, measure_fidelity
from onnxquant.calibration.readers import InputSpec
from onnxquant.calibration.session import model_input_specs
from onnxquant.core.errors import QuantizationError

__all__ = ["HoldBack", "random_feeds", "evaluate_quantized", "EVAL_EVERY", "EVAL_MAX",
           "RANDOM_FEEDS", "RANDOM_DIM", "IMPLICIT_MAX_BYTES"]

logger = logging.getLogger(__name__)

EVAL_EVERY = 10
"""Every this-many-th calibration feed (the 10th, 20th, ...) is held back for evaluation."""
EVAL_MAX = 16
"""At most this many calibration feeds are held back."""
RANDOM_FEEDS = 4
"""Random feeds measured when no data was given (float inputs only)."""
RANDOM_DIM = 16
"""Size of symbolic dimensions other than the first in random feeds (the first is 1)."""
IMPLICIT_MAX_BYTES = 2 * 1024**3
"""Above this float-model size, accuracy is measured only on explicit evaluation data."""


def _copy(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of a feed (a reader may reuse its arrays), keeping the file it came from."""
    copy = {name: np.array(array, copy=True) for name, array in feed.items()}
    return SourcedFeed(copy, feed.source) if isinstance(feed, SourcedFeed) else copy


class HoldBack:
    """Sets calibration feeds aside for evaluation while they stream past (see the module
    docstring).

    Args:
        every: Hold back the ``every``-th, ``2·every``-th, ... feed.
        limit: Hold back at most this many.
    """

    def __init__(self, every: int = EVAL_EVERY, limit: int = EVAL_MAX) -> None:
        self.every = every
        self.limit = limit
        self.held: list[dict[str, np.ndarray]] = []
        self.first: list[dict[str, np.ndarray]] = []  # fallback while nothing is held
        self.seen = 0

    def split(self, feeds: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """``feeds`` without the held-back ones, which are copied into :attr:`held`."""
        for feed in feeds:
            self.seen += 1
            if self.seen % self.every == 0 and len(self.held) < self.limit:
                self.held.append(_copy(feed))
                self.first.clear()
                continue
            if not self.held and len(self.first) < self.every - 1:
                self.first.append(_copy(feed))
            yield feed

    def scan(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        """Read ``feeds`` only to hold some back (statistics came from elsewhere); stops as
        soon as :attr:`limit` feeds are held."""
        for _ in self.split(feeds):
            if len(self.held) >= self.limit:
                return

    def calibration_count(self, total: int | None) -> int | None:
        """How many of ``total`` feeds calibration will see."""
        if total is None:
            return None
        return total - min(total // self.every, self.limit)

    def feeds(self) -> tuple[list[dict[str, np.ndarray]], str]:
        """(the evaluation feeds, what they are)."""
        if self.held:
            count = len(self.held)
            return self.held, (f"{count} calibration sample{'s' if count != 1 else ''} held "
                               f"back from calibration (every {self.every}th)")
        count = len(self.first)
        return self.first, (f"{count} calibration sample{'s' if count != 1 else ''} "
                            "(too few to hold back)")


def random_feeds(specs: Sequence[InputSpec], count: int = RANDOM_FEEDS, seed: int = 0
                 ) -> list[dict[str, np.ndarray]] | None:
    """``count`` standard-normal feeds, or None when an input is not a float tensor of known
    rank. A symbolic dimension is 1 where it first appears on axis 0, else :data:`RANDOM_DIM`
    (the same for every axis that shares its name)."""
    if not specs or any(s.dtype.kind != "f" or s.shape is None for s in specs):
        return None
    sizes: dict[str, int] = {}
    shapes = []
    for spec in specs:
        assert spec.shape is not None
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim >= 0:
                shape.append(dim)
                continue
            default = 1 if axis == 0 else RANDOM_DIM
            shape.append(sizes.setdefault(dim, default) if isinstance(dim, str) else default)
        shapes.append(shape)
    rng = np.random.default_rng(seed)
    return [{s.name: rng.standard_normal(shape).astype(s.dtype) for s, shape in
             zip(specs, shapes, strict=True)} for _ in range(count)]


def evaluate_quantized(
    float_model: Any,
    quantized_model: str | os.PathLike,
    *,
    eval_data: Any = None,
    hold_back: HoldBack | None = None,
    data_path: Any = None,
    random_ok: bool = True,
    float_bytes: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: bool = False,
) -> Fidelity | None:
    """The fidelity of a quantized model on the best feeds available (module docstring).

    Args:
        float_model: The original float model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``).
        quantized_model: The written quantized model.
        eval_data: The caller's evaluation data (any feed source); its errors are raised.
        hold_back: Calibration feeds set aside (or the first ones) — used without eval_data.
        data_path: The calibration data, when it is a folder or file (for the report hint).
        random_ok: Measure on random feeds when there is no other data.
        float_bytes: Size of the float model (implicit measurement is skipped above
            :data:`IMPLICIT_MAX_BYTES`).
        providers: onnxruntime execution providers.
        progress: Show a progress bar.

    Returns:
        The fidelity, or None when it was not measured.

    Raises:
        FeedError, EvaluationError: Only for ``eval_data``.
    """
    if eval_data is not None:
        fidelity = measure_fidelity(float_model, quantized_model, eval_data, providers=providers,
                                    progress=progress)
        what = f"'{os.fspath(eval_data)}'" if isinstance(eval_data, (str, os.PathLike)) \
            else "the evaluation data"
        fidelity.source = f"{_samples(fidelity.samples)} from {what}"
        return fidelity
    if float_bytes > IMPLICIT_MAX_BYTES:
        logger.info("accuracy not measured: the model is large; pass evaluation data to "
                    "measure it")
        return None
    try:
        return _implicit(float_model, quantized_model, hold_back, data_path, random_ok,
                         providers, progress)
    except QuantizationError as err:
        logger.warning("accuracy not measured: %s", err)
        return None


def _implicit(float_model: Any, quantized_model: str | os.PathLike, hold_back: HoldBack | None,
              data_path: Any, random_ok: bool, providers: Sequence[str], progress: bool
              ) -> Fidelity | None:
    if hold_back is not None:
        feeds, source = hold_back.feeds()
        if feeds:
            fidelity = measure_fidelity(float_model, quantized_model, feeds, source=source,
                                        providers=providers, progress=progress)
            if isinstance(data_path, (str, os.PathLike)):
                fidelity.data = os.fspath(data_path)
            return fidelity
    if not random_ok:
        return None
    made = random_feeds(model_input_specs(float_model)[0])
    if made is None:
        logger.info("accuracy not measured: the model has non-float inputs and no evaluation "
                    "data was given")
        return None
    return measure_fidelity(float_model, quantized_model, made, providers=providers,
                            source=f"{len(made)} {RANDOM_SOURCE}", progress=progress)


def _samples(count: int) -> str:
    return f"{count} sample{'s' if count != 1 else ''}"
