"""The pre-processing front ends: ``onnxquant preprocess``, onnxruntime's ``quant_pre_process``
signature and its command line ``python -m onnxquant.ort.preprocess`` (boolean flags parsed
right). The real commands run in a subprocess; argument translation is checked in process."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant.ort
from onnxquant.cli import build_parser, main
from onnxquant.cli.preprocess import preprocess_config_from_args
from onnxquant.ort import preprocess as ort_cli
from onnxquant.ort import shape_inference
from onnxquant.ort._errors import InvalidOptionError

F = TensorProto.FLOAT


def _model() -> onnx.ModelProto:
    """Identity -> Dropout -> MatMul (weight = Unsqueeze of a constant): 3 nodes to remove."""
    weight = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"], name="identity"),
        helper.make_node("Dropout", ["x_id"], ["x_drop"], name="dropout"),
        helper.make_node("Unsqueeze", ["w2d", "axes0"], ["w"], name="unsqueeze"),
        helper.make_node("MatMul", ["x_drop", "w"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", F, ["B", 1, 4, 8])],
        [helper.make_tensor_value_info("y", F, None)],
        initializer=[numpy_helper.from_array(weight, "w2d"),
                     numpy_helper.from_array(np.array([0], np.int64), "axes0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]


def _run(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONWARNINGS": "error::RuntimeWarning"}
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    return path


# --------------------------------------------------------------------- onnxquant preprocess
def test_native_command_writes_the_model_and_prints_the_summary(model_file: Path) -> None:
    cwd = model_file.parent
    done = _run("onnxquant", "preprocess", model_file.name, "-o", "out.onnx", "--external-data",
                cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert _ops(cwd / "out.onnx") == ["MatMul"]
    assert sorted(p.name for p in cwd.iterdir()) == ["m.onnx", "out.onnx", "out.onnx.data"]
    assert "preprocessed: model file 'm.onnx'" in done.stdout
    assert "removed: Dropout 1, Identity 1, Unsqueeze 1" in done.stdout
    assert done.stderr == ""


def test_native_flags_become_the_config() -> None:
    args = build_parser().parse_args(["preprocess", "m.onnx", "-o", "o.onnx", "--no-optimize",
                                      "--no-symbolic-shapes", "--auto-merge", "--int-max", "99",
                                      "--guess-output-rank", "--external-data",
                                      "--upgrade-opset"])
    config = preprocess_config_from_args(args)
    assert (config.optimize, config.symbolic_shapes, config.onnx_shapes) == (False, False, True)
    assert (config.auto_merge, config.int_max, config.guess_output_rank) == (True, 99, True)
    assert config.external_data is True and config.upgrade_opset is True
    default = preprocess_config_from_args(build_parser().parse_args(
        ["preprocess", "m.onnx", "-o", "o.onnx", "--no-onnx-shapes"]))
    assert (default.optimize, default.symbolic_shapes, default.onnx_shapes) == (True, True,
                                                                                 False)
    assert default.external_data is None and default.auto_merge is False


def test_native_command_steps_off_and_errors(model_file: Path, capsys) -> None:
    cwd = model_file.parent
    code = main(["preprocess", str(model_file), "-o", str(cwd / "same.onnx"), "--no-optimize",
                 "-q"])
    assert code == 0 and capsys.readouterr().out == ""
    assert _ops(cwd / "same.onnx") == _ops(model_file)
    code = main(["preprocess", str(cwd / "missing.onnx"), "-o", str(cwd / "x.onnx")])
    assert code == 2
    assert "error: model file" in capsys.readouterr().err and not (cwd / "x.onnx").exists()


# ----------------------------------------------------------------------- quant_pre_process
def test_quant_pre_process_has_onnxruntimes_signature() -> None:
    assert onnxquant.ort.quant_pre_process is shape_inference.quant_pre_process
    params = inspect.signature(shape_inference.quant_pre_process).parameters
    expected = {
        "input_model": None, "output_model_path": None, "skip_optimization": False,
        "skip_onnx_shape": False, "skip_symbolic_shape": False, "auto_merge": False,
        "int_max": 2**31 - 1, "guess_output_rank": False, "verbose": 0,
        "save_as_external_data": False, "all_tensors_to_one_file": False,
        "external_data_location": None, "external_data_size_threshold": 1024,
    }
    assert [name for name in params][:-1] == list(expected)
    assert {name: params[name].default for name in expected} == expected
    assert params["deprecated_kwargs"].kind is inspect.Parameter.VAR_KEYWORD


def test_quant_pre_process_positional_and_old_keyword(model_file: Path) -> None:
    cwd = model_file.parent
    result = shape_inference.quant_pre_process(str(model_file), str(cwd / "a.onnx"), True)
    assert result.ops_after["MatMul"] == 1 and "optimize" not in [s.step for s in result.steps]
    shape_inference.quant_pre_process(input_model_path=model_file,
                                      output_model_path=cwd / "b.onnx")
    assert _ops(cwd / "b.onnx") == ["MatMul"]
    with pytest.raises(InvalidOptionError, match="unexpected keyword"):
        shape_inference.quant_pre_process(model_file, cwd / "c.onnx", skip_shapes=True)
    with pytest.raises(ValueError, match="plain file name"):
        shape_inference.quant_pre_process(model_file, cwd / "c.onnx",
                                          save_as_external_data=True,
                                          external_data_location="../c.data")


def test_quant_pre_process_external_data_with_optimization(model_file: Path) -> None:
    cwd = model_file.parent
    shape_inference.quant_pre_process(model_file, cwd / "e.onnx", save_as_external_data=True,
                                      all_tensors_to_one_file=False,
                                      external_data_location="e.weights",
                                      external_data_size_threshold=64)
    assert _ops(cwd / "e.onnx") == ["MatMul"]
    assert (cwd / "e.weights").stat().st_size >= 8 * 8 * 4


# ----------------------------------------------------------- python -m onnxquant.ort.preprocess
@pytest.mark.parametrize(("text", "value"), [("true", True), ("True", True), ("TRUE", True),
                                             ("1", True), ("false", False), ("False", False),
                                             ("0", False), (" false ", False)])
def test_boolean_flags_accept_true_false_1_0(text: str, value: bool) -> None:
    args = ort_cli.build_parser().parse_args(
        ["--input", "a", "--output", "b", "--skip_optimization", text, "--auto_merge", text])
    assert args.skip_optimization is value and args.auto_merge is value


def test_boolean_flags_without_a_value_mean_true() -> None:
    args = ort_cli.build_parser().parse_args(
        ["--input", "a", "--output", "b", "--save_as_external_data", "--skip_onnx_shape"])
    assert args.save_as_external_data is True and args.skip_onnx_shape is True
    assert args.skip_optimization is False and args.skip_symbolic_shape is False


@pytest.mark.parametrize("text", ["yes", "no", "2", "", "truthy", "F"])
def test_boolean_flags_refuse_anything_else(text: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ort_cli.build_parser().parse_args(
            ["--input", "a", "--output", "b", "--skip_symbolic_shape", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--skip_symbolic_shape" in err and "expected true, false, 1 or 0" in err


def test_skipping_every_step_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ort_cli.main(["--input", "a", "--output", "b", "--skip_optimization", "1",
                      "--skip_onnx_shape", "1", "--skip_symbolic_shape", "1"])
    assert exit_info.value.code == 2
    assert "nothing to do" in capsys.readouterr().err


def test_ort_command_false_means_false(model_file: Path) -> None:
    """onnxruntime 1.32 reads ``--skip_optimization False`` as true and skips optimization."""
    cwd = model_file.parent
    done = _run("onnxquant.ort.preprocess", "--input", model_file.name, "--output", "out.onnx",
                "--skip_optimization", "False", "--skip_symbolic_shape", "false", cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert _ops(cwd / "out.onnx") == ["MatMul"]  # optimized
    assert sorted(p.name for p in cwd.iterdir()) == ["m.onnx", "out.onnx"]
    assert "symbolic shapes" in done.stdout and "optimize" in done.stdout


def test_ort_command_in_process_skips_and_reports_errors(model_file: Path, capsys) -> None:
    cwd = model_file.parent
    assert ort_cli.main(["--input", str(model_file), "--output", str(cwd / "s.onnx"),
                         "--skip_optimization", "TRUE"]) == 0
    assert _ops(cwd / "s.onnx") == _ops(model_file)
    capsys.readouterr()
    assert ort_cli.main(["--input", str(model_file), "--output", str(model_file)]) == 2
    assert "error: the output path" in capsys.readouterr().err
