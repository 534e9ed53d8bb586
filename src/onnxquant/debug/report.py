"""The result of :func:`onnxquant.compare`: per output, per layer, per weight and per activation
measures, the sensitivity ranking and histograms — as Python objects, as the JSON contract
written beside the HTML report, and as a short text summary.

JSON contract (``REPORT.json``; numbers are floats, ``null`` where not measured or infinite):

- ``outputs``: ``{name: {sqnr_db, cosine, argmax_agreement}}`` — the quantized model's outputs
  against the float model's, over all samples;
- ``layers``: ``[{node, op_type, sqnr_db, isolated_sqnr_db, sensitivity_db, ...}]`` in graph
  order — ``sqnr_db``: the layer's output against float with every quantization before it
  (accumulated); ``isolated_sqnr_db``: the same layer fed the float model's inputs (the noise it
  adds on its own); ``sensitivity_db``: how much the mean output SQNR rises when only this layer
  is left out of quantization, as ``--exclude-nodes`` leaves it out: its weights float, and its
  inputs float unless a quantized layer writes them (measured for the most suspicious layers,
  null elsewhere);
- ``weights``: ``{name: sqnr_db}`` of each quantized weight against its float original
  (without the biases bias correction changed on purpose);
- ``activations``: ``{name: {sqnr_db, quantization_sqnr_db, scheme, clip_min, clip_max}}``;
- ``histograms``: the float values of the worst activations with the clip range chosen;
- ``op_type_sensitivity``: ``{op_type: dB}``, the mean output SQNR gain of keeping every layer
  of that op type float (the most frequent op types; ``--exclude-op-types`` in the CLI);
- ``samples`` (outputs), ``layer_samples`` (layers, activations, histograms: the first ones),
  ``sensitivity_samples``, ``float_model``, ``quantized_model``, ``unmatched``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OutputStats", "LayerStats", "ActivationStats", "Histogram", "ComparisonReport"]


def _number(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


@dataclasses.dataclass
class OutputStats:
    """One model output of the quantized model against the float model."""

    name: str
    sqnr_db: float
    cosine: float
    argmax_agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"sqnr_db": _number(self.sqnr_db), "cosine": _number(self.cosine, 6),
                "argmax_agreement": _number(self.argmax_agreement, 6)}


@dataclasses.dataclass
class LayerStats:
    """One quantized layer (see the module docstring for the three measures).

    Attributes:
        node: The float model's node name (the quantized node's when it has none).
        op_type: The float operator.
        output: The float tensor its output is compared with.
        quantized_node: The node in the quantized model.
    """

    node: str
    op_type: str
    sqnr_db: float | None
    isolated_sqnr_db: float | None
    sensitivity_db: float | None
    output: str
    quantized_node: str

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "sqnr_db": _number(self.sqnr_db),
                "isolated_sqnr_db": _number(self.isolated_sqnr_db),
                "sensitivity_db": _number(self.sensitivity_db), "output": self.output,
                "quantized_node": self.quantized_node}


@dataclasses.dataclass
class ActivationStats:
    """One quantized activation.

    Attributes:
        sqnr_db: Its dequantized value in the quantized model against float (accumulated).
        quantization_sqnr_db: The float values quantized with its parameters alone.
        scheme: Element type and granularity.
        clip_min: Smallest value its grid represents.
        clip_max: Largest value its grid represents.
    """

    name: str
    sqnr_db: float | None
    quantization_sqnr_db: float | None
    scheme: str
    clip_min: float
    clip_max: float

    def to_dict(self) -> dict[str, Any]:
        return {"sqnr_db": _number(self.sqnr_db),
                "quantization_sqnr_db": _number(self.quantization_sqnr_db),
                "scheme": self.scheme, "clip_min": _number(self.clip_min, 8),
                "clip_max": _number(self.clip_max, 8)}


@dataclasses.dataclass
class Histogram:
    """Float values of one activation over the samples, with its clip range.

    Attributes:
        edges: Bin edges (``len(counts) + 1``).
        counts: Values per bin.
        below: Values below the first edge.
        above: Values above the last edge.
        minimum: Smallest value seen.
        maximum: Largest value seen.
        clip_min: Smallest value the grid represents.
        clip_max: Largest value the grid represents.
    """

    tensor: str
    edges: np.ndarray
    counts: np.ndarray
    below: int
    above: int
    minimum: float
    maximum: float
    clip_min: float
    clip_max: float

    @property
    def clipped_fraction(self) -> float:
        """Fraction of values outside the clip range (approximate at bin resolution)."""
        total = int(self.counts.sum()) + self.below + self.above
        if not total:
            return 0.0
        centers = (self.edges[:-1] + self.edges[1:]) / 2
        outside = self.counts[(centers < self.clip_min) | (centers > self.clip_max)].sum()
        return float(outside + self.below + self.above) / total

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "edges": [_number(e, 8) for e in self.edges],
                "counts": [int(c) for c in self.counts], "below": self.below,
                "above": self.above, "min": _number(self.minimum, 8),
                "max": _number(self.maximum, 8), "clip": [_number(self.clip_min, 8),
                                                          _number(self.clip_max, 8)],
                "clipped_fraction": _number(self.clipped_fraction, 6)}


@dataclasses.dataclass
class ComparisonReport:
    """Where a quantized model loses accuracy against its float model.

    Attributes:
        outputs: Per model output.
        layers: Per quantized layer, in graph order.
        weights: SQNR (dB) of each quantized weight against its float original (biases that
            bias correction changed on purpose are left out).
        activations: Per quantized activation.
        histograms: Float values of the worst activations (worst first).
        op_type_sensitivity: Output SQNR gain (dB) of keeping every layer of an op type
            float, for the most frequent op types.
        samples: Samples whose outputs were compared.
        sensitivity_samples: Samples each sensitivity measurement used.
        layer_samples: Samples over which layers, weights and activations were compared.
        float_model: Where the float model came from.
        quantized_model: Where the quantized model came from.
        unmatched: Quantized weights/activations with no float counterpart found.
        seconds: Wall time of the comparison.
    """

    outputs: dict[str, OutputStats]
    layers: list[LayerStats]
    weights: dict[str, float]
    activations: dict[str, ActivationStats]
    histograms: list[Histogram]
    samples: int
    sensitivity_samples: int
    layer_samples: int = 0
    float_model: str = ""
    quantized_model: str = ""
    unmatched: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    op_type_sensitivity: dict[str, float] = dataclasses.field(default_factory=dict)

    def ranked_layers(self) -> list[LayerStats]:
        """Layers most worth keeping float first: measured sensitivity (highest first), then
        the unmeasured by isolated SQNR (lowest first)."""
        measured = sorted((x for x in self.layers if x.sensitivity_db is not None),
                          key=lambda x: -(x.sensitivity_db or 0.0))
        rest = sorted((x for x in self.layers if x.sensitivity_db is None),
                      key=lambda x: x.isolated_sqnr_db if x.isolated_sqnr_db is not None
                      else math.inf)
        return measured + rest

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract (see the module docstring)."""
        return {
            "float_model": self.float_model, "quantized_model": self.quantized_model,
            "samples": self.samples, "layer_samples": self.layer_samples,
            "sensitivity_samples": self.sensitivity_samples,
            "seconds": round(self.seconds, 3),
            "outputs": {name: o.to_dict() for name, o in self.outputs.items()},
            "layers": [x.to_dict() for x in self.layers],
            "weights": {name: _number(db) for name, db in self.weights.items()},
            "activations": {name: a.to_dict() for name, a in self.activations.items()},
            "histograms": [h.to_dict() for h in self.histograms],
            "op_type_sensitivity": {op: _number(db) for op, db in
                                    self.op_type_sensitivity.items()},
            "unmatched": self.unmatched,
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as indented JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    def save_html(self, path: str | os.PathLike) -> Path:
        """Write the self-contained HTML report (needs matplotlib: ``onnxquant[report]``)."""
        from onnxquant.debug.html import write_html

        return write_html(self, Path(path))

    def summary(self, top: int = 5) -> str:
        """A few lines: output fidelity, then the layers most worth keeping float."""
        lines = [f"compared on {self.samples} samples"]
        for name, o in self.outputs.items():
            agree = f", argmax {o.argmax_agreement:.1%}" if o.argmax_agreement is not None \
                else ""
            lines.append(f"  output {name}: SQNR {_fmt_db(o.sqnr_db)}, cosine {o.cosine:.4f}"
                         f"{agree}")
        groups = sorted(self.op_type_sensitivity.items(), key=lambda kv: -kv[1])
        if groups:
            lines.append("keeping every layer of an op type float: " + ", ".join(
                f"{op} {db:+.1f} dB" for op, db in groups))
        ranked = self.ranked_layers()[:top]
        if ranked:
            lines.append("layers most worth keeping float:")
        for x in ranked:
            gain = f"{x.sensitivity_db:+.1f} dB output SQNR if float" \
                if x.sensitivity_db is not None else "not measured"
            lines.append(f"  {x.node} ({x.op_type}): {gain}; isolated "
                         f"{_fmt_db(x.isolated_sqnr_db)}, accumulated {_fmt_db(x.sqnr_db)}")
        return "\n".join(lines)


def _fmt_db(x: float | None) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "-inf dB" if x < 0 else "exact"
    return f"{x:.1f} dB"
