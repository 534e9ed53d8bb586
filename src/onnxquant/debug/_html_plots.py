"""The figures of the HTML comparison report, drawn on matplotlib's Agg canvas and returned as
``data:image/png;base64,...`` URIs.

matplotlib is imported inside the functions (it is the optional ``onnxquant[report]`` extra) and
pyplot is never used: each figure gets its own ``FigureCanvasAgg``, so the process-wide backend
(e.g. a notebook's) is left alone and nothing stays registered after a figure is drawn.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from onnxquant.debug._html_types import HistogramLike, LayerLike

__all__ = ["layer_figure", "weight_figure", "histogram_figure", "MAX_NAMED_TICKS", "WORST_WEIGHTS",
           "TITLE_CHARS"]

logger = logging.getLogger(__name__)

MAX_NAMED_TICKS = 60
"""Layer plots name their ticks up to this many layers (index ticks beyond)."""
WORST_WEIGHTS = 30
"""Bars in the weight chart; a histogram of all weights is added when there are more."""
TITLE_CHARS = 60
"""Tensor names in histogram titles are elided beyond this many characters."""

ACCUMULATED, ISOLATED = "#1a73e8", "#e8710a"
GAIN, NO_GAIN = "#1e8e3e", "#9aa0a6"
BAD, WARN, FINE = "#d93025", "#f29900", "#5b7fa6"
CLIP = "#1e8e3e"
_STYLE: dict[Any, Any] = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False}


def plain(text: str, limit: int = 40, keep_end: bool = False) -> str:
    """``text`` safe as matplotlib text (no mathtext) and at most ``limit`` characters: the
    middle elided (long tensor names keep their distinctive start and end), or with
    ``keep_end`` the start (node paths differ most at their end)."""
    if len(text) > limit:
        keep = limit - 1
        head = 0 if keep_end else (keep + 1) // 2
        text = text[:head] + "\u2026" + text[len(text) - (keep - head):]
    return text.replace("$", r"\$")


@contextlib.contextmanager
def _figure(width: float, height: float) -> Iterator[Figure]:
    """A constrained-layout figure on its own Agg canvas, drawn under the report's style."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        yield fig


