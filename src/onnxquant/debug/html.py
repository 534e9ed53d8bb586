"""The self-contained HTML report of a :class:`~onnxquant.debug.report.ComparisonReport`.

One file, no external resources (inline CSS, figures as base64 PNG), laid out for a person
debugging a quantized model: the verdict and what to do first, then the layers most worth
keeping float, the per-layer and per-weight plots, the worst activations' histograms, and the
full tables folded away at the end.

The figures need matplotlib, the optional ``onnxquant[report]`` extra; without it
:func:`write_html` raises :class:`ReportDependencyError` before writing anything (the JSON
report, :meth:`ComparisonReport.save_json`, needs nothing extra).
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Sequence
from pathlib import Path

from onnxquant.core.errors import QuantizationError
from onnxquant.debug._html_format import (
    CSS,
    esc,
    fmt_db,
    fmt_num,
    fmt_pct,
    table,
)
from onnxquant.debug._html_tables import full_tables, layer_row
from onnxquant.debug._html_types import LayerLike, OutputLike, ReportLike

__all__ = ["write_html", "ReportDependencyError", "output_status", "MAX_HISTOGRAMS", "TOP_LAYERS"]

logger = logging.getLogger(__name__)

TOP_LAYERS = 10
"""Rows of the "layers most worth keeping float" table."""
MAX_HISTOGRAMS = 8
"""Activation histograms drawn (the report's first, i.e. worst, ones)."""
USEFUL_GAIN_DB = 0.5
"""A layer whose sensitivity is below this is not suggested for exclusion."""
INSTALL_HINT = 'pip install "onnxquant[report]"'


class ReportDependencyError(QuantizationError, ImportError):
    """The HTML report needs matplotlib, which is not installed (``onnxquant[report]``).

    Both a :class:`QuantizationError` (caught with onnxquant's other errors) and an
    :class:`ImportError` (caught as a missing optional dependency)."""


def write_html(report: ReportLike, path: Path) -> Path:
    """Write ``report`` as one self-contained HTML file at ``path`` and return ``path``.

    Args:
        report: A :class:`~onnxquant.debug.report.ComparisonReport` (typed by the protocol
            :class:`~onnxquant.debug._html_types.ReportLike`, so this module need not import
            ``report.py``, which imports it).
        path: The ``.html`` file to write (replaced if it exists).

    Raises:
        ReportDependencyError: matplotlib is missing (``pip install "onnxquant[report]"``);
            raised before anything is written, so a caller can still write the JSON report.
    """
    _require_matplotlib()
    path = Path(path)
    sections = [_header(report), _verdict(report), _top_layers(report), _layer_section(report),
                _weight_section(report), _histogram_section(report), _full_tables(report)]
    title = f"Quantization report: {Path(report.quantized_model).name or 'model'}"
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(s for s in sections if s) + "\n</main></body></html>\n")
    path.write_text(page, encoding="utf-8")
    logger.info("wrote HTML report %s (%.0f kB)", path, len(page) / 1024)
    return path


def _require_matplotlib() -> None:
    """Raise :class:`ReportDependencyError` when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends import backend_agg  # noqa: F401
    except ImportError as err:
        raise ReportDependencyError(
            f"the HTML report needs matplotlib, which is not installed: {INSTALL_HINT} "
            f"(the JSON report does not need it)") from err


def output_status(o: OutputLike) -> str:
    """``"good"`` (cosine ≥ 0.99 and argmax ≥ 0.98), ``"bad"`` (cosine < 0.98, argmax < 0.95
    or SQNR < 10 dB) or ``"doubtful"``; a missing argmax agreement is not held against it."""
    argmax = o.argmax_agreement
    sqnr = o.sqnr_db if o.sqnr_db is not None and not math.isnan(o.sqnr_db) else -math.inf
    cos = o.cosine if o.cosine is not None and not math.isnan(o.cosine) else -math.inf
    if cos < 0.98 or (argmax is not None and argmax < 0.95) or sqnr < 10:
        return "bad"
    if cos >= 0.99 and (argmax is None or argmax >= 0.98):
        return "good"
    return "doubtful"


def _overall_status(report: ReportLike) -> str:
    """The worst output's status (``"doubtful"`` without outputs)."""
    statuses = {output_status(o) for o in report.outputs.values()}
    for status in ("bad", "doubtful", "good"):
        if status in statuses:
            return status
    return "doubtful"


