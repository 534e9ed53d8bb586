"""Calibration cache: the collected statistics as JSON, so calibration runs once.

The file records the calibration method and its parameters; loading it with different settings
is refused with an error that names the differing settings. Ranges are derived from the cached
statistics every time, so one cache serves several quantization settings (types, per-channel,
symmetric weights, ...). Non-finite floats (an unobserved tensor's ±inf) are stored as strings.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from onnxquant.calibration.histogram import HistogramObserver
from onnxquant.calibration.observers import MinMaxObserver
from onnxquant.calibration.settings import CalibrationSettings, Observer
from onnxquant.core.errors import CalibrationError

__all__ = ["save_cache", "load_cache"]

FORMAT = "onnxquant-calibration"
VERSION = 1
_KINDS: dict[str, type[MinMaxObserver] | type[HistogramObserver]] = {
    "minmax": MinMaxObserver, "histogram": HistogramObserver}
# Settings that only shape how ranges are read from the statistics, set by the quantization
# config rather than the calibration: they may differ between cache and use.
_DERIVED = {"levels"}


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'inf', '-inf', 'nan'
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _kind(observer: Observer) -> str:
    return "histogram" if isinstance(observer, HistogramObserver) else "minmax"


def save_cache(path: str | os.PathLike, statistics: dict[str, Observer], samples: int,
               settings: CalibrationSettings) -> None:
    """Write the statistics atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings.to_dict(),
        "samples": samples,
        "tensors": {name: {"kind": _kind(obs), "state": _encode(obs.to_dict())}
                    for name, obs in statistics.items()},
    }
    fd, tmp = tempfile.mkstemp(prefix=".onnxquant-cache-", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cache(path: str | os.PathLike, settings: CalibrationSettings,
               tensors: set[str]) -> tuple[dict[str, Observer], int]:
    """Read a cache written with the same calibration settings, covering ``tensors``.

    Raises:
        CalibrationError: The file is not a calibration cache, was made with other settings,
            or lacks some of the needed tensors (the message says what to do).
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if document.get("format") != FORMAT:
            raise ValueError(f"format is {document.get('format')!r}")
    except (OSError, ValueError) as err:
        raise CalibrationError(
            f"'{path}' is not an onnxquant calibration cache ({err}); delete it or choose "
            "another calibration_cache path") from err
    _check_settings(path, document.get("settings", {}), settings)
    missing = sorted(tensors - set(document["tensors"]))
    if missing:
        raise CalibrationError(
            f"calibration cache '{path}' has no statistics for {len(missing)} tensors needed now "
            f"(e.g. '{missing[0]}'); it was made for another model or node selection. Delete it "
            "or choose another calibration_cache path to recalibrate")
    statistics = {}
    for name, entry in document["tensors"].items():
        statistics[name] = _KINDS[entry["kind"]].from_dict(_decode(entry["state"]))
    return statistics, int(document["samples"])


def _check_settings(path, stored: dict[str, Any], settings: CalibrationSettings) -> None:
    current = settings.to_dict()
    differing = [
        f"{key}: cache {stored.get(key)!r}, now {value!r}"
        for key, value in current.items()
        if key not in _DERIVED and stored.get(key) != value
    ]
    if differing:
        raise CalibrationError(
            f"calibration cache '{path}' was made with different calibration settings "
            f"({'; '.join(differing)}); delete it, choose another calibration_cache path, or "
            "use the settings it was made with")
