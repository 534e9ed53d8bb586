"""The self-contained HTML comparison report (onnxquant.debug.html)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxquant.core.errors import QuantizationError
from onnxquant.debug.html import ReportDependencyError, output_status, write_html
from onnxquant.debug.report import (
    ActivationStats,
    ComparisonReport,
    Histogram,
    LayerStats,
    OutputStats,
)

SENSITIVE = {7: 6.2, 21: 3.4, 33: 1.1, 3: 0.8, 28: -0.2}
SCRIPT_NODE = "<script>alert('x')</script>"


def _layers(rng: np.random.Generator, n: int) -> list[LayerStats]:
    layers = []
    acc = 45.0
    for i in range(n):
        op = ("Conv", "MatMul", "Add", "Gemm")[i % 4]
        name = f"stage{i // 8}/block{i % 8}/{op.lower()}_{i}"
        name = {3: SCRIPT_NODE, 5: "odd$name$_5"}.get(i, name)
        iso = float(rng.uniform(8, 14)) if i in (7, 21, 33) else float(rng.uniform(25, 45))
        acc = min(acc, iso + 3) - float(rng.uniform(0, 0.8))
        layers.append(LayerStats(name, op, acc, iso, SENSITIVE.get(i), f"{name}:0", f"{name}_q"))
    layers[-1].sqnr_db = -math.inf
    layers[6].isolated_sqnr_db = None
    return layers


def _histograms(rng: np.random.Generator, n: int) -> list[Histogram]:
    hists = []
    for i in range(n):
        values = rng.standard_normal(5000) * (1 + i)
        counts, edges = np.histogram(values, bins=64)
        hists.append(Histogram(f"act/{i}/out", edges, counts, i, 3 * i, float(values.min()),
                               float(values.max()), -1.5 * (1 + i), 1.5 * (1 + i)))
    return hists


def synthetic_report(n_layers: int = 40, n_weights: int = 60, n_hists: int = 10,
                     seed: int = 0) -> ComparisonReport:
    """A plausible report: degrading layers, a few sensitive ones, two outputs."""
    rng = np.random.default_rng(seed)
    weights = {f"stage{i // 8}.block{i % 8}.weight": float(rng.normal(36, 4))
               for i in range(n_weights)}
    weights["head.weight"] = 8.5
    activations = {f"act/{i}/out": ActivationStats(
        f"act/{i}/out", float(rng.uniform(12, 40)), None if i == 0 else 30.0,
        "uint8 per-tensor", -1.0, float(rng.uniform(2, 9))) for i in range(n_layers)}
    outputs = {"logits": OutputStats("logits", 12.4, 0.9861, 0.962),
               "boxes": OutputStats("boxes", 21.3, 0.9957, None)}
    return ComparisonReport(outputs, _layers(rng, n_layers), weights, activations,
                            _histograms(rng, n_hists), samples=32, sensitivity_samples=8,
                            float_model="/m/model.onnx", quantized_model="/m/model.int8.onnx",
                            unmatched={"weights": ["extra<w>"], "activations": []},
                            seconds=12.5)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("matplotlib")
    path = tmp_path_factory.mktemp("html") / "report.html"
    assert write_html(synthetic_report(), path) == path
    return path, path.read_text(encoding="utf-8")


def test_figures_are_embedded(report_html: tuple[Path, str]) -> None:
    _, text = report_html
    # layer plot + weight plot + the first 8 of 10 histograms
    assert text.count("data:image/png;base64,") == 10


def test_self_contained(report_html: tuple[Path, str]) -> None:
    _, text = report_html
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "<script" not in text
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", text)


def test_top_layers_and_advice(report_html: tuple[Path, str]) -> None:
    _, text = report_html
    section = text.split("Layers most worth keeping float", 1)[1].split("</table>", 1)[0]
    for name in ("stage0/<wbr>block7/<wbr>gemm_<wbr>7", "stage2/<wbr>block5/<wbr>matmul_<wbr>21",
                 "stage4/<wbr>block1/<wbr>matmul_<wbr>33"):
        assert name in section
    assert "Verdict: Doubtful" in text
    assert "raises the output SQNR by 6.2 dB" in text
    assert "--exclude-nodes</span> stage0/block7/gemm_7" in text
    assert "onnxquant static" in text


def test_names_are_escaped(report_html: tuple[Path, str]) -> None:
    _, text = report_html
    assert SCRIPT_NODE not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/<wbr>script&gt;" in text
    assert "extra&lt;w&gt;" in text


def test_special_values(report_html: tuple[Path, str]) -> None:
    _, text = report_html
    assert "\u2212\u221e" in text  # the -inf accumulated SQNR of the last layer
    assert ">n/a<" in text  # a None isolated SQNR and the missing argmax agreement
    assert "<details>" in text


def test_empty_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = ComparisonReport({}, [], {}, {}, [], samples=0, sensitivity_samples=0)
    text = write_html(report, tmp_path / "empty.html").read_text(encoding="utf-8")
    assert "data:image/png" not in text
    assert "Nothing was measured" in text


def test_many_layers_without_sensitivity(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = synthetic_report(n_layers=150, n_weights=10, n_hists=0)
    for layer in report.layers:
        layer.sensitivity_db = None
    text = write_html(report, tmp_path / "big.html").read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 2
    assert "Sensitivity was not measured" in text


@pytest.mark.parametrize(("sqnr", "cos", "argmax", "status"), [
    (30.0, 0.999, 0.99, "good"),
    (30.0, 0.999, None, "good"),
    (30.0, 0.985, 0.99, "doubtful"),
    (30.0, 0.995, 0.96, "doubtful"),
    (30.0, 0.97, 0.99, "bad"),
    (30.0, 0.999, 0.94, "bad"),
    (9.0, 0.999, 0.99, "bad"),
    (-math.inf, 0.999, 0.99, "bad"),
])
def test_output_status(sqnr: float, cos: float, argmax: float | None, status: str) -> None:
    assert output_status(OutputStats("y", sqnr, cos, argmax)) == status


def test_missing_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "report.html"
    with pytest.raises(ReportDependencyError, match=re.escape('pip install "onnxquant[report]"')) \
            as info:
        synthetic_report(n_hists=1).save_html(path)
    assert isinstance(info.value, QuantizationError) and isinstance(info.value, ImportError)
    assert not path.exists()


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_renders_in_headless_chromium(report_html: tuple[Path, str], tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium or chromium-browser on PATH (apt-get install chromium)")
    path, _ = report_html
    shot = tmp_path / "report.png"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
               "--window-size=1400,3000", path.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert shot.exists(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr}"
    assert shot.stat().st_size > 20_000
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(shot) as image:
        assert image.size == (1400, 3000)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert colors is not None and len(colors) > 50


def test_op_type_group_advice(tmp_path: Path) -> None:
    """When keeping a whole op type float helps far more than any one layer, the advice says
    --exclude-op-types first and the group table lists the gains."""
    pytest.importorskip("matplotlib")
    report = synthetic_report(n_layers=12, n_hists=0)
    for layer in report.layers:
        layer.sensitivity_db = 0.4 if layer.sensitivity_db is not None else None
    report.op_type_sensitivity = {"Mul": 14.2, "Conv": 1.1}
    text = write_html(report, tmp_path / "groups.html").read_text(encoding="utf-8")
    verdict = text[text.index("Verdict"):text.index("Layers most worth keeping float")]
    assert "--exclude-op-types</span> Mul" in verdict and "14.2 dB" in verdict
    groups = text[text.index("Op types kept float as a group"):]
    assert groups.index("Mul") < groups.index("Conv")
    assert "+14.2 dB" in groups and "+1.1 dB" in groups
