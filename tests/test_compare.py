"""``onnxquant.compare`` and ``onnxquant report``: output fidelity against an independent numpy
computation, per-layer accumulated/isolated SQNR, the sensitivity ranking (a deliberately broken
layer must top it), the JSON contract, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxquant
from onnxquant.core.metrics import ErrorAccumulator, sqnr_db

SAMPLES = 12


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compare")
    model = zoo.cnn()
    float_path = folder / "cnn.onnx"
    onnx.save(model, float_path)
    feeds = zoo.random_feeds(model, 16, seed=1)
    files = {"float": float_path}
    for name, config in {
        "qdq": onnxquant.StaticQuantConfig(bias_correction=False),
        "qop": onnxquant.StaticQuantConfig(format=onnxquant.QuantFormat.QOPERATOR,
                                           bias_correction=False),
    }.items():
        files[name] = folder / f"cnn_{name}.onnx"
        onnxquant.quantize_static(float_path, files[name], feeds, config)
    files["broken"] = folder / "cnn_broken.onnx"
    _break_weight(files["qdq"], files["broken"], "conv3_W_quantized")
    np.savez(folder / "eval.npz", **zoo.random_feeds(model, 1, seed=7)[0])
    return files


def _break_weight(source: Path, target: Path, stored: str) -> None:
    """Requantize one weight with a scale 100x too large (most values round to zero)."""
    model = onnx.load(source)
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] == stored)
    q = numpy_helper.to_array(inits[stored]).astype(np.int64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64)
    real = (q - zp) * scale
    new_scale = scale * 100
    new_q = np.clip(np.rint(real / new_scale) + zp, -128, 127).astype(np.int8)
    inits[stored].CopyFrom(numpy_helper.from_array(new_q, stored))
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(new_scale.astype(np.float32),
                                                        dq.input[1]))
    onnx.save(model, target)


def _outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def test_output_fidelity_matches_numpy(cnn_files: dict[str, Path]) -> None:
    feeds = zoo.random_feeds(onnx.load(cnn_files["float"]), SAMPLES, seed=3)
    report = onnxquant.compare(cnn_files["float"], cnn_files["qdq"], feeds,
                               sensitivity_layers=0)
    reference = _outputs(cnn_files["float"], feeds)
    quantized = _outputs(cnn_files["qdq"], feeds)
    x = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    y = np.concatenate([q.ravel() for q in quantized]).astype(np.float64)
    expected_db = 20 * math.log10(np.linalg.norm(x) / np.linalg.norm(x - y))
    cosines = [float(np.dot(r.ravel(), q.ravel()) / np.linalg.norm(r) / np.linalg.norm(q))
               for r, q in zip(reference, quantized, strict=True)]
    agree = np.mean([np.argmax(r, -1) == np.argmax(q, -1)
                     for r, q in zip(reference, quantized, strict=True)])
    out = report.outputs["logits"]
    assert report.samples == SAMPLES
    assert out.sqnr_db == pytest.approx(expected_db, abs=1e-4)
    assert out.cosine == pytest.approx(np.mean(cosines), abs=1e-5)
    assert out.argmax_agreement == pytest.approx(agree)
    assert out.sqnr_db > 25


def test_layers_cover_the_quantized_nodes(cnn_files: dict[str, Path]) -> None:
    feeds = zoo.random_feeds(onnx.load(cnn_files["float"]), 6, seed=3)
    report = onnxquant.compare(cnn_files["float"], cnn_files["qdq"], feeds,
                               sensitivity_layers=0)
    by_node = {layer.node: layer for layer in report.layers}
    assert {"conv1", "conv2", "conv3", "gemm", "add_residual"} <= set(by_node)
    # Fused Relu/Clip: the Conv outputs are compared with the tensors they replace.
    assert by_node["conv1"].output == "relu1_out"
    assert by_node["conv2"].output == "clip1_out"
    for layer in report.layers:
        assert layer.sqnr_db is not None and layer.sqnr_db > 20, layer
        assert layer.isolated_sqnr_db is not None and layer.isolated_sqnr_db > 20, layer
    # The first layer sees only the quantized model input: accumulated == isolated.
    assert by_node["conv1"].sqnr_db == pytest.approx(by_node["conv1"].isolated_sqnr_db,
                                                     abs=1e-6)
    assert set(report.weights) >= {"conv1_bn_weight", "conv2_W", "conv3_W", "fc_W"}
    assert all(db > 35 for db in report.weights.values())


def test_isolated_sqnr_is_the_layer_alone(cnn_files: dict[str, Path]) -> None:
    """conv3 in isolation: float input quantized with its grid, dequantized weights, output
    quantized — computed here with numpy/onnxruntime from the stored parameters."""
    feeds = zoo.random_feeds(onnx.load(cnn_files["float"]), 4, seed=5)
    report = onnxquant.compare(cnn_files["float"], cnn_files["qdq"], feeds,
                               sensitivity_layers=0)
    layer = next(x for x in report.layers if x.node == "conv3")
    q = onnx.load(cnn_files["qdq"])
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    conv = next(n for n in q.graph.node if n.name == "conv3")
    producers = {o: n for n in q.graph.node for o in n.output}

    def dequantized(name: str) -> np.ndarray:
        dq = producers[name]
        return (inits[dq.input[0]].astype(np.int64) - inits[dq.input[2]].astype(np.int64)
                if len(dq.input) > 2 else inits[dq.input[0]].astype(np.int64)) * \
            inits[dq.input[1]].astype(np.float64)

    def fake(x: np.ndarray, dq_output: str) -> np.ndarray:
        dq = producers[dq_output]
        s, z = inits[dq.input[1]].astype(np.float64), inits[dq.input[2]].astype(np.int64)
        info = np.iinfo(inits[dq.input[2]].dtype)
        return (np.clip(np.rint(x / s) + z, info.min, info.max) - z) * s

    w, b = dequantized(conv.input[1]), dequantized(conv.input[2])
    float_model = onnx.load(cnn_files["float"])
    float_model.graph.output.extend([onnx.helper.make_tensor_value_info(n, 1, None)
                                     for n in ("avgpool1_out", "conv3_out")])
    session = ort.InferenceSession(float_model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    out_q = next(n for n in q.graph.node if n.op_type == "QuantizeLinear"
                 and n.input[0] == conv.output[0])
    out_dq = next(n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] == out_q.output[0])
    acc = ErrorAccumulator()
    for feed in feeds:
        _, x, y = session.run(["logits", "avgpool1_out", "conv3_out"], feed)
        xq = fake(x, conv.input[0])
        ours = _conv1x1(xq, w) + b.reshape(1, -1, 1, 1)
        acc.update(y, fake(ours, out_dq))
    assert layer.isolated_sqnr_db == pytest.approx(acc.sqnr_db, abs=0.05)


def _conv1x1(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])


def test_broken_layer_tops_the_sensitivity_ranking(cnn_files: dict[str, Path]) -> None:
    feeds = zoo.random_feeds(onnx.load(cnn_files["float"]), SAMPLES, seed=3)
    report = onnxquant.compare(cnn_files["float"], cnn_files["broken"], feeds,
                               sensitivity_layers=4, sensitivity_samples=8)
    ranked = report.ranked_layers()
    assert ranked[0].node == "conv3"
    assert ranked[0].sensitivity_db is not None and ranked[0].sensitivity_db > 10
    others = [x.sensitivity_db for x in ranked[1:] if x.sensitivity_db is not None]
    assert others and max(others) < ranked[0].sensitivity_db / 3
    assert min(report.weights, key=report.weights.get) == "conv3_W"  # type: ignore[arg-type]
    worst = min(report.layers, key=lambda x: x.isolated_sqnr_db)  # type: ignore[arg-type,return-value]
    assert worst.node == "conv3"
    assert report.outputs["logits"].sqnr_db < 20
    lines = report.summary().splitlines()
    assert "conv3" in lines[lines.index("layers most worth keeping float:") + 1]
    # Every Conv float repairs the broken one too; every Add float does not.
    groups = report.op_type_sensitivity
    assert groups["Conv"] > 10 and groups["Conv"] > groups.get("Add", 0.0) + 5


def test_qoperator_model_is_compared(cnn_files: dict[str, Path]) -> None:
    feeds = zoo.random_feeds(onnx.load(cnn_files["float"]), 6, seed=3)
    report = onnxquant.compare(cnn_files["float"], cnn_files["qop"], feeds,
                               sensitivity_layers=3, sensitivity_samples=4)
    by_node = {layer.node: layer for layer in report.layers}
    assert {"conv2", "conv3", "gemm"} <= set(by_node)
    assert by_node["conv2"].output == "clip1_out"  # the Clip the integer grid applies
    assert all(x.isolated_sqnr_db is not None and x.isolated_sqnr_db > 20
               for x in report.layers)
    assert sum(x.sensitivity_db is not None for x in report.layers) == 3
    assert report.outputs["logits"].sqnr_db > 25


def test_json_contract(cnn_files: dict[str, Path], tmp_path: Path) -> None:
    feeds = zoo.random_feeds(onnx.load(cnn_files["float"]), 4, seed=3)
    report = onnxquant.compare(cnn_files["float"], cnn_files["qdq"], feeds,
                               sensitivity_layers=2, sensitivity_samples=2, histograms=3)
    data = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert set(data["outputs"]["logits"]) == {"sqnr_db", "cosine", "argmax_agreement"}
    for layer in data["layers"]:
        assert {"node", "op_type", "sqnr_db", "isolated_sqnr_db", "sensitivity_db"} <= \
            set(layer)
    assert sum(layer["sensitivity_db"] is not None for layer in data["layers"]) == 2
    assert all(isinstance(v, float) for v in data["weights"].values())
    assert len(data["histograms"]) == 3
    hist = data["histograms"][0]
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    assert sum(hist["counts"]) + hist["below"] + hist["above"] == \
        _values_seen(cnn_files["float"], hist["tensor"], feeds)
    low, high = hist["clip"]
    assert low <= hist["edges"][len(hist["edges"]) // 2] <= high


def _values_seen(float_path: Path, name: str, feeds: list[dict]) -> int:
    model = onnx.load(float_path)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return sum(int(np.isfinite(session.run([name], f)[0]).sum()) for f in feeds)


def test_identical_models_are_exact(cnn_files: dict[str, Path]) -> None:
    feeds = zoo.random_feeds(onnx.load(cnn_files["float"]), 2, seed=3)
    report = onnxquant.compare(cnn_files["float"], cnn_files["float"], feeds)
    assert report.layers == [] and report.weights == {}
    assert report.outputs["logits"].sqnr_db > 100  # float rounding of fused kernels only
    assert report.outputs["logits"].cosine == pytest.approx(1.0)


def test_memory_does_not_keep_samples(cnn_files: dict[str, Path]) -> None:
    """Only the sensitivity samples are kept, whatever the number of samples."""
    import importlib

    compare_module = importlib.import_module("onnxquant.debug.compare")

    kept: list[int] = []
    original = compare_module._State.report

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kept.append(len(self.kept))
        return original(self, *args, **kwargs)

    compare_module._State.report = spy  # type: ignore[method-assign]
    try:
        feeds = (f for f in zoo.random_feeds(onnx.load(cnn_files["float"]), 20, seed=3))
        report = onnxquant.compare(cnn_files["float"], cnn_files["qdq"], feeds,
                                   sensitivity_layers=1, sensitivity_samples=3)
    finally:
        compare_module._State.report = original  # type: ignore[method-assign]
    assert report.samples == 20 and kept == [3] and report.sensitivity_samples == 3


def test_sqnr_helper_matches_formula() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000)
    y = x + rng.standard_normal(1000) * 0.01
    assert sqnr_db(x, y) == pytest.approx(20 * math.log10(np.linalg.norm(x) /
                                                          np.linalg.norm(x - y)))
    assert sqnr_db(x, np.where(np.arange(1000) == 3, np.nan, y)) == -math.inf


def test_report_cli(cnn_files: dict[str, Path], tmp_path: Path) -> None:
    data = cnn_files["float"].parent / "eval.npz"
    out = tmp_path / "report.html"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "onnxquant", "report", str(cnn_files["float"]),
         str(cnn_files["broken"]), "--data", str(data), "-o", str(out),
         "--sensitivity-layers", "3"],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["samples"] == 1
    assert min(report["weights"], key=report["weights"].get) == "conv3_W"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert proc.returncode == 2 and "onnxquant[report]" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert "conv3" in proc.stdout and "report:" in proc.stdout
    assert out.read_text().count("data:image/png;base64,") >= 2


def test_report_cli_refuses_to_overwrite_an_input(cnn_files: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "onnxquant", "report", str(cnn_files["float"]),
         str(cnn_files["qdq"]), "--data", str(cnn_files["float"].parent / "eval.npz"),
         "-o", str(cnn_files["qdq"].with_suffix(".json"))],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "REPORT.html" in proc.stderr
    assert ir.load(cnn_files["qdq"]).graph is not None
