"""The full tables of the HTML comparison report (all layers, weights, activations and the
unmatched names), each folded in a ``<details>`` block (see :mod:`onnxquant.debug.html`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from onnxquant.debug._html_format import db_class, details, esc, fmt_db, fmt_num, table
from onnxquant.debug._html_types import ActivationLike, LayerLike, ReportLike

__all__ = ["full_tables", "layer_row", "db_cell", "gain_cell"]

Row = list[str | tuple[str, str]]


def db_cell(x: float | None) -> tuple[str, str]:
    """An SQNR cell coloured by :func:`db_class`."""
    return fmt_db(x), db_class(x)


def gain_cell(x: float | None) -> str:
    """A sensitivity cell: ``"+6.2 dB"`` or ``"not measured"``."""
    if x is None:
        return "not measured"
    return fmt_db(x) if not math.isfinite(x) else f"{x:+.1f} dB".replace("-", "\u2212")


def _name(text: str) -> str:
    """A tensor or node name, escaped, breakable after ``/``, ``.``, ``_`` and ``:``."""
    escaped = esc(text)
    for sep in "/._:":
        escaped = escaped.replace(sep, sep + "<wbr>")
    return f"<span class=\"name\">{escaped}</span>"


def layer_row(x: LayerLike) -> Row:
    """Node, op type, sensitivity, isolated and accumulated SQNR."""
    return [_name(x.node), esc(x.op_type), gain_cell(x.sensitivity_db),
            db_cell(x.isolated_sqnr_db), db_cell(x.sqnr_db)]


def _layers_table(layers: Sequence[LayerLike]) -> str:
    rows = [[str(i), *layer_row(x), _name(x.quantized_node), _name(x.output)]
            for i, x in enumerate(layers)]
    return table(["#", "node", "op type", "sensitivity", "isolated SQNR", "accumulated SQNR",
                  "quantized node", "output tensor"], rows, numeric=(0, 3, 4, 5))


def _sort_key(value: float | None) -> float:
    """Worst (lowest) first; None and NaN last."""
    return math.inf if value is None or math.isnan(value) else value


def _weights_table(weights: Mapping[str, float]) -> str:
    items = sorted(weights.items(), key=lambda kv: _sort_key(kv[1]))
    rows: list[Row] = [[_name(name), db_cell(db)] for name, db in items]
    return table(["weight", "SQNR"], rows, numeric=(1,))


def _activation_row(name: str, a: ActivationLike) -> Row:
    return [_name(name), db_cell(a.sqnr_db), db_cell(a.quantization_sqnr_db), esc(a.scheme),
            fmt_num(a.clip_min, 4), fmt_num(a.clip_max, 4)]


def _activations_table(activations: Mapping[str, ActivationLike]) -> str:
    items = sorted(activations.items(), key=lambda kv: _sort_key(kv[1].sqnr_db))
    rows = [_activation_row(name, a) for name, a in items]
    return table(["activation", "SQNR (in model)", "quantization SQNR", "scheme", "clip min",
                  "clip max"], rows, numeric=(1, 2, 4, 5))


def _unmatched(unmatched: Mapping[str, Sequence[str]]) -> str:
    parts = []
    for kind, names in unmatched.items():
        if names:
            items = "".join(f"<li>{_name(n)}</li>" for n in names)
            parts.append(details(f"Unmatched {kind} ({len(names)})",
                                 f"<p class=\"note\">Quantized {esc(kind)} with no float "
                                 f"counterpart found; not measured.</p>"
                                 f"<ul class=\"names\">{items}</ul>"))
    return "".join(parts)


def _scroll(content: str) -> str:
    return f"<div class=\"scroll\">{content}</div>"


def full_tables(report: ReportLike) -> str:
    """Every layer (graph order), weight and activation (worst first), and the unmatched
    names, each in a collapsed ``<details>``."""
    parts = []
    if report.layers:
        parts.append(details(f"All {len(report.layers)} layers (graph order)",
                             _scroll(_layers_table(report.layers))))
    if report.weights:
        parts.append(details(f"All {len(report.weights)} weights (worst first)",
                             _scroll(_weights_table(report.weights))))
    if report.activations:
        parts.append(details(f"All {len(report.activations)} activations (worst first)",
                             _scroll(_activations_table(report.activations))))
    parts.append(_unmatched(report.unmatched))
    if not any(parts):
        return "<p>Nothing was measured.</p>"
    return "".join(parts)
