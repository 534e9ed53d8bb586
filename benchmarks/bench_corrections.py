"""The three corrections as plain ``quantize_static`` options on the public corpus: the task
fidelity on the evaluation split (which calibration never sees) without corrections, and with
SmoothQuant, cross-layer equalization and bias correction (the default) one at a time, next to
the time each quantization took.

    python benchmarks/bench_corrections.py [MODEL ...] [--per-channel]

Needs ../shared/corpus (see its README.md) and its models in /tmp/qcorpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _corpus_eval as ce
from _bench_util import use_working_tree

NONE = {"bias_correction": False}  # bias correction is on by default: this is "none"
VARIANTS = {"no corrections": NONE, "smooth_quant": {**NONE, "smooth_quant": True},
            "equalize_layers": {**NONE, "equalize_layers": True},
            "bias_correction": {"bias_correction": True}}


def run_model(name: str, work: Path, per_channel: bool) -> dict:
    import onnxquant

    calib, evals = ce.samples(name, "calib"), ce.samples(name, "eval")
    reference = ce.float_outputs(name, evals)
    row: dict = {"model": name, "measure": ce.measure_name(name)}
    for variant, options in VARIANTS.items():
        out = work / f"{name}.{variant}.onnx"
        config = onnxquant.StaticQuantConfig(evaluate=False, per_channel=per_channel,
                                             **options)
        start = time.perf_counter()
        onnxquant.quantize_static(ce.model_path(name), out, calib, config)
        row[f"{variant}_seconds"] = time.perf_counter() - start
        row[variant] = ce.fidelity(name, reference, ce.run_model(str(out), evals))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--per-channel", action="store_true")
    args = parser.parse_args()
    use_working_tree()
    models = args.models or [m for m in ce.model_names() if Path(ce.model_path(m)).exists()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_corrections_") as tmp:
        for name in models:
            try:
                rows.append(run_model(name, Path(tmp), args.per_channel))
            except Exception as err:  # noqa: BLE001 - a failure is a result row
                rows.append({"model": name, "error": f"{type(err).__name__}: {err}"[:160]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| model | measure | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error']} |")
            continue
        cells = [f"{ce.format_fidelity(r['model'], r[v])} ({r[f'{v}_seconds']:.0f} s)"
                 for v in VARIANTS]
        print(f"| {r['model']} | {r['measure']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
