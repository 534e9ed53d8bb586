"""The ``onnxquant`` command for the other formats and methods: ``static --format qoperator``,
``dynamic`` and ``weights`` — the real command in a subprocess, then what it wrote."""

from __future__ import annotations

from pathlib import Path

import model_zoo as zoo
import onnx
import pytest
from test_cli import check_model, run_cli, write_npz_folder

from onnxquant import UINT8, cli
from onnxquant.cli.dynamic import dynamic_config_from_args
from onnxquant.core.qtypes import QuantFormat


def _ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("formats")
    onnx.save(zoo.cnn(), str(folder / "cnn.onnx"))
    onnx.save(zoo.transformer_block(), str(folder / "block.onnx"))
    onnx.save(zoo.matmul_chain(dim=64), str(folder / "chain.onnx"))
    write_npz_folder(folder / "calib", zoo.random_feeds(zoo.cnn(), 4, seed=1))
    write_npz_folder(folder / "chain_calib", zoo.random_feeds(zoo.matmul_chain(dim=64), 4))
    return folder


def _fidelity(float_model: onnx.ModelProto, path: Path) -> float:
    feeds = zoo.random_feeds(float_model, 3, seed=9)
    ref, got = zoo.run(float_model, feeds), zoo.run(str(path), feeds)
    return min(zoo.sqnr_db(r[0], g[0]) for r, g in zip(ref, got, strict=True))


def test_static_qoperator(models: Path) -> None:
    run = run_cli("static", "cnn.onnx", "-o", "cnn_qop.onnx", "--calib", "calib",
                  "--format", "qoperator", "--activation-type", "uint8", "--check-speed", "6",
                  cwd=models)
    assert run.returncode == 0, run.stderr
    model = check_model(models / "cnn_qop.onnx")
    assert "QLinearConv" in _ops(model)
    # only the shallow stem on the graph input stays float (float_conv_depth)
    floats = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [n.input[0] for n in floats] == [model.graph.input[0].name]
    assert _fidelity(zoo.cnn(), models / "cnn_qop.onnx") > 15
    assert "speed:        latency (1 thread, median of 6)" in run.stdout


def test_static_s8s8_gets_a_speed_warning_on_x86(models: Path) -> None:
    from onnxquant.core.speed import cpu_info

    run = run_cli("static", "cnn.onnx", "-o", "cnn_s8.onnx", "--calib", "calib",
                  "--activation-type", "int8", cwd=models)
    assert run.returncode == 0, run.stderr
    assert ("S8S8" in run.stdout) == cpu_info().x86


def test_dynamic_qoperator_and_qdq(models: Path) -> None:
    run = run_cli("dynamic", "block.onnx", "-o", "block_dyn.onnx", cwd=models)
    assert run.returncode == 0, run.stderr
    model = check_model(models / "block_dyn.onnx")
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= _ops(model)
    assert "quantized" in run.stdout and "forms chosen for this onnxruntime" in run.stdout
    assert _fidelity(zoo.transformer_block(), models / "block_dyn.onnx") > 20

    run = run_cli("dynamic", "block.onnx", "-o", "block_dqdq.onnx", "--format", "qdq",
                  "--per-channel", cwd=models)
    assert run.returncode == 0, run.stderr
    model = check_model(models / "block_dqdq.onnx")
    assert "MatMulInteger" not in _ops(model)
    assert any(f.name == "ComputeQuantizationParameters" for f in model.functions)
    assert _fidelity(zoo.transformer_block(), models / "block_dqdq.onnx") > 20


def test_dynamic_arguments_become_config() -> None:
    args = cli.build_parser().parse_args(
        ["dynamic", "m.onnx", "-o", "q.onnx", "--weight-type", "uint8", "--per-channel",
         "--format", "qdq", "--exclude-nodes", "a,b", "--subgraphs", "--all-matmuls"])
    config = dynamic_config_from_args(args)
    assert config.weight_type is UINT8 and config.per_channel
    assert config.format is QuantFormat.QDQ and config.subgraphs
    assert config.nodes_to_exclude == ("a", "b") and not config.matmul_const_b_only


def test_dynamic_error_exits_2_and_writes_nothing(models: Path) -> None:
    run = run_cli("dynamic", "missing.onnx", "-o", "out.onnx", cwd=models)
    assert run.returncode == 2 and "missing.onnx" in run.stderr
    assert not (models / "out.onnx").exists()


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "gptq"])
def test_weights(models: Path, algorithm: str) -> None:
    out = f"chain_{algorithm}.onnx"
    extra = ["--calib", "chain_calib"] if algorithm == "gptq" else []
    run = run_cli("weights", "chain.onnx", "-o", out, "--bits", "4", "--block-size", "16",
                  "--algorithm", algorithm, *extra, cwd=models)
    assert run.returncode == 0, run.stderr
    model = check_model(models / out)
    assert "MatMulNBits" in _ops(model) and "MatMul" not in _ops(model)
    assert _fidelity(zoo.matmul_chain(dim=64), models / out) > 12


def test_weights_gptq_without_data_is_an_error(models: Path) -> None:
    run = run_cli("weights", "chain.onnx", "-o", "never.onnx", "--algorithm", "gptq",
                  cwd=models)
    assert run.returncode == 2 and "--calib" in run.stderr
    assert not (models / "never.onnx").exists()
