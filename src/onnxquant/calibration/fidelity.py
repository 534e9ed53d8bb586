"""How close a quantized model's outputs stay to its float model's: SQNR, cosine similarity
and argmax agreement per output, measured in onnxruntime feed by feed.

:func:`measure_fidelity` runs the float model and the quantized model (with onnxruntime's
default graph optimizations, as it will be run) on the same feeds and folds every output pair
into a streaming :class:`~onnxquant.core.metrics.ErrorAccumulator`, so memory does not grow with
the number of feeds. :class:`Fidelity` holds the result; :meth:`Fidelity.is_low` flags outputs
below the thresholds :data:`LOW_COSINE`, :data:`LOW_ARGMAX` and :data:`LOW_SQNR_DB`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxquant.calibration._validate import InputSpec, feed_name, validate_feed
from onnxquant.calibration.readers import count_feeds, iter_feeds
from onnxquant.calibration.session import make_session, model_input_specs, session_from_path
from onnxquant.core import tempdirs
from onnxquant.core.errors import CalibrationError, EvaluationError
from onnxquant.core.metrics import ErrorAccumulator
from onnxquant.core.summary_text import shorten

__all__ = ["OutputFidelity", "Fidelity", "measure_fidelity", "accuracy_lines", "RANDOM_SOURCE",
           "LOW_COSINE", "LOW_ARGMAX", "LOW_SQNR_DB", "NOT_MEASURED"]

logger = logging.getLogger(__name__)

LOW_COSINE = 0.98
"""An output whose mean cosine similarity to the float output is below this is low."""
LOW_ARGMAX = 0.95
"""An output whose argmax (last axis) agrees with the float output's less often is low."""
LOW_SQNR_DB = 10.0
"""An output whose signal-to-quantization-noise ratio is below this many dB is low."""
NOT_MEASURED = "accuracy:     not measured (pass --eval DIR)"
MAX_LINES = 8
"""Outputs listed in a summary at most."""
RANDOM_SOURCE = "random feeds — pass eval_data / --eval for real data"
"""How fidelity measured on made-up feeds describes them (after their count)."""
"""The summary line when no fidelity was measured."""


@dataclasses.dataclass
class OutputFidelity:
    """Float vs quantized agreement of one model output.

    Attributes:
        name: The output name.
        sqnr_db: ``10·log10(Σx² / Σ(x−y)²)`` over all samples (``-inf`` when the quantized
            output has NaN/Inf where the float output is finite).
        cosine: Mean per-sample cosine similarity.
        argmax_agreement: Fraction of positions whose argmax over the last axis agrees
            (equal elements for integer outputs); None when the output has no class axis.
    """

    name: str
    sqnr_db: float
    cosine: float
    argmax_agreement: float | None

    def low_reasons(self) -> list[str]:
        """Which thresholds this output misses, e.g. ``["cosine 0.912 < 0.98"]``."""
        reasons = []
        if self.cosine < LOW_COSINE:
            reasons.append(f"cosine {self.cosine:.4f} < {LOW_COSINE}")
        if self.argmax_agreement is not None and self.argmax_agreement < LOW_ARGMAX:
            reasons.append(f"argmax {100 * self.argmax_agreement:.1f} % < "
                           f"{100 * LOW_ARGMAX:.0f} %")
        if self.sqnr_db < LOW_SQNR_DB:
            reasons.append(f"SQNR {self.sqnr_db:.1f} dB < {LOW_SQNR_DB:g} dB")
        return reasons

    def is_low(self) -> bool:
        """True when any threshold is missed."""
        return bool(self.low_reasons())

    def describe(self) -> str:
        """``SQNR 23.4 dB, cosine 0.9987, argmax 99.2 %``."""
        text = f"SQNR {self.sqnr_db:.1f} dB, cosine {self.cosine:.4f}"
        if self.argmax_agreement is not None:
            text += f", argmax {100 * self.argmax_agreement:.1f} %"
        return text


