"""What the ``onnxquant`` commands print: the accuracy block and its warning, the latency line
(which feed, "N× faster/slower"), "nothing was quantized", QOperator fallbacks counted as float,
float reasons with real names, data-folder errors naming the file, GPTQ progress, and
``weights --upgrade-opset``. The commands run in a subprocess, as in test_cli.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.core.plan import NodeDecision, QuantPlan
from onnxquant.core.speed import Latency
from onnxquant.static.result import QuantizationResult


def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "onnxquant", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def write_npz(folder: Path, data: list[dict[str, np.ndarray]], stem: str = "f") -> Path:
    folder.mkdir()
    for i, feed in enumerate(data):
        np.savez(folder / f"{stem}{i}.npz", **feed)
    return folder


def linear(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weight.shape[1]])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = zoo.IR_VERSION
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("summary")
    cnn = zoo.cnn()
    onnx.save(cnn, root / "cnn.onnx")
    write_npz(root / "calib", zoo.random_feeds(cnn, 12, seed=1))
    write_npz(root / "val", zoo.random_feeds(cnn, 3, seed=2), stem="v")
    onnx.save(zoo.matmul_chain(dim=32), root / "chain.onnx")
    write_npz(root / "chain_val", zoo.random_feeds(zoo.matmul_chain(dim=32), 2, seed=3))
    return root


# -- the accuracy block ---------------------------------------------------------------------------
def test_static_prints_accuracy_and_the_eval_feed_latency(folder):
    run = run_cli("static", "cnn.onnx", "-o", "q.onnx", "--calib", "calib", "--eval", "val",
                  "--check-speed", "3", cwd=folder)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "accuracy:     float vs quantized on 3 samples from 'val':" in lines
    logits = lines[lines.index("accuracy:     float vs quantized on 3 samples from 'val':") + 1]
    assert logits.startswith("  logits  SQNR ")
    assert ", cosine 0.9" in logits or ", cosine 1.0000" in logits
    assert "calibration:  12 samples" in lines  # --eval: nothing held back
    speed = next(line for line in lines if line.startswith("speed:"))
    assert speed.endswith(", on the first --eval feed)")
    assert ("× faster" in speed or "× slower" in speed or "as fast" in speed)


def test_static_holds_back_without_eval(folder):
    run = run_cli("static", "cnn.onnx", "-o", "q2.onnx", "--calib", "calib", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "calibration:  11 samples" in run.stdout
    assert ("accuracy:     float vs quantized on 1 calibration sample held back from "
            "calibration") in run.stdout
    off = run_cli("static", "cnn.onnx", "-o", "q3.onnx", "--calib", "calib", "--no-eval",
                  cwd=folder)
    assert "calibration:  12 samples" in off.stdout
    assert "accuracy:     not measured (pass --eval DIR)" in off.stdout


def test_low_accuracy_warning_names_output_report_and_options(tmp_path):
    rng = np.random.default_rng(0)
    onnx.save(linear(rng.standard_normal((16, 8)).astype(np.float32)), tmp_path / "m.onnx")
    calib = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)]
    calib[0]["x"][0, 0] = 1e4  # an outlier that flattens every other activation to 0
    write_npz(tmp_path / "calib", calib)
    write_npz(tmp_path / "val", [{"x": rng.standard_normal((4, 16)).astype(np.float32)}])
    run = run_cli("static", "m.onnx", "-o", "q.onnx", "--calib", "calib", "--eval", "val",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    warning = next(line for line in run.stdout.splitlines() if "accuracy dropped" in line)
    assert warning.startswith("warning:      accuracy dropped: output 'y' has cosine")
    assert "onnxquant report m.onnx" in warning and "--data val -o report.html" in warning
    assert "--op-types MatMul,Conv,Gemm, --per-channel or --activation-type uint16" in warning
    quiet = run_cli("static", "m.onnx", "-o", "q2.onnx", "--calib", "calib", "--eval", "val",
                    "-q", cwd=tmp_path)
    assert quiet.stdout == "" and "warning: accuracy dropped: output 'y'" in quiet.stderr


def test_dynamic_latency_says_which_feed(folder):
    random = run_cli("dynamic", "chain.onnx", "-o", "d1.onnx", "--check-speed", "3",
                     cwd=folder)
    assert random.returncode == 0, random.stderr
    assert "on a random feed with symbolic dims = 1)" in random.stdout
    assert "accuracy:     float vs quantized on 4 random feeds" in random.stdout
    real = run_cli("dynamic", "chain.onnx", "-o", "d2.onnx", "--check-speed", "3", "--eval",
                   "chain_val", cwd=folder)
    assert real.returncode == 0, real.stderr
    assert "on the first --eval feed)" in real.stdout
    assert "accuracy:     float vs quantized on 2 samples from 'chain_val':" in real.stdout


def test_latency_reads_as_a_speed_up():
    assert Latency(10.0, 6.7, 30).verdict() == "1.49× faster"
    assert Latency(10.0, 12.0, 30).verdict() == "1.20× slower"
    assert Latency(10.0, 10.1, 30).verdict() == "as fast"
    text = Latency(10.0, 5.0, 9, "on the first --calib feed").describe()
    assert text.endswith("(2.00× faster, on the first --calib feed)") and "0.50×" not in text


# -- weights --------------------------------------------------------------------------------------
def test_weights_upgrade_opset(tmp_path):
    onnx.save(zoo.old_opset_model(), tmp_path / "old.onnx")
    refused = run_cli("weights", "old.onnx", "-o", "q.onnx", cwd=tmp_path)
    assert refused.returncode == 2 and "--upgrade-opset" in refused.stderr
    upgraded = run_cli("weights", "old.onnx", "-o", "q.onnx", "--upgrade-opset", cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert onnx.load(tmp_path / "q.onnx").opset_import[0].version >= 10


def test_weights_nothing_to_quantize_warns(folder):
    run = run_cli("weights", "cnn.onnx", "-o", "w.onnx", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "warning:      nothing was quantized: no selected MatMul has a constant 2-D " \
           "weight" in run.stdout
    quiet = run_cli("weights", "cnn.onnx", "-o", "w2.onnx", "-q", cwd=folder)
    assert quiet.returncode == 0 and "warning: nothing was quantized" in quiet.stderr


def test_weights_gptq_progress_after_calibration(folder):
    chain = zoo.matmul_chain(dim=32)
    write_npz(folder / "chain_calib", zoo.random_feeds(chain, 4, seed=1))
    run = run_cli("weights", "chain.onnx", "-o", "g.onnx", "--algorithm", "gptq", "--calib",
                  "chain_calib", "--block-size", "16", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "GPTQ calibration" in run.stderr and "GPTQ: quantizing weights" in run.stderr
    assert "accuracy:     float vs quantized on 4 calibration samples (too few to hold " \
           "back)" in run.stdout


def test_gptq_segments_have_their_own_bar(capsys):
    import onnx_ir as ir

    from onnxquant.weight_only.calib import collect_hessians

    chain = zoo.matmul_chain(dim=32)
    model = ir.serde.deserialize_model(chain)
    wanted = {n.inputs[0].name: 32 for n in model.graph if n.op_type == "MatMul"}
    _, samples = collect_hessians(model, wanted, zoo.random_feeds(chain, 3), progress=True,
                                  segment_bytes=5000)
    assert samples == 3
    assert "segments)" in capsys.readouterr().err


# -- the summary's counting and reasons -----------------------------------------------------------
def test_qoperator_fallback_counts_as_float(tmp_path):
    """A Relu the plan folds into ConvTranspose's range stays (ConvTranspose writes float): the
    summary counts it float, with the emitter's reason."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="convt"),
             helper.make_node("Relu", ["t"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="conv")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32),
                                 "W"),
         numpy_helper.from_array((rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32),
                                 "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = zoo.IR_VERSION
    onnx.save(model, tmp_path / "m.onnx")
    write_npz(tmp_path / "calib", zoo.random_feeds(model, 4, seed=1))
    run = run_cli("static", "m.onnx", "-o", "q.onnx", "--calib", "calib", "--format",
                  "qoperator", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    relu = next(line.split() for line in run.stdout.splitlines()
                if line.startswith("  Relu "))
    assert relu == ["Relu", "0", "0", "1"]  # quantized, removed, float
    assert "kept float in QOperator format: its producer is not an integer node [relu]" \
        in run.stdout


def test_float_reasons_keep_real_names():
    nodes = [NodeDecision(f"add{i}", "Add", "float", f"input 'tensor_{i}' has no range")
             for i in range(4)]
    nodes.append(NodeDecision("mm", "MatMul", "float", "weight '" + "w" * 80 + "' is odd"))
    result = QuantizationResult(QuantPlan(nodes={n.name: n for n in nodes}), [Path("q.onnx")],
                                10, 10, 1, 0.1, [])
    text = result.summary()
    assert "'...'" not in text
    assert "  4  input 'tensor_0' has no range (and 3 similar) [add0, add1, add2, ...]" in text
    assert "weight 'wwwwwwwwwwwwwwwwwww…wwwwwwwwwwwwwwwwwwww' is odd [mm]" in text


def test_folder_feed_errors_name_the_file(tmp_path):
    onnx.save(zoo.cnn(), tmp_path / "cnn.onnx")
    feeds = zoo.random_feeds(zoo.cnn(), 2, seed=1)
    feeds[1] = {"imgae": feeds[1]["input"] if "input" in feeds[1] else next(iter(
        feeds[1].values()))}
    write_npz(tmp_path / "calib", feeds)
    run = run_cli("static", "cnn.onnx", "-o", "q.onnx", "--calib", "calib", cwd=tmp_path)
    assert run.returncode == 2
    assert "Feed 1 ('calib/f1.npz'): unknown input name 'imgae'" in run.stderr
