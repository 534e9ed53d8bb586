"""Timing a float model against its quantized form in onnxruntime, for the latency guards.

Both models run in one process, 1 intra-op thread, sequential, on the same feeds: a few
warm-up runs each, then runs interleaved (the order flipping every time, so neither model
gains from the other's warm caches) until :data:`BUDGET_S`; the medians are compared.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from onnxquant.core.model_io import model_size_bytes

__all__ = ["Timing", "Timer", "ort_timer", "NOISE_MARGIN", "BUDGET_S", "MAX_RUN_S",
           "MAX_MODEL_BYTES"]

NOISE_MARGIN = 0.03
"""The quantized model counts as slower only above ``(1 + NOISE_MARGIN) ×`` float."""
BUDGET_S = 2.0
"""Time for one timing of both models (warm-up included)."""
MAX_RUN_S = 0.25
"""A model whose single run takes longer is not timed (the check is skipped, with a note)."""
MAX_MODEL_BYTES = 512 << 20
"""Larger models are not timed."""
_WARMUP = 3
_MIN_RUNS, _MAX_RUNS = 5, 40


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median latencies (ms) of the float and the quantized model, timed interleaved."""

    float_ms: float
    quantized_ms: float
    runs: int = 0

    @property
    def ratio(self) -> float:
        return self.quantized_ms / self.float_ms if self.float_ms > 0 else 1.0

    def describe(self) -> str:
        return (f"whole model measured {self.ratio:.2f}x float (float {self.float_ms:.3f} ms, "
                f"quantized {self.quantized_ms:.3f} ms, 1 thread, median of {self.runs})")


Timer = Callable[[ir.Model, ir.Model], "Timing | str"]
"""Times ``(float model, quantized model)``; a string says why it could not (skipped)."""


def _session(model: ir.Model) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def ort_timer(feeds: list[dict], *, budget_s: float = BUDGET_S,
              max_run_s: float = MAX_RUN_S) -> Timer:
    """The default timer: both models in onnxruntime on ``feeds`` (the first two), warm-up
    runs, then float and quantized runs interleaved until ``budget_s``; medians."""
    feeds = feeds[:2]

    def timer(float_model: ir.Model, quantized: ir.Model) -> Timing | str:
        if not feeds:
            return "no calibration feed was kept to time on"
        if max(model_size_bytes(float_model), model_size_bytes(quantized)) > MAX_MODEL_BYTES:
            return f"model larger than {MAX_MODEL_BYTES >> 20} MB"
        try:
            sessions = [_session(float_model), _session(quantized)]
            start = time.perf_counter()
            for session in sessions:
                for index in range(_WARMUP):
                    began = time.perf_counter()
                    session.run(None, dict(feeds[index % len(feeds)]))
                    if time.perf_counter() - began > max_run_s:
                        return f"one run takes more than {max_run_s:.2f} s"
            times: list[list[float]] = [[], []]
            runs = 0
            while runs < _MAX_RUNS and (runs < _MIN_RUNS
                                        or time.perf_counter() - start < budget_s):
                feed = feeds[runs % len(feeds)]
                order = [0, 1] if runs % 2 == 0 else [1, 0]  # no order bias
                for session, out in ((sessions[i], times[i]) for i in order):
                    began = time.perf_counter()
                    session.run(None, dict(feed))
                    out.append((time.perf_counter() - began) * 1e3)
                runs += 1
        except Exception as err:  # a timing failure is no verdict on the model
            return f"onnxruntime could not time the models: {err}"
        return Timing(statistics.median(times[0]), statistics.median(times[1]), runs)

    return timer
