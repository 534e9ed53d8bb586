"""What accuracy the user asks for: :class:`AccuracyTarget` (scoring:
:mod:`onnxquant.target.scoring`).

A metric compares the float model's outputs with a candidate's, sample by sample:

- ``"cosine"``: the mean over samples of the cosine similarity of all outputs (each output
  flattened, all outputs of a sample concatenated);
- ``"argmax"``: the agreement of the argmax over the last axis, over all outputs whose last
  axis is longer than 1 (rank 1-3, see :data:`onnxquant.core.metrics.MAX_CLASS_RANK`);
- ``"sqnr"``: the SQNR (dB) of all outputs of all samples together;
- a callable ``metric(reference, candidate) -> float``: both are lists (one entry per evaluation
  sample) of ``{output_name: np.ndarray}``; higher is better.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxquant.core.errors import QuantizationError
from onnxquant.target.scoring import METRICS, Metric

__all__ = ["AccuracyTarget"]


@dataclasses.dataclass
class AccuracyTarget:
    """Quantize to a stated accuracy: ``quantize_static(..., target=AccuracyTarget(...))``.

    Attributes:
        metric: ``"cosine"``, ``"argmax"``, ``"sqnr"`` (dB) or a callable (module docstring).
        min_score: The score the quantized model must reach on ``eval_data``.
        eval_data: Evaluation samples, in any form calibration data takes; by default
            calibration samples held back from calibration (every 10th, at most 16).
        max_evaluations: At most this many candidate models are evaluated in the search for
            the target (default 40); once it is met, bisecting 16-bit activations back to 8
            bits and trimming evaluate at most 14 more.
    """

    metric: str | Metric
    min_score: float
    eval_data: Any = None
    max_evaluations: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise QuantizationError(
                f"unknown accuracy metric '{self.metric}': use one of {', '.join(METRICS)} or "
                "a callable metric(reference, candidate) -> float")
        if self.max_evaluations is not None and self.max_evaluations < 1:
            raise QuantizationError("max_evaluations must be at least 1")

    @property
    def evaluations(self) -> int:
        return self.max_evaluations or 40

    def describe(self) -> str:
        name = self.metric if isinstance(self.metric, str) else \
            getattr(self.metric, "__name__", "custom metric")
        unit = " dB" if self.metric == "sqnr" else ""
        return f"{name} >= {self.min_score:g}{unit}"

    def quantize(self, model_input: Any, model_output: Any, calibration_data: Any,
                 config: Any, eval_data: Any = None) -> Any:
        """Run the search (called by :func:`onnxquant.quantize_static` with ``target=``)."""
        from onnxquant.target.search import quantize_to_target

        return quantize_to_target(model_input, model_output, calibration_data, config, self,
                                  eval_data=eval_data if eval_data is not None else
                                  self.eval_data)