def _header(report: ReportLike) -> str:
    rows = [("Float model", report.float_model or "n/a"),
            ("Quantized model", report.quantized_model or "n/a"),
            ("Samples", f"outputs on {report.samples}, layers on the first "
                        f"{report.layer_samples}, {report.sensitivity_samples} per "
                        "sensitivity measurement"),
            ("Wall time", f"{report.seconds:.1f} s"),
            ("Compared", f"{len(report.layers)} layers, {len(report.weights)} weights, "
                         f"{len(report.activations)} activations")]
    items = "".join(f"<dt>{esc(k)}</dt><dd><span class=\"name\">{esc(v)}</span></dd>"
                    if "model" in k else f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)
    return f"<h1>Quantized vs float model</h1><dl class=\"meta\">{items}</dl>"


def _verdict(report: ReportLike) -> str:
    status = _overall_status(report)
    label = {"good": "Faithful", "doubtful": "Doubtful", "bad": "Degraded"}[status]
    rows = []
    for name, o in report.outputs.items():
        s = output_status(o)
        rows.append([f"<span class=\"name\">{esc(name)}</span>", fmt_db(o.sqnr_db),
                     fmt_num(o.cosine, 5), fmt_pct(o.argmax_agreement),
                     f"<span class=\"badge {s}\">{s}</span>"])
    outputs = table(["output", "SQNR", "cosine", "argmax agreement", ""], rows,
                    numeric=(1, 2, 3)) if rows else "<p>No outputs were compared.</p>"
    return (f"<section class=\"verdict {status}\"><h2>Verdict: {label}</h2>{outputs}"
            f"<p class=\"advice\">{_advice(report, status)}</p>"
            "<p class=\"note\">good: cosine ≥ 0.99 and argmax ≥ 0.98; bad: cosine &lt; 0.98, "
            "argmax &lt; 0.95 or SQNR &lt; 10 dB; doubtful: in between.</p></section>")


def _exclude_option(names: list[str]) -> str:
    """``--exclude-nodes a,b`` as a shell-quoted, escaped ``<code>`` element."""
    return (f"<code><span class=\"opt\">--exclude-nodes</span> "
            f"{esc(shlex.quote(','.join(names)))}</code>")


def _group_advice(report: ReportLike, best_layer: float) -> str:
    """A sentence when keeping a whole op type float helps clearly more than any one layer."""
    groups = sorted(report.op_type_sensitivity.items(), key=lambda kv: -kv[1])
    if not groups or groups[0][1] < max(USEFUL_GAIN_DB, best_layer + 3.0):
        return ""
    op, gain = groups[0]
    return (f"Keeping every <code>{esc(op)}</code> float raises the output SQNR by {gain:.1f} "
            f"dB — pass <code><span class=\"opt\">--exclude-op-types</span> "
            f"{esc(shlex.quote(op))}</code> to <code>onnxquant static</code>"
            " (the error is spread over many layers of that type). ")


def _advice(report: ReportLike, status: str) -> str:
    """One or two sentences (HTML) saying what to do first."""
    ranked = report.ranked_layers()
    helpful = [x for x in ranked if (x.sensitivity_db or 0.0) >= USEFUL_GAIN_DB]
    group = _group_advice(report, max((x.sensitivity_db or 0.0) for x in ranked)
                          if ranked else 0.0)
    if group and status != "good":
        return group + ("Then compare again." if not helpful else
                        f"Single layers gain less: <code>{esc(helpful[0].node)}</code> "
                        f"{helpful[0].sensitivity_db:+.1f} dB.")
    if status == "good":
        text = "The quantized outputs match the float model closely; nothing needs to change."
        if helpful:
            text += (f" For more margin, keeping <code>{esc(helpful[0].node)}</code> float "
                     f"would add {helpful[0].sensitivity_db:.1f} dB of output SQNR.")
        return text
    if helpful:
        top = helpful[0]
        text = (f"Keeping <code>{esc(top.node)}</code> ({esc(top.op_type)}) float raises the "
                f"output SQNR by {top.sensitivity_db:.1f} dB — pass "
                f"{_exclude_option([top.node])} to <code>onnxquant static</code>.")
        if len(helpful) > 1:
            names = [x.node for x in helpful[:3]]
            text += (f" If that is not enough, exclude the next ones too "
                     f"({_exclude_option(names)}) and compare again: the gains do not simply "
                     "add up.")
        return text
    return _advice_unmeasured(report, ranked)


