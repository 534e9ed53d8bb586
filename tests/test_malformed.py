"""Every malformed input × every entry point: a typed error whose message names the culprit,
nothing written, the input's bytes unchanged, no temporary file left; or, for inputs that are
repaired on purpose, a model onnxruntime runs with the float model's answers.

Entry points: static QDQ and QOperator, dynamic, weight-only, ``calibrate``, the CLI and the
ORT-compatible layer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from malformed_cases import CASES, DIM, Case, feeds

import onnxquant
import onnxquant.ort
from onnxquant import QuantFormat, StaticQuantConfig
from onnxquant.cli import main as cli_main
from onnxquant.ort.matmul_4bits_quantizer import MatMulNBitsQuantizer
from onnxquant.ort.quant_utils import load_model_with_shape_infer


class _Reader(onnxquant.ort.CalibrationDataReader):
    def __init__(self) -> None:
        self.data = iter(feeds())

    def get_next(self) -> dict | None:
        return next(self.data, None)


def _cli(subcommand: str) -> Callable[[Path, Path], object]:
    def run(model: Path, out: Path) -> object:
        args = [subcommand, str(model), "-o", str(out), "-q"]
        if subcommand == "static":
            args += ["--calib", str(out.parent.parent / "calib.npz")]
        code = cli_main(args)
        if code != 0:
            raise SystemExit(code)
        return code
    return run


ENTRY_POINTS: dict[str, Callable[[Path, Path], object]] = {
    "static_qdq": lambda m, o: onnxquant.quantize_static(m, o, feeds()),
    "static_qoperator": lambda m, o: onnxquant.quantize_static(
        m, o, feeds(), StaticQuantConfig(format=QuantFormat.QOPERATOR)),
    "dynamic": lambda m, o: onnxquant.quantize_dynamic(m, o),
    "weights": lambda m, o: onnxquant.quantize_weights(
        m, o, onnxquant.WeightOnlyConfig(block_size=32)),
    "calibrate": lambda m, o: onnxquant.calibrate(m, feeds()),
    "cli_static": _cli("static"),
    "cli_dynamic": _cli("dynamic"),
    "cli_weights": _cli("weights"),
    "ort_static": lambda m, o: onnxquant.ort.quantize_static(m, o, _Reader()),
    "ort_dynamic": lambda m, o: onnxquant.ort.quantize_dynamic(m, o),
    "ort_weights": lambda m, o: _ort_weights(m, o),
    "ort_shape_infer": lambda m, o: load_model_with_shape_infer(m),
}
WRITES = {name for name in ENTRY_POINTS if name not in ("calibrate", "ort_shape_infer")}


def _ort_weights(model: Path, out: Path) -> None:
    quantizer = MatMulNBitsQuantizer(str(model), block_size=32)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """(model folder, output folder, system temp folder), with the cwd set to the outputs."""
    folders = tuple(tmp_path / n for n in ("in", "out", "systmp"))
    for folder in folders:
        folder.mkdir()
    np.savez(tmp_path / "calib.npz", **feeds(1)[0])
    monkeypatch.setattr(tempfile, "tempdir", str(folders[2]))
    monkeypatch.chdir(folders[1])
    return folders  # type: ignore[return-value]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input(case: Case, entry: str, layout: tuple[Path, Path, Path],
                         capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, out_dir, systmp = layout
    model = case.build(model_dir)
    before = _snapshot(model_dir.parent)
    out = out_dir / "q.onnx"
    run = ENTRY_POINTS[entry]
    if case.error is None:
        run(model, out)
        if entry in WRITES:
            _assert_runs_like_float(model, out, 0.25 if "weights" in entry else 0.1)
        assert list(systmp.iterdir()) == []
        return
    if entry.startswith("cli"):
        with pytest.raises(SystemExit) as exit_info:
            run(model, out)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert message.startswith("error: ") and "Traceback" not in message
    else:
        with pytest.raises(case.error) as info:
            run(model, out)
        message = str(info.value)
    assert case.culprit in message, message
    assert len(message) < 1500, "a message names the culprit; it does not dump the graph"
    assert _snapshot(model_dir.parent) == before  # nothing written, nothing changed
    assert list(out_dir.iterdir()) == [] and list(systmp.iterdir()) == []


def _assert_runs_like_float(model: Path, out: Path, tolerance: float) -> None:
    x = feeds(1)[0]
    repaired = onnxquant.core.front_door.open_model(model)[0]  # the densified float model
    import onnx_ir as ir

    float_bytes = ir.serde.serialize_model(repaired).SerializeToString()
    expected = ort.InferenceSession(float_bytes, providers=["CPUExecutionProvider"]).run(None, x)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)
    error = np.linalg.norm(got[0] - expected[0]) / np.linalg.norm(expected[0])
    assert got[0].shape == (2, DIM) and error < tolerance, error  # 4-bit weights: ~0.12
