"""onnxruntime's ``qdq_loss_debug`` and ``onnxquant.ort.qdq_loss_debug`` side by side on the
public corpus: how many quantized weights and Q→DQ activation pairs each one matches to the
float model, and whether their weight SQNRs agree.

For each corpus model, quantized by onnxquant (QDQ, defaults) and, where it succeeds, by
onnxruntime (QDQ, defaults): the quantized weights and activation pairs in the model, then
``create_weight_matching`` and ``create_activation_matching`` (activations collected on 2
evaluation feeds) of both modules, and the largest weight-SQNR difference between them on the
weights both matched.

    python benchmarks/bench_debug_matching.py [MODEL ...]

Needs ../shared/corpus (see its README.md) and its models in /tmp/qcorpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _corpus_eval as ce
from _bench_util import ort_reader, use_working_tree

SAMPLES = 2


def _structure(path: Path) -> tuple[int, int]:
    """(quantized weights, Q→DQ activation pairs) of a quantized model, from its graph."""
    import onnx_ir as ir

    from onnxquant.debug.quantized_graph import QuantizedGraph

    graph = QuantizedGraph(ir.load(path))
    pairs = sum(1 for t in graph.tensors.values() if t.pre is not None and t.posts)
    return len(graph.weights), pairs


def _run_module(module, float_path: str, quant_path: Path, feeds, work: Path) -> dict:
    row: dict = {}
    try:
        weights = module.create_weight_matching(float_path, str(quant_path))
        errors = module.compute_weight_error(weights)
        row["weights"] = len(weights)
        row["weight_sqnr"] = errors
    except Exception as err:  # noqa: BLE001 - a failure is a result
        row["weights_error"] = f"{type(err).__name__}: {err}"[:120]
    try:
        module.modify_model_output_intermediate_tensors(str(quant_path), str(work / "aq.onnx"))
        module.modify_model_output_intermediate_tensors(float_path, str(work / "af.onnx"))
        qa = module.collect_activations(str(work / "aq.onnx"), ort_reader(feeds))
        fa = module.collect_activations(str(work / "af.onnx"), ort_reader(feeds))
        matched = module.create_activation_matching(qa, fa)
        row["pairs"] = len(matched)
        row["with_float"] = sum("float" in m for m in matched.values())
    except Exception as err:  # noqa: BLE001
        row["activations_error"] = f"{type(err).__name__}: {err}"[:120]
    return row


def _quantize(name: str, tool: str, out: Path, calib) -> str | None:
    try:
        if tool == "onnxquant":
            import onnxquant

            onnxquant.quantize_static(ce.model_path(name), out, calib)
        else:
            from onnxruntime.quantization import QuantFormat, quantize_static

            quantize_static(ce.model_path(name), str(out), ort_reader(calib),
                            quant_format=QuantFormat.QDQ)
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err)[:100]}"
    return None


def run_model(name: str, work: Path) -> list[dict]:
    import onnxruntime.quantization.qdq_loss_debug as ort_debug

    from onnxquant.ort import qdq_loss_debug as our_debug

    calib = ce.samples(name, "calib")[:8]
    feeds = ce.samples(name, "eval")[:SAMPLES]
    rows = []
    for tool in ("onnxquant", "onnxruntime"):
        out = work / f"{name}.{tool}.onnx"
        error = _quantize(name, tool, out, calib)
        row: dict = {"model": name, "made_by": tool}
        if error:
            rows.append({**row, "error": error})
            continue
        row["quantized_weights"], row["qdq_pairs"] = _structure(out)
        for label, module in (("ort", ort_debug), ("ours", our_debug)):
            row[label] = _run_module(module, ce.model_path(name), out, feeds, work)
        ours, theirs = row["ours"].get("weight_sqnr", {}), row["ort"].get("weight_sqnr", {})
        shared = set(ours) & set(theirs)
        row["max_sqnr_diff_db"] = max((abs(ours[k] - theirs[k]) for k in shared), default=None)
        row["ort_wrapped"] = sum(1 for k in shared if ours[k] - theirs[k] > 1.0)
        for side in ("ort", "ours"):
            row[side].pop("weight_sqnr", None)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _cell(row: dict, side: str, key: str) -> str:
    part = row.get(side, {})
    if f"{key}_error" in part:
        return "fails"
    return str(part.get(key, "–"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    args = parser.parse_args()
    use_working_tree()
    models = args.models or [m for m in ce.model_names() if Path(ce.model_path(m)).exists()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_debug_") as tmp:
        for name in models:
            rows += run_model(name, Path(tmp))
    print("| model | made by | quantized weights | weights matched: onnxruntime / ours |"
          " Q→DQ pairs | pairs matched: onnxruntime / ours | with float values: onnxruntime /"
          " ours | weight SQNR differences |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['made_by']} | quantization fails: {row['error']} |")
            continue
        diff = row["max_sqnr_diff_db"]
        wrapped = f"{row['ort_wrapped']} wrap around in onnxruntime" if row["ort_wrapped"] \
            else "none"
        print(f"| {row['model']} | {row['made_by']} | {row['quantized_weights']} | "
              f"{_cell(row, 'ort', 'weights')} / {_cell(row, 'ours', 'weights')} | "
              f"{row['qdq_pairs']} | {_cell(row, 'ort', 'pairs')} / "
              f"{_cell(row, 'ours', 'pairs')} | {_cell(row, 'ort', 'with_float')} / "
              f"{_cell(row, 'ours', 'with_float')} | "
              f"{wrapped}{'' if diff is None else f', max {diff:.3f} dB'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
