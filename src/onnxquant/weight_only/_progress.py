"""Progress of the weight-only steps that used to run silently: GPTQ quantizing its weights
after the calibration bar, and RTN/HQQ weights quantized while the model is written (lazy
mode)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["SaveProgress"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SaveProgress:
    """Counts the weights that are quantized while the model is written.

    :meth:`wrap` each deferred quantize function before handing it to the emitter; open
    :meth:`saving` around the save, and every weight quantized then moves the bar.
    """

    def __init__(self) -> None:
        self.pending = 0
        self._bar: Any = None

    def wrap(self, make: Callable[[], T]) -> Callable[[], T]:
        """``make``, counted as one pending weight that updates the bar when it runs."""
        self.pending += 1

        def run() -> T:
            result = make()
            if self._bar is not None:
                self._bar.update(1)
            return result

        return run

    @contextmanager
    def saving(self, path: object, progress: bool) -> Iterator[None]:
        """A bar (and an info line) while the model is written and its pending weights are
        quantized."""
        if self.pending:
            logger.info("writing '%s'; %d weights are quantized while it is written", path,
                        self.pending)
        with tqdm(total=self.pending, desc="quantizing weights while writing", unit="weight",
                  disable=not progress or not self.pending) as bar:
            self._bar = bar
            try:
                yield
            finally:
                self._bar = None