def _data_uri(fig: Figure, dpi: int = 120) -> str:
    """The figure as a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values: Sequence[float | None]) -> np.ndarray:
    """``values`` as float64 with None and infinities as NaN (not drawn)."""
    out = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    out[~np.isfinite(out)] = np.nan
    return out


CAP_DB = 80.0
"""Layer SQNRs above this are drawn at it (a triangle on top): a layer that is exact or nearly
(a Reshape, a float op) would otherwise squash every other layer into the bottom of the plot."""


def _capped(values: Sequence[float | None]) -> list[float | None]:
    """``values`` with those above :data:`CAP_DB` (finite or not) as +inf, for drawing."""
    return [math.inf if v is not None and v > CAP_DB else v for v in values]


def _mark_infinite(ax: Axes, values: Sequence[float | None], color: str) -> None:
    """Triangles at the bottom (−∞) or top (+∞, or above the cap) of ``ax``."""
    for sign, y, marker in ((-1, 0.02, "v"), (1, 0.98, "^")):
        xs = [i for i, v in enumerate(values) if v is not None and math.isinf(v)
              and (v > 0) == (sign > 0)]
        if xs:
            ax.scatter(xs, [y] * len(xs), marker=marker, color=color, s=40, zorder=5,
                       transform=ax.get_xaxis_transform(), clip_on=False)


def layer_figure(layers: Sequence[LayerLike]) -> str | None:
    """Accumulated and isolated SQNR along graph order, and (second panel) the sensitivity of
    the measured layers as bars; None without layers."""
    if not layers:
        return None
    n = len(layers)
    x = np.arange(n)
    measured = [i for i, layer in enumerate(layers) if layer.sensitivity_db is not None]
    names = [plain(x.node, 28, keep_end=True) for x in layers] if n <= MAX_NAMED_TICKS else []
    tick_room = 0.075 * max((len(s) for s in names), default=0) + 0.4
    height = 3.4 + (2.3 if measured else 0) + tick_room
    with _figure(12, height) as fig:
        rows = 2 if measured else 1
        axes = fig.subplots(rows, 1, sharex=True, squeeze=False,
                            height_ratios=[3, 2][:rows])[:, 0]
        top = axes[0]
        acc = _capped([layer.sqnr_db for layer in layers])
        iso = _capped([layer.isolated_sqnr_db for layer in layers])
        size = 4.0 if n <= MAX_NAMED_TICKS else 2.0 if n <= 200 else 0.0
        top.plot(x, _finite(acc), marker="o", ms=size, lw=1.6, color=ACCUMULATED,
                 label="accumulated: all quantization before it")
        top.plot(x, _finite(iso), marker="s", ms=size * 0.9, lw=1.1, ls="--", color=ISOLATED,
                 label="isolated: fed the float inputs")
        _mark_infinite(top, acc, ACCUMULATED)
        _mark_infinite(top, iso, ISOLATED)
        top.set_ylabel(f"layer output SQNR (dB, ▲ > {CAP_DB:.0f})")
        top.set_title("Per-layer SQNR against the float model (higher is better)", loc="left")
        top.legend(loc="best", frameon=True)
        if measured:
            _sensitivity_panel(axes[1], layers, measured)
        bottom = axes[-1]
        if names:
            bottom.set_xticks(x, names, rotation=90, fontsize=8 if n > 25 else 9)
        else:
            from matplotlib.ticker import MaxNLocator

            bottom.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
            bottom.set_xlabel("layer index (graph order, as in the full layer table)")
        bottom.set_xlim(-0.6, n - 0.4)
        return _data_uri(fig)


def _sensitivity_panel(ax: Axes, layers: Sequence[LayerLike], measured: list[int]) -> None:
    """Bars of the output SQNR gain when each measured layer alone stays float."""
    gains = np.array([layers[i].sensitivity_db or 0.0 for i in measured])
    colors = [GAIN if g > 0 else NO_GAIN for g in gains]
    ax.bar(measured, gains, color=colors, width=0.7)
    ax.axhline(0, color="#202124", lw=0.8)
    ax.set_ylabel("output SQNR gain\nif kept float (dB)")
    ax.set_title("Sensitivity of the measured layers", loc="left")
    if len(measured) <= 40:
        for i, g in zip(measured, gains, strict=True):
            ax.annotate(f"{g:+.1f}", (i, g), xytext=(0, 3 if g >= 0 else -3),
                        textcoords="offset points", ha="center", fontsize=7,
                        va="bottom" if g >= 0 else "top")
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.08 * (high - low), high + 0.12 * (high - low))


def _weight_key(item: tuple[str, float]) -> float:
    """Sort key: worst (lowest, −∞ first) first, NaN last."""
    value = item[1]
    return math.inf if value is None or math.isnan(value) else value


def _sqnr_color(value: float) -> str:
    return BAD if value < 10 else WARN if value < 20 else FINE


def weight_figure(weights: Mapping[str, float]) -> str | None:
    """Horizontal bars of the worst weights' SQNR (worst on top), with a histogram of all weight
    SQNRs beside them when there are more than :data:`WORST_WEIGHTS`; None without weights."""
    if not weights:
        return None
    worst = sorted(weights.items(), key=_weight_key)[:WORST_WEIGHTS]
    many = len(weights) > WORST_WEIGHTS
    with _figure(12, max(2.6, 0.25 * len(worst) + 1.3)) as fig:
        if many:
            grid = fig.add_gridspec(2, 2, width_ratios=[3, 2])
            ax = fig.add_subplot(grid[:, 0])
            _weight_histogram(fig.add_subplot(grid[0, 1]), list(weights.values()))
        else:
            ax = fig.subplots()
        values = [v if math.isfinite(v) else 0.0 for _, v in worst]
        y = np.arange(len(worst))
        ax.barh(y, values, color=[_sqnr_color(v) if math.isfinite(v) else BAD for _, v in worst],
                height=0.7)
        ax.set_yticks(y, [plain(name, 42) for name, _ in worst], fontsize=8)
        ax.set_ylim(len(worst) - 0.5, -0.5)
        ax.grid(axis="y", visible=False)
        for yi, (_, v) in zip(y, worst, strict=True):
            label = f"{v:.1f}" if math.isfinite(v) else ("\u2212\u221e" if v < 0 else "+\u221e")
            ax.annotate(label, (values[yi], yi), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set_xlim(min(0.0, *values), max(values) * 1.12 + 1)
        ax.set_xlabel("weight SQNR (dB)")
        ax.set_title(f"Worst {len(worst)} of {len(weights)} weights", loc="left")
        return _data_uri(fig)


def _weight_histogram(ax: Axes, values: list[float]) -> None:
    """Histogram of all finite weight SQNRs."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)])
    if finite.size:
        ax.hist(finite, bins=min(30, max(5, finite.size // 3)), color=FINE, edgecolor="white")
    ax.set_xlabel("weight SQNR (dB)")
    ax.set_ylabel("weights")
    skipped = len(values) - finite.size
    note = f" ({skipped} not finite, not shown)" if skipped else ""
    ax.set_title(f"All {len(values)} weights{note}", loc="left")


def _percent(fraction: float) -> str:
    """``2.41%``; a few values out of millions read ``<0.01%``, not ``0.00%``."""
    if 0 < fraction < 5e-5:
        return "<0.01%"
    return f"{100 * fraction:.2f}%"


def histogram_figure(hist: HistogramLike) -> str:
    """Counts of one activation's float values over its bins (log scale), bars outside the clip
    range in red, the clip range shaded; below/above counts and clipped fraction in the title."""
    edges = np.asarray(hist.edges, dtype=np.float64)
    counts = np.asarray(hist.counts, dtype=np.float64)
    with _figure(6, 3.3) as fig:
        ax = fig.subplots()
        centers = (edges[:-1] + edges[1:]) / 2
        outside = (centers < hist.clip_min) | (centers > hist.clip_max)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", linewidth=0,
               color=np.where(outside, BAD, FINE).tolist())
        if counts.sum() > 0:
            ax.set_yscale("log")
        lo, hi = float(edges[0]), float(edges[-1])
        if math.isfinite(hist.clip_min) and math.isfinite(hist.clip_max):
            ax.axvspan(hist.clip_min, hist.clip_max, color=CLIP, alpha=0.12, zorder=0,
                       label=f"clip [{hist.clip_min:.3g}, {hist.clip_max:.3g}]")
            for bound in (hist.clip_min, hist.clip_max):
                ax.axvline(bound, color=CLIP, lw=1.3)
            lo, hi = min(lo, hist.clip_min), max(hi, hist.clip_max)
            ax.legend(loc="upper right", fontsize=8)
        pad = 0.03 * (hi - lo or 1.0)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel("float value")
        ax.set_ylabel("count")
        ax.set_title(f"{plain(hist.tensor, TITLE_CHARS)}\nbelow {hist.below:,} \u00b7 above "
                     f"{hist.above:,} \u00b7 clipped {_percent(hist.clipped_fraction)}",
                     fontsize=10)
        return _data_uri(fig, dpi=110)
