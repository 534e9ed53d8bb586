"""Tests of the ``onnxquant`` command line: the real command in a subprocess, then what it wrote.

Also the argument -> config translation and :func:`format_summary`, in process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant import INT16, UINT8, QuantizationResult, StaticQuantConfig, cli
from onnxquant.cli import summary
from onnxquant.core.plan import NodeDecision, QuantPlan

CALIB_SAMPLES = 4
_ROW = re.compile(r"^  (\S+)((?:\s+\d+)+)$")


# -- helpers ---------------------------------------------------------------------------------
def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m onnxquant ARGS`` and capture its output."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "onnxquant", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def summary_table(stdout: str) -> dict[str, tuple[int, ...]]:
    """``{op_type: counts}`` from the summary table (without 'total'), in column order:
    (quantized, removed, float), or (quantized, weight-only, removed, float) when shown."""
    rows = {}
    for line in stdout.splitlines():
        match = _ROW.match(line)
        if match and match.group(1) != "total":
            rows[match.group(1)] = tuple(int(v) for v in match.group(2).split())
    return rows


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def reads_dequantized(model: onnx.ModelProto, node: onnx.NodeProto, index: int = 0) -> bool:
    producer = producers(model).get(node.input[index])
    return producer is not None and producer.op_type == "DequantizeLinear"


def write_npz_folder(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(folder / f"feed_{i}.npz", **feed)
    return folder


def write_test_data_sets(folder: Path, feeds: list[dict[str, np.ndarray]], *,
                         named: bool = True) -> Path:
    for i, feed in enumerate(feeds):
        data_set = folder / f"test_data_set_{i}"
        data_set.mkdir(parents=True)
        for position, (name, array) in enumerate(feed.items()):
            tensor = numpy_helper.from_array(array, name if named else None)
            onnx.save_tensor(tensor, str(data_set / f"input_{position}.pb"))
    return folder


def check_model(path: Path) -> onnx.ModelProto:
    """Load a written model, run the full checker, and return it."""
    assert path.is_file()
    onnx.checker.check_model(str(path), full_check=True)
    return onnx.load(str(path))


# -- a CNN quantized with default settings from a folder of .npz files ---------------------------
@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cnn")
    model = zoo.cnn()
    onnx.save(model, str(folder / "cnn.onnx"))
    feeds = zoo.random_feeds(model, CALIB_SAMPLES, seed=1)
    write_npz_folder(folder / "calib_npz", feeds)
    write_test_data_sets(folder / "calib_pb", feeds)
    return folder


@pytest.fixture(scope="module")
def default_run(cnn_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("static", "cnn.onnx", "-o", "cnn_q.onnx", "--calib", "calib_npz",
                   "--plan-json", "plan.json", cwd=cnn_dir)


def test_static_writes_a_valid_qdq_model_that_runs(cnn_dir, default_run):
    assert default_run.returncode == 0, default_run.stderr
    model = check_model(cnn_dir / "cnn_q.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    feeds = zoo.random_feeds(zoo.cnn(), 3, seed=7)
    expected = zoo.run(zoo.cnn(), feeds)
    actual = zoo.run(str(cnn_dir / "cnn_q.onnx"), feeds)
    for ref, got in zip(expected, actual, strict=True):
        assert got[0].shape == ref[0].shape
        assert zoo.sqnr_db(ref[0], got[0]) > 15
    assert not list(cnn_dir.glob(".onnxquant-*")), "temporary folder left behind"


def test_summary_counts_match_the_output_model(cnn_dir, default_run):
    table = summary_table(default_run.stdout)
    model = onnx.load(str(cnn_dir / "cnn_q.onnx"))
    assert table["Conv"] == (3, 0, 0)
    assert table["Relu"] == (0, 2, 0)
    assert table["Clip"] == (0, 1, 0)
    for op_type, (quantized, _removed, floating) in table.items():
        nodes = [n for n in model.graph.node if n.op_type == op_type]
        assert len(nodes) == quantized + floating, op_type  # removed nodes are gone
        assert sum(reads_dequantized(model, n) for n in nodes) == quantized, op_type
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(reads_dequantized(model, n, 1) for n in convs)  # weights stored quantized
    total = re.search(r"^  total\s+(\d+)\s+(\d+)\s+(\d+)$", default_run.stdout, re.M)
    assert total is not None
    columns = zip(*table.values(), strict=True)
    assert [int(g) for g in total.groups()] == [sum(column) for column in columns]
    assert f"calibration:  {CALIB_SAMPLES} samples" in default_run.stdout
    assert re.search(r"^size: .* -> .* \(\d+\.\d\dx (smaller|larger)\)$", default_run.stdout,
                     re.M)
    assert "cnn_q.onnx" in default_run.stdout


def test_plan_json_lists_every_node_decision(cnn_dir, default_run):
    plan = json.loads((cnn_dir / "plan.json").read_text(encoding="utf-8"))
    actions = {name: node["action"] for name, node in plan["nodes"].items()}
    assert actions["conv1"] == actions["conv2"] == actions["conv3"] == "quantize"
    assert actions["relu1"] == actions["relu2"] == actions["clip1"] == "remove"
    assert plan["tensors"]["conv2_W"]["role"] == "weight"
    assert plan["tensors"]["conv2_W"]["axis"] is None  # per tensor by default
    assert len(plan["tensors"]["conv2_W"]["scale"]) == 1
    assert QuantPlan.from_json(cnn_dir / "plan.json").nodes["gemm"].action == "quantize"


def test_per_channel_from_test_data_sets_with_excluded_op_type(cnn_dir):
    result = run_cli("static", "cnn.onnx", "-o", "cnn_pc.onnx", "--calib", "calib_pb",
                     "--per-channel", "--exclude-op-types", "Gemm", cwd=cnn_dir)
    assert result.returncode == 0, result.stderr
    model = check_model(cnn_dir / "cnn_pc.onnx")
    by_output = producers(model)
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        dq = by_output[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        axis = {a.name: a.i for a in dq.attribute}.get("axis")
        assert axis == 0
        out_channels = inits[dq.input[0]].dims[0]
        assert list(inits[dq.input[1]].dims) == [out_channels]  # one scale per channel
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] in inits and inits[gemm.input[1]].data_type == onnx.TensorProto.FLOAT
    assert "Gemm" not in summary_table(result.stdout)
    assert f"calibration:  {CALIB_SAMPLES} samples" in result.stdout


def test_unnamed_test_data_tensors_map_by_position(tmp_path):
    model = zoo.cnn()
    onnx.save(model, str(tmp_path / "cnn.onnx"))
    write_test_data_sets(tmp_path / "calib", zoo.random_feeds(model, 2), named=False)
    result = run_cli("static", "cnn.onnx", "-o", "q.onnx", "--calib", "calib", "-q",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    check_model(tmp_path / "q.onnx")


def test_quiet_single_npz_external_data_model_is_smaller(tmp_path):
    model = zoo.matmul_chain(dim=256)
    onnx.save(model, str(tmp_path / "mlp.onnx"))
    feeds = zoo.random_feeds(model, 1)
    np.savez(tmp_path / "one.npz", **feeds[0])
    result = run_cli("static", "mlp.onnx", "-o", "mlp_q.onnx", "--calib", "one.npz",
                     "--external-data", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "calibrating" not in result.stderr  # no progress bar
    data = tmp_path / "mlp_q.onnx.data"
    assert data.is_file()
    check_model(tmp_path / "mlp_q.onnx")
    written = (tmp_path / "mlp_q.onnx").stat().st_size + data.stat().st_size
    assert written < 0.35 * (tmp_path / "mlp.onnx").stat().st_size
    ref, got = zoo.run(model, feeds)[0][0], zoo.run(str(tmp_path / "mlp_q.onnx"), feeds)[0][0]
    assert zoo.sqnr_db(ref, got) > 20


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("verbose", [False, True])
def test_missing_model_file(cnn_dir, verbose):
    args = ["static", "nope.onnx", "-o", "out.onnx", "--calib", "calib_npz"]
    result = run_cli(*args, *(["-v"] if verbose else []), cwd=cnn_dir)
    assert result.returncode == 2
    assert result.stdout == ""
    assert re.search(r"^error: .*nope\.onnx", result.stderr, re.M)
    assert ("Traceback" in result.stderr) == verbose
    assert not (cnn_dir / "out.onnx").exists()


@pytest.mark.parametrize("spelling", ["cnn.onnx", "sub/../cnn.onnx"])
def test_output_equal_to_input_is_refused(cnn_dir, spelling):
    (cnn_dir / "sub").mkdir(exist_ok=True)
    before = (cnn_dir / "cnn.onnx").read_bytes()
    result = run_cli("static", "cnn.onnx", "-o", spelling, "--calib", "calib_npz", cwd=cnn_dir)
    assert result.returncode == 2
    assert re.search(r"^error: .*cnn\.onnx", result.stderr, re.M)
    assert "Traceback" not in result.stderr
    assert (cnn_dir / "cnn.onnx").read_bytes() == before


def test_wrong_input_name_in_calibration_data(tmp_path):
    model = zoo.cnn()
    onnx.save(model, str(tmp_path / "cnn.onnx"))
    feed = zoo.random_feeds(model, 1)[0]
    write_npz_folder(tmp_path / "calib", [{"pixels": feed["image"]}])
    result = run_cli("static", "cnn.onnx", "-o", "q.onnx", "--calib", "calib", cwd=tmp_path)
    assert result.returncode == 2
    assert "'pixels'" in result.stderr and "'image'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_old_opset_needs_upgrade_flag(tmp_path):
    model = zoo.old_opset_model()
    onnx.save(model, str(tmp_path / "old.onnx"))
    write_npz_folder(tmp_path / "calib", zoo.random_feeds(model, 2))
    refused = run_cli("static", "old.onnx", "-o", "q.onnx", "--calib", "calib", cwd=tmp_path)
    assert refused.returncode == 2
    assert "opset 9" in refused.stderr and "--upgrade-opset" in refused.stderr
    assert not (tmp_path / "q.onnx").exists()

    upgraded = run_cli("static", "old.onnx", "-o", "q.onnx", "--calib", "calib",
                       "--upgrade-opset", cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    quantized = check_model(tmp_path / "q.onnx")
    opset = next(i.version for i in quantized.opset_import if i.domain in ("", "ai.onnx"))
    assert opset >= 10
    assert summary_table(upgraded.stdout)["Conv"] == (1, 0, 0)
    feeds = zoo.random_feeds(model, 1, seed=3)
    ref, got = zoo.run(model, feeds)[0][0], zoo.run(str(tmp_path / "q.onnx"), feeds)[0][0]
    assert zoo.sqnr_db(ref, got) > 20


# -- in process: argument parsing and translation ---------------------------------------------
def _parse(*extra: str):
    return cli.build_parser().parse_args(["static", "m.onnx", "-o", "o.onnx", "--calib", "d",
                                          *extra])


def test_default_arguments_give_the_default_config():
    assert cli.static_config_from_args(_parse()) == StaticQuantConfig(progress=True)


def test_every_option_reaches_the_config():
    config = cli.static_config_from_args(_parse(
        "--per-channel", "--activation-type", "uint8", "--weight-type", "int16",
        "--reduce-range", "--symmetric-activations", "--asymmetric-weights",
        "--op-types", "Conv,MatMul", "--op-types", "Gemm", "--exclude-op-types", "Add",
        "--nodes", "a, b", "--exclude-nodes", "c", "--no-bias-quantization", "--keep-relu",
        "--no-fold-bn", "--no-subgraphs", "--upgrade-opset", "--external-data",
        "--max-samples", "7", "--quiet", "--no-bias-correction", "--smooth-quant", "0.7",
        "--equalize-layers",
    ))
    assert config == StaticQuantConfig(
        activation_type=UINT8, weight_type=INT16, per_channel=True, reduce_range=True,
        activation_symmetric=True, weight_symmetric=False,
        op_types=("Conv", "MatMul", "Gemm"), op_types_to_exclude=("Add",),
        nodes_to_quantize=("a", "b"), nodes_to_exclude=("c",),
        quantize_bias=False, keep_removable_activations=True, fold_batchnorm=False,
        subgraphs=False, upgrade_opset=True, external_data=True, max_calibration_samples=7,
        progress=False, bias_correction=False, smooth_quant=True, smooth_quant_alpha=0.7,
        equalize_layers=True,
    )
    assert cli.static_config_from_args(_parse("--smooth-quant")).smooth_quant_alpha == 0.5


@pytest.mark.parametrize("argv", [
    ["static", "m.onnx", "--calib", "d"],  # no -o
    ["static", "m.onnx", "-o", "o.onnx", "--calib", "d", "--activation-type", "int4"],
    ["static", "m.onnx", "-o", "o.onnx", "--calib", "d", "--max-samples", "0"],
    ["static", "m.onnx", "-o", "o.onnx", "--calib", "d", "--op-types", "Conv,,MatMul"],
    ["static", "m.onnx", "-o", "o.onnx", "--calib", "d", "--smooth-quant", "1.5"],
    ["frobnicate"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_no_command_prints_help_and_returns_2(capsys):
    assert cli.main([]) == 2
    assert "static" in capsys.readouterr().err


# -- format_summary ----------------------------------------------------------------------------
def _result(nodes: list[NodeDecision], **kwargs) -> QuantizationResult:
    values = dict(plan=QuantPlan(nodes={n.name: n for n in nodes}),
                  output_files=[Path("out/model.onnx")], float_bytes=4_000_000,
                  quantized_bytes=1_000_000, calibration_samples=12, seconds=3.456,
                  unobserved=[])
    values.update(kwargs)
    return QuantizationResult(**values)


def test_format_summary_table_reasons_and_sizes():
    no_range = "input '{}' has no calibrated range"
    nodes = [NodeDecision(f"conv{i}", "Conv", "quantize") for i in range(3)]
    nodes += [NodeDecision("relu0", "Relu", "remove", "clips"),
              NodeDecision("relu1", "Relu", "float", no_range.format("x1")),
              NodeDecision("add0", "Add", "float", no_range.format("x2")),
              NodeDecision("add1", "Add", "float", "no quantized neighbour"),
              NodeDecision("mm", "MatMul", "quantize")]
    text = summary.format_summary(_result(nodes))
    lines = text.splitlines()
    assert lines[0] == "quantized 4 of 8 candidate nodes (1 removed, 3 left float)"
    assert summary_table(text) == {"Conv": (3, 0, 0), "Add": (0, 0, 2), "Relu": (0, 1, 1),
                                   "MatMul": (1, 0, 0)}
    header = next(line for line in lines if line.lstrip().startswith("op type"))
    conv = next(line for line in lines if line.lstrip().startswith("Conv"))
    assert len(header) == len(conv)  # right-aligned columns
    assert re.search(r"^  total\s+4\s+1\s+3$", text, re.M)
    assert "float nodes:  3, by reason:" in text
    # Reasons that differ only in a quoted name are grouped, most common first; the group
    # shows its first reason with the real name (no literal '...').
    reasons = lines[lines.index("float nodes:  3, by reason:") + 1:][:2]
    assert reasons == ["  2  input 'x1' has no calibrated range (and 1 similar) [relu1, add0]",
                       "  1  no quantized neighbour [add1]"]
    assert "size:         4.00 MB -> 1.00 MB (4.00x smaller)" in lines
    assert "calibration:  12 samples" in lines
    assert "time:         3.46 s" in lines
    assert lines[-1] == f"written:      {Path('out/model.onnx')}"
    assert not text.endswith("\n")


def test_format_summary_shows_weight_only_and_unknown_actions():
    nodes = [NodeDecision("lstm", "LSTM", "weights", "weight-only op"),
             NodeDecision("conv", "Conv", "quantize"),
             NodeDecision("conv_b", "Conv", "weights", "weight-only (input 'x' unobserved)"),
             NodeDecision("odd", "Conv", "fused")]
    text = summary.format_summary(_result(nodes))
    assert text.splitlines()[0] == ("quantized 1 of 4 candidate nodes "
                                    "(2 weight-only, 0 removed, 0 left float)")
    header = next(line for line in text.splitlines() if line.lstrip().startswith("op type"))
    assert header.split()[2:] == ["quantized", "weight-only", "removed", "float", "fused"]
    assert summary_table(text) == {"Conv": (1, 1, 0, 0, 1), "LSTM": (0, 1, 0, 0, 0)}
    assert re.search(r"^  total\s+1\s+2\s+0\s+0\s+1$", text, re.M)


def test_format_summary_edge_cases():
    text = summary.format_summary(_result([], float_bytes=0, quantized_bytes=512,
                                          calibration_samples=1, unobserved=["t1", "t2"]))
    assert text.splitlines()[0] == "quantized 0 of 0 candidate nodes (0 removed, 0 left float)"
    assert "op type" not in text
    assert "float nodes:  0" in text
    assert "size:         0 B -> 512 B" in text and "x smaller" not in text
    assert "calibration:  1 sample" in text.splitlines()
    assert "unobserved:   2 tensors" in text and "(t1, t2)" in text
    grown = summary.format_summary(_result([], float_bytes=1000, quantized_bytes=1500))
    assert "1.00 KB -> 1.50 KB (1.50x larger)" in grown


@pytest.mark.parametrize(("size", "text"), [(0, "0 B"), (999, "999 B"), (1000, "1.00 KB"),
                                            (789_504, "789.50 KB"), (12_300_000, "12.30 MB"),
                                            (1_500_000_000, "1.50 GB")])
def test_format_size(size, text):
    assert summary.format_size(size) == text


def test_public_api():
    assert set(cli.__all__) == {"main", "build_parser", "static_config_from_args"}
    assert set(summary.__all__) == {"format_summary", "format_size", "speed_lines", "size_line",
                                    "files_lines"}
    for module in (cli, summary):
        for name in module.__all__:
            assert getattr(module, name).__doc__


# -- calibration methods, workers and the statistics cache ------------------------------------
def test_method_workers_and_cache(cnn_dir: Path) -> None:
    first = run_cli("static", "cnn.onnx", "-o", "cnn_pct.onnx", "--calib", "calib_npz",
                    "--method", "percentile", "--percentile", "99.9", "--workers", "2",
                    "--calib-cache", "stats.json", "--quiet", cwd=cnn_dir)
    assert first.returncode == 0, first.stderr
    stats = json.loads((cnn_dir / "stats.json").read_text())
    assert (stats["settings"]["method"], stats["settings"]["percentile"]) == ("percentile", 99.9)
    assert stats["samples"] == CALIB_SAMPLES
    # the cache replaces the data, also for other quantization settings
    again = run_cli("static", "cnn.onnx", "-o", "cnn_pct_pc.onnx", "--method", "percentile",
                    "--percentile", "99.9", "--calib-cache", "stats.json", "--per-channel",
                    "--quiet", cwd=cnn_dir)
    assert again.returncode == 0, again.stderr
    check_model(cnn_dir / "cnn_pct_pc.onnx")
    refused = run_cli("static", "cnn.onnx", "-o", "cnn_ent.onnx", "--method", "entropy",
                      "--calib-cache", "stats.json", cwd=cnn_dir)
    assert refused.returncode == 2
    assert "method: cache 'percentile', now 'entropy'" in refused.stderr
    assert not (cnn_dir / "cnn_ent.onnx").exists()


def test_no_data_and_no_cache(cnn_dir: Path) -> None:
    result = run_cli("static", "cnn.onnx", "-o", "x.onnx", cwd=cnn_dir)
    assert result.returncode == 2 and "--calib" in result.stderr