def _advice_unmeasured(report: ReportLike, ranked: Sequence[LayerLike]) -> str:
    """Advice when no single layer was measured to help."""
    if any(x.sensitivity_db is not None for x in report.layers):
        return ("No single layer recovers the output when kept float: the error is spread "
                "over many layers. Try another calibration (<code>--method percentile</code>, "
                "<code>--method entropy</code>), <code>--per-channel</code> weights, or "
                "16-bit activations (<code>--activation-type uint16</code>).")
    noisy = [x for x in ranked if x.isolated_sqnr_db is not None]
    if noisy:
        x = noisy[0]
        return (f"Sensitivity was not measured. The layer adding the most noise on its own is "
                f"<code>{esc(x.node)}</code> ({esc(x.op_type)}, isolated SQNR "
                f"{fmt_db(x.isolated_sqnr_db)}) — try {_exclude_option([x.node])} with "
                "<code>onnxquant static</code> and compare again.")
    where = "; see the unmatched lists below" if any(report.unmatched.values()) else ""
    return f"No quantized layer was matched to the float model{where}."


def _top_layers(report: ReportLike) -> str:
    ranked = report.ranked_layers()[:TOP_LAYERS]
    if not ranked:
        return ""
    rows = [[str(i + 1), *layer_row(x)] for i, x in enumerate(ranked)]
    return ("<h2>Layers most worth keeping float</h2><p class=\"note\">Measured sensitivity "
            "(output SQNR gain when only that layer stays float) first, then the unmeasured "
            "layers by isolated SQNR, lowest first.</p>"
            + table(["#", "node", "op type", "sensitivity", "isolated SQNR",
                     "accumulated SQNR"], rows, numeric=(0, 3, 4, 5))
            + _op_type_table(report))


def _op_type_table(report: ReportLike) -> str:
    """Gains of keeping every layer of an op type float (``--exclude-op-types``)."""
    groups = sorted(report.op_type_sensitivity.items(), key=lambda kv: -kv[1])
    if not groups:
        return ""
    rows = [[f"<code>{esc(op)}</code>", f"{db:+.1f} dB"] for op, db in groups]
    return ("<h3>Op types kept float as a group</h3><p class=\"note\">Output SQNR gain when "
            "every quantized layer of one op type stays float "
            "(<code>--exclude-op-types</code>).</p>"
            + table(["op type", "sensitivity"], rows, numeric=(1,)))


def _figure(uri: str | None, alt: str, caption: str = "") -> str:
    """An ``<img>`` of a data URI in a ``<figure>`` ("" when there is no figure)."""
    if uri is None:
        return ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure><img alt=\"{esc(alt)}\" src=\"{uri}\">{cap}</figure>"


def _layer_section(report: ReportLike) -> str:
    from onnxquant.debug._html_plots import layer_figure

    if not report.layers:
        return ""
    return ("<h2>Layers along the graph</h2><p class=\"note\">Accumulated SQNR falls as noise "
            "builds up; a layer whose isolated SQNR is low adds much noise on its own. A "
            "triangle marks an infinite value.</p>"
            + _figure(layer_figure(report.layers), "per-layer SQNR and sensitivity"))


def _weight_section(report: ReportLike) -> str:
    from onnxquant.debug._html_plots import weight_figure

    if not report.weights:
        return ""
    return ("<h2>Weights</h2><p class=\"note\">Each quantized weight against its float "
            "original; red below 10 dB, amber below 20 dB.</p>"
            + _figure(weight_figure(report.weights), "weight SQNR"))


def _histogram_section(report: ReportLike) -> str:
    from onnxquant.debug._html_plots import TITLE_CHARS, histogram_figure

    hists = report.histograms[:MAX_HISTOGRAMS]
    if not hists:
        return ""
    figures = "".join(
        _figure(histogram_figure(h), f"histogram of {h.tensor}",
                h.tensor if len(h.tensor) > TITLE_CHARS else "") for h in hists)
    more = len(report.histograms) - len(hists)
    note = f" ({more} more in the JSON report)" if more > 0 else ""
    return ("<h2>Worst activations</h2><p class=\"note\">Float values over the samples (log "
            "scale); the shaded band is the range the quantization grid represents, red bars "
            f"are clipped. \"below\"/\"above\": values outside the histogram's bins{esc(note)}."
            f"</p><div class=\"grid2\">{figures}</div>")


def _full_tables(report: ReportLike) -> str:
    return "<h2>All measurements</h2>" + full_tables(report)