@dataclasses.dataclass
class Fidelity:
    """Float vs quantized agreement of every numeric output.

    Attributes:
        outputs: Per output name.
        samples: Feeds both models ran.
        source: What the feeds were, e.g. ``"8 calibration samples held back from
            calibration"`` or ``"16 samples from --eval"``.
        float_model: The float model's path, when it has one (for the report command).
        quantized_model: The quantized model's path.
        data: The evaluation data's path, when it came from a folder or file.
    """

    outputs: dict[str, OutputFidelity]
    samples: int
    source: str
    float_model: str | None = None
    quantized_model: str | None = None
    data: str | None = None

    def is_low(self) -> bool:
        """True when any output misses a threshold (cosine < :data:`LOW_COSINE`, argmax
        agreement < :data:`LOW_ARGMAX` or SQNR < :data:`LOW_SQNR_DB`)."""
        return any(o.is_low() for o in self.outputs.values())

    def worst(self) -> OutputFidelity | None:
        """The output to look at first: the low one with the lowest SQNR (of all outputs
        when none is low); None without outputs."""
        pool = [o for o in self.outputs.values() if o.is_low()] or list(self.outputs.values())
        return min(pool, key=lambda o: (o.sqnr_db, o.cosine), default=None)

    def lines(self) -> list[str]:
        """One line per output: ``logits  SQNR 23.4 dB, cosine 0.9987, argmax 99.2 %`` (at
        most :data:`MAX_LINES`: then the worst ones, and how many more there are)."""
        if not self.outputs:
            return ["(no numeric outputs to compare)"]
        shown = list(self.outputs.values())
        if len(shown) > MAX_LINES:
            shown = sorted(shown, key=lambda o: (not o.is_low(), o.sqnr_db))[:MAX_LINES]
        names = {o.name: shorten(o.name) for o in shown}
        width = max(len(n) for n in names.values())
        lines = [f"{names[o.name]:<{width}}  {o.describe()}" + ("  <- low" if o.is_low() else "")
                 for o in shown]
        if len(self.outputs) > len(shown):
            lines.append(f"... and {len(self.outputs) - len(shown)} more outputs (the lowest "
                         "SQNR are shown)")
        return lines

    def warning(self, suggestions: Sequence[str] = ()) -> str | None:
        """The low-accuracy warning (naming the worst output, the report command and
        ``suggestions``), or None when no output is low."""
        worst = self.worst()
        if worst is None or not self.is_low():
            return None
        command = (f"onnxquant report {self.float_model or 'FLOAT'} "
                   f"{self.quantized_model or 'QUANT'} --data {self.data or 'DIR'} "
                   "-o report.html")
        text = f"accuracy dropped: output '{worst.name}' has {', '.join(worst.low_reasons())}"
        if RANDOM_SOURCE in self.source:
            text += " on random feeds (pass --eval DIR with real data to confirm)"
        text += f". See which layers lose it: {command}"
        if suggestions:
            text += "; or try " + _either(suggestions)
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (non-finite SQNR as ``None``)."""
        def number(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "samples": self.samples, "source": self.source, "low": self.is_low(),
            "outputs": {name: {"sqnr_db": number(o.sqnr_db), "cosine": number(o.cosine),
                               "argmax_agreement": o.argmax_agreement, "low": o.is_low()}
                        for name, o in self.outputs.items()},
        }


def _either(options: Sequence[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def accuracy_lines(fidelity: Fidelity | None) -> list[str]:
    """The accuracy block of a summary: the source and one line per output (or
    :data:`NOT_MEASURED`). The warning of :meth:`Fidelity.warning` is the caller's to show."""
    if fidelity is None:
        return [NOT_MEASURED]
    return [f"accuracy:     float vs quantized on {fidelity.source}:",
            *(f"  {line}" for line in fidelity.lines())]


def measure_fidelity(
    float_model: str | os.PathLike | onnx.ModelProto | ir.Model,
    quantized_model: str | os.PathLike,
    feeds: Any,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    max_samples: int | None = None,
    source: str = "",
    progress: bool = False,
) -> Fidelity:
    """Run both models on ``feeds`` and measure how close the quantized outputs stay.

    Args:
        float_model: The float model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``; never
            modified).
        quantized_model: Path of the quantized model (run with default graph optimizations).
        feeds: A reader with ``get_next()``, an iterable of ``{input_name: array}`` dicts, a
            single dict, or a data folder / ``.npz`` file.
        providers: onnxruntime execution providers for both sessions.
        max_samples: Stop after this many feeds.
        source: What the feeds are, for the summary (default ``"N samples"``).
        progress: Show a progress bar.

    Returns:
        The :class:`Fidelity` of every output both models have (non-numeric outputs, such as
        strings, sequences or maps, are skipped).

    Raises:
        FeedError: A feed does not fit the float model's inputs (the message names it).
        EvaluationError: onnxruntime cannot load a model or fails on a feed, the outputs of
            the two models differ in size, or ``feeds`` yields nothing.
    """
    with tempdirs.private_dir(None, "onnxquant-eval-") as workdir:
        reference, specs, optional = _float_session(float_model, providers, workdir)
        candidate = session_from_path(quantized_model, providers, "the quantized model")
        quantized_names = {o.name for o in candidate.get_outputs()}
        names = [o.name for o in reference.get_outputs() if o.name in quantized_names]
        accumulators: dict[str, ErrorAccumulator] = {}
        samples = _accumulate(reference, candidate, names, specs, optional, feeds,
                              accumulators, max_samples, progress)
    outputs = {name: OutputFidelity(name, acc.sqnr_db, acc.cosine, acc.argmax_agreement)
               for name, acc in accumulators.items()}
    float_path = os.fspath(float_model) if isinstance(float_model, (str, os.PathLike)) else None
    return Fidelity(
        outputs=outputs, samples=samples,
        source=source or f"{samples} sample{'s' if samples != 1 else ''}",
        float_model=float_path, quantized_model=os.fspath(quantized_model),
        data=os.fspath(feeds) if isinstance(feeds, (str, os.PathLike)) else None)


