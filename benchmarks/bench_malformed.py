"""Malformed inputs × entry points, onnxquant next to onnxruntime.quantization.

Every class of ``tests/malformed_cases.py`` (broken graphs, bad external data, invalid versions,
repairable oddities) goes through every onnxquant entry point and through the baseline's
``quantize_static``, ``quantize_dynamic`` and ``MatMulNBitsQuantizer``. Each cell says what
happened: a typed onnxquant error (``Load``: ModelLoadError, ``Unsupported``:
UnsupportedModelError, ``Output``: OutputPathError), ``valid`` (an output onnxruntime loads), or
for the baseline the raw exception type, ``INVALID`` (an output onnxruntime refuses) or
``valid``. ``+debris`` marks files left in the model, output or temporary folder.

    .venv/bin/python benchmarks/bench_malformed.py [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from malformed_cases import CASES, feeds  # noqa: E402

import onnxquant  # noqa: E402
import onnxquant.ort  # noqa: E402
from onnxquant.cli import main as cli_main  # noqa: E402

SHORT = {"ModelLoadError": "Load", "UnsupportedModelError": "Unsupported",
         "OutputPathError": "Output", "CalibrationError": "Calibration",
         "NumericsError": "Numerics", "FeedError": "Feed"}


def _reader() -> onnxquant.ort.CalibrationDataReader:
    class Reader(onnxquant.ort.CalibrationDataReader):
        def __init__(self) -> None:
            self.data = iter(feeds())

        def get_next(self) -> dict | None:
            return next(self.data, None)
    return Reader()


class _CliExit(Exception):
    """The CLI returned a non-zero exit code."""


def _cli(sub: str) -> Callable[[Path, Path], None]:
    def run(model: Path, out: Path) -> None:
        args = [sub, str(model), "-o", str(out), "-q"]
        if sub == "static":
            args += ["--calib", str(out.parent.parent / "calib.npz")]
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = cli_main(args)
        if code:
            raise _CliExit(f"exit {code}: {err.getvalue().strip()}")
    return run


OURS: dict[str, Callable[[Path, Path], object]] = {
    "static QDQ": lambda m, o: onnxquant.quantize_static(m, o, feeds()),
    "static QOp": lambda m, o: onnxquant.quantize_static(
        m, o, feeds(), onnxquant.StaticQuantConfig(format=onnxquant.QuantFormat.QOPERATOR)),
    "dynamic": lambda m, o: onnxquant.quantize_dynamic(m, o),
    "weights": lambda m, o: onnxquant.quantize_weights(
        m, o, onnxquant.WeightOnlyConfig(block_size=32)),
    "calibrate": lambda m, o: onnxquant.calibrate(m, feeds()),
    "CLI static": _cli("static"),
    "onnxquant.ort static": lambda m, o: onnxquant.ort.quantize_static(m, o, _reader()),
    "onnxquant.ort dynamic": lambda m, o: onnxquant.ort.quantize_dynamic(m, o),
}


def _baseline() -> dict[str, Callable[[Path, Path], object]]:
    from onnxruntime import quantization as q
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.data = iter(feeds())

        def get_next(self) -> dict | None:
            return next(self.data, None)

    def weights(m: Path, o: Path) -> None:
        quantizer = MatMulNBitsQuantizer(str(m), block_size=32)
        quantizer.process()
        quantizer.model.save_model_to_file(str(o))

    return {"baseline static": lambda m, o: q.quantize_static(str(m), str(o), Reader()),
            "baseline dynamic": lambda m, o: q.quantize_dynamic(str(m), str(o)),
            "baseline weights": weights}


def _outcome(run: Callable[[Path, Path], object], case_build: Callable[[Path], Path],
             root: Path, writes: bool) -> str:
    folders = [root / n for n in ("in", "out", "tmp")]
    for f in folders:
        f.mkdir(parents=True)
    np.savez(root / "calib.npz", **feeds(1)[0])  # for the CLI
    model = case_build(folders[0])
    before = {p.name for p in folders[0].iterdir()}
    out = folders[1] / "q.onnx"
    old_cwd, old_tmp = os.getcwd(), tempfile.tempdir
    os.chdir(folders[1])
    tempfile.tempdir = str(folders[2])
    try:
        run(model, out)
        if not writes:
            result = "ok"
        elif not out.exists():
            result = "no output"
        else:
            try:
                ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                result = "valid"
            except Exception:  # noqa: BLE001 - any refusal means an invalid output
                result = "INVALID"
    except onnxquant.QuantizationError as err:
        result = SHORT.get(type(err).__name__, type(err).__name__)
    except _CliExit as err:  # exit code 2 means a typed error, printed as "error: ..."
        result = str(err).split(":", 1)[0]
    except BaseException as err:  # noqa: BLE001 - the baseline raises anything
        result = type(err).__name__
    finally:
        os.chdir(old_cwd)
        tempfile.tempdir = old_tmp
    leftover = ({p.name for p in folders[0].iterdir()} - before) | \
        ({p.name for p in folders[1].iterdir()} - {"q.onnx", "q.onnx.data"}) | \
        {p.name for p in folders[2].iterdir()}
    return result + (" +debris" if leftover else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    entries = dict(OURS)
    if not args.no_baseline:
        entries.update(_baseline())
    print("| case | " + " | ".join(entries) + " |")
    print("|---|" + "---|" * len(entries))
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            cells = []
            for j, (name, run) in enumerate(entries.items()):
                root = Path(tmp) / f"{i}_{j}"
                with contextlib.redirect_stdout(io.StringIO()):
                    cells.append(_outcome(run, case.build, root, name != "calibrate"))
            print(f"| {case.name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