def _accumulate(reference: ort.InferenceSession, candidate: ort.InferenceSession,
                names: list[str], specs: list[InputSpec], optional: set[str], feeds: Any,
                accumulators: dict[str, ErrorAccumulator], max_samples: int | None,
                progress: bool) -> int:
    """Fold every feed's output pairs into ``accumulators``; returns the feeds run."""
    total = count_feeds(feeds)
    if max_samples is not None:
        total = min(total, max_samples) if total is not None else max_samples
    samples = 0
    with tqdm(total=total, desc="evaluating", unit="sample", disable=not progress) as bar:
        for index, raw in enumerate(iter_feeds(feeds, specs=specs)):
            if max_samples is not None and index >= max_samples:
                break
            feed = validate_feed(raw, specs, index=index, optional=optional)
            expected = _run(reference, names, feed, index, "float")
            actual = _run(candidate, names, feed, index, "quantized")
            for name, ref, got in zip(names, expected, actual, strict=True):
                _update(accumulators, name, ref, got, feed_name(feed, index))
            samples += 1
            bar.update(1)
    if samples == 0:
        raise EvaluationError("the evaluation data yielded no feeds; give at least one "
                              "{input_name: array} dict")
    return samples


def _update(accumulators: dict[str, ErrorAccumulator], name: str, ref: Any, got: Any,
            where: str) -> None:
    if not isinstance(ref, np.ndarray) or ref.dtype.kind not in "biuf":
        return  # strings, sequences, maps: nothing to measure
    got = np.asarray(got)
    if got.size != ref.size:
        raise EvaluationError(
            f"output '{name}' on evaluation {where}: the float model gives shape "
            f"{list(ref.shape)}, the quantized model {list(got.shape)}")
    if _too_large(ref) or _too_large(got):  # float32 sums of squares would overflow
        ref, got = ref.astype(np.float64), got.astype(np.float64)
    accumulators.setdefault(name, ErrorAccumulator()).update(ref, got)


def _too_large(a: np.ndarray) -> bool:
    """A float32 array whose sum of squares may not fit in float32."""
    if a.dtype != np.float32 or a.size == 0:
        return False
    finite = a[np.isfinite(a)]
    limit = math.sqrt(float(np.finfo(np.float32).max) / a.size) / 2
    return finite.size > 0 and float(np.abs(finite).max()) > limit


def _run(session: ort.InferenceSession, names: list[str], feed: dict, index: int,
         which: str) -> list:
    try:
        return session.run(names, feed)
    except Exception as err:  # onnxruntime raises its own exception types
        raise EvaluationError(
            f"onnxruntime failed to run the {which} model on evaluation "
            f"{feed_name(feed, index)}: {err}") from err


def _float_session(model: Any, providers: Sequence[str], workdir: Path
                   ) -> tuple[ort.InferenceSession, list[InputSpec], set[str]]:
    """The float model's session (default optimizations), input specs and optional inputs."""
    specs, optional = model_input_specs(model)
    if isinstance(model, (str, os.PathLike)):
        return session_from_path(model, providers, "the float model"), specs, optional
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    try:
        session = make_session(model, providers, workdir, optimize=True)
    except CalibrationError as err:
        raise EvaluationError(f"onnxruntime cannot load the float model: {err.__cause__ or err}"
                              ) from err
    return session, specs, optional
