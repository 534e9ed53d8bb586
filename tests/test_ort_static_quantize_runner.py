"""``onnxquant.ort.static_quantize_runner``: onnxruntime's static quantization command line,
run on a small Conv model whose calibration data is a ``test_data_set_*`` folder next to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.core.errors import FeedError, QuantizationError
from onnxquant.ort import static_quantize_runner as runner

OUT_CHANNELS = 4
IN_CHANNELS = 8  # 8 x 3 x 3 is deep enough for QOperator to quantize the Conv
INPUT_HIGH = 2.0  # calibration data lies in [0, INPUT_HIGH]


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(
        rng.standard_normal((OUT_CHANNELS, IN_CHANNELS, 3, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(OUT_CHANNELS).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="Conv0", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="Relu0")],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, IN_CHANNELS, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, OUT_CHANNELS, 8, 8])],
        [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _write_data_set(folder: Path, index: int, arrays: list[np.ndarray],
                    names: list[str] | None = None) -> None:
    data_dir = folder / f"test_data_set_{index}"
    data_dir.mkdir()
    for position, array in enumerate(arrays):
        tensor = numpy_helper.from_array(array, names[position] if names else None)
        (data_dir / f"input_{position}.pb").write_bytes(tensor.SerializeToString())


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """model.onnx with three test-data sets; the largest input value is exactly INPUT_HIGH."""
    onnx.save(_conv_model(), tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    for index in range(3):
        data = (rng.random((1, IN_CHANNELS, 8, 8)) * INPUT_HIGH).astype(np.float32)
        data.flat[0] = INPUT_HIGH if index == 1 else 0.0
        _write_data_set(tmp_path, index, [data])
    return tmp_path


def _run(model_dir: Path, *args: str) -> onnx.ModelProto:
    out = model_dir / "model_quant.onnx"
    runner.main(["-i", str(model_dir / "model.onnx"), "-o", str(out), *args])
    return onnx.load(out)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _conv(model: onnx.ModelProto) -> onnx.NodeProto:
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    return conv


def _dq_inputs(model: onnx.ModelProto, tensor: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(quantized data or None, scale, zero point) of the DequantizeLinear producing tensor."""
    dq = _producers(model)[tensor]
    assert dq.op_type == "DequantizeLinear"
    assert dq.domain == ""
    inits = _inits(model)
    zero_point = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
    return inits.get(dq.input[0]), inits[dq.input[1]], zero_point


def test_defaults_give_qdq_with_uint8_activations_int8_weights(model_dir: Path) -> None:
    model = _run(model_dir)
    onnx.checker.check_model(model)
    conv = _conv(model)
    # activation: float input -> QuantizeLinear -> DequantizeLinear -> Conv
    _, x_scale, x_zp = _dq_inputs(model, conv.input[0])
    dq = _producers(model)[conv.input[0]]
    q = _producers(model)[dq.input[0]]
    assert q.op_type == "QuantizeLinear" and q.input[0] == "x"
    assert x_zp.dtype == np.uint8 and x_zp.shape == ()
    # MinMax over all three data sets (0 is in the range): scale = max / 255, zero point 0
    assert x_scale == pytest.approx(INPUT_HIGH / 255, rel=1e-5)
    assert int(x_zp) == 0
    # weight: stored int8, per tensor, symmetric
    w, w_scale, w_zp = _dq_inputs(model, conv.input[1])
    assert w.dtype == np.int8 and w.shape == (OUT_CHANNELS, IN_CHANNELS, 3, 3)
    assert w_scale.shape == () and w_zp.dtype == np.int8 and int(w_zp) == 0
    # bias: int32, dequantized with scale x_scale * w_scale
    b, b_scale, _ = _dq_inputs(model, conv.input[2])
    assert b.dtype == np.int32
    assert b_scale == pytest.approx(x_scale * w_scale, rel=1e-5)
    # the float weights are gone, the graph output keeps its name
    assert "W" not in _inits(model) and [o.name for o in model.graph.output] == ["y"]
    out_dq = _producers(model)["y"]
    assert out_dq.op_type == "DequantizeLinear"
    assert _inits(model)[out_dq.input[2]].dtype == np.uint8


@pytest.mark.parametrize(("act", "wgt", "act_dtype", "wgt_dtype"), [
    ("qint8", "qint8", np.int8, np.int8),
    ("quint8", "quint8", np.uint8, np.uint8),
    ("quint16", "qint8", np.uint16, np.int8),
    ("qint16", "qint16", np.int16, np.int16),
])
def test_activation_and_weight_types(model_dir: Path, act: str, wgt: str, act_dtype: type,
                                     wgt_dtype: type) -> None:
    model = _run(model_dir, "--activation_type", act, "--weight_type", wgt)
    conv = _conv(model)
    assert _dq_inputs(model, conv.input[0])[2].dtype == act_dtype
    w, _, w_zp = _dq_inputs(model, conv.input[1])
    assert w.dtype == wgt_dtype and w_zp.dtype == wgt_dtype


def test_per_channel_weight_scales(model_dir: Path) -> None:
    model = _run(model_dir, "--per_channel")
    w, w_scale, w_zp = _dq_inputs(model, _conv(model).input[1])
    dq = _producers(model)[_conv(model).input[1]]
    assert w_scale.shape == (OUT_CHANNELS,) and w_zp.shape == (OUT_CHANNELS,)
    axis = [a.i for a in dq.attribute if a.name == "axis"]
    assert axis in ([], [0])  # 0 is the default axis of DequantizeLinear


def test_disable_quantize_bias_keeps_float_bias(model_dir: Path) -> None:
    model = _run(model_dir, "--disable_quantize_bias")
    conv = _conv(model)
    assert conv.input[2] == "B"
    assert _inits(model)["B"].dtype == np.float32
    assert all(t.data_type != TensorProto.INT32 for t in model.graph.initializer)


def test_qoperator_format(model_dir: Path) -> None:
    model = _run(model_dir, "--quant_format", "qoperator")
    ops = [n.op_type for n in model.graph.node]
    assert "QLinearConv" in ops and "Conv" not in ops
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_nodes_to_exclude_keeps_conv_float(model_dir: Path) -> None:
    model = _run(model_dir, "--nodes_to_exclude", "Conv0", "Relu0")
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"]
    assert list(_conv(model).input) == ["x", "W", "B"]


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "distribution"])
def test_calibration_methods(model_dir: Path, method: str) -> None:
    model = _run(model_dir, "--calibration_method", method)
    _, x_scale, _ = _dq_inputs(model, _conv(model).input[0])
    assert 0 < float(x_scale) <= INPUT_HIGH / 127 * 1.01


def test_tensor_quant_overrides_file(model_dir: Path) -> None:
    path = model_dir / "overrides.json"
    path.write_text(json.dumps({"x": [{"scale": 0.005, "zero_point": 2}]}))
    model = _run(model_dir, "--tensor_quant_overrides", str(path))
    _, x_scale, x_zp = _dq_inputs(model, _conv(model).input[0])
    assert float(x_scale) == pytest.approx(0.005)
    assert int(x_zp) == 2 and x_zp.dtype == np.uint8


def test_tensor_quant_overrides_must_be_an_object(model_dir: Path) -> None:
    path = model_dir / "overrides.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        _run(model_dir, "--tensor_quant_overrides", str(path))


def test_extra_options_map_one_to_one(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"x": [{"symmetric": True}]}))
    args = runner.parse_arguments([
        "-i", "m.onnx", "-o", "q.onnx", "--enable_subgraph", "--force_quantize_no_input_check",
        "--matmul_const_b_only", "--dedicated_qdq_pair",
        "--op_types_to_exclude_output_quantization", "MatMul", "Conv",
        "--calib_tensor_range_symmetric", "--calib_moving_average",
        "--disable_quantize_bias", "--use_qdq_contrib_ops", "--minimum_real_range", "0.5",
        "--qdq_keep_removable_activations", "--qdq_disable_weight_adjust_for_int32_bias",
        "--op_per_channel_axis", "MatMul", "1", "--op_per_channel_axis", "Gemm", "-1",
        "--add_qdq_pair_to_weight", "--tensor_quant_overrides", str(path)])
    assert runner.get_extra_options(args) == {
        "EnableSubgraph": True, "ForceQuantizeNoInputCheck": True, "MatMulConstBOnly": True,
        "AddQDQPairToWeight": True, "DedicatedQDQPair": True,
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Conv"],
        "CalibTensorRangeSymmetric": True, "CalibMovingAverage": True, "QuantizeBias": False,
        "UseQDQContribOps": True, "MinimumRealRange": 0.5, "QDQKeepRemovableActivations": True,
        "QDQDisableWeightAdjustForInt32Bias": True,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Gemm": -1},
        "TensorQuantOverrides": {"x": [{"symmetric": True}]},
    }


def test_defaults_match_onnxruntime() -> None:
    args = runner.parse_arguments(["-i", "m.onnx", "-o", "q.onnx"])
    assert (args.activation_type, args.weight_type) == ("quint8", "qint8")
    assert (args.quant_format, args.calibration_method) == ("qdq", "minmax")
    assert args.nodes_to_quantize is None and args.nodes_to_exclude is None
    extra = runner.get_extra_options(args)
    assert extra["MinimumRealRange"] == 0.0001 and extra["QuantizeBias"] is True
    assert extra["EnableSubgraph"] is False and extra["QDQOpTypePerChannelSupportToAxis"] == {}
    assert "TensorQuantOverrides" not in extra


@pytest.mark.parametrize("bad", [
    ["--activation_type", "int8"],
    ["--quant_format", "qlinear"],
    ["--op_per_channel_axis", "MatMul", "one"],
    ["--minimum_real_range", "-1"],
])
def test_usage_errors_exit_2(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        runner.parse_arguments(["-i", "m.onnx", "-o", "q.onnx", *bad])
    assert info.value.code == 2


def test_int8_activations_with_uint8_weights_raise(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="QUInt8"):
        _run(model_dir, "--activation_type", "qint8", "--weight_type", "quint8")
    assert not (model_dir / "model_quant.onnx").exists()


def test_unsupported_option_raises_clearly(model_dir: Path) -> None:
    with pytest.raises(QuantizationError, match="QFLOAT8E4M3FN"):
        _run(model_dir, "--activation_type", "qfloat8e4m3fn", "--weight_type", "qfloat8e4m3fn")


def test_missing_calibration_data(tmp_path: Path) -> None:
    onnx.save(_conv_model(), tmp_path / "model.onnx")
    with pytest.raises(FeedError, match="test_data_set_"):
        _run(tmp_path)
    code = runner.run(["-i", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "q.onnx")])
    assert code == 2  # a typed error: usage exit code


def test_reader_order_positions_and_names(tmp_path: Path) -> None:
    """Folders in natural order; positions skip initializer-backed inputs; names win."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "k"], ["t"]), helper.make_node("Mul", ["t", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "k", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    for index in (10, 2):
        _write_data_set(tmp_path, index, [np.full(2, index, np.float32),
                                          np.full(2, -index, np.float32)])
    _write_data_set(tmp_path, 3, [np.zeros(2, np.float32), np.ones(2, np.float32)], ["b", "a"])
    (tmp_path / "test_data_set_notes.txt").write_text("not a folder")
    reader = runner.OnnxModelCalibrationDataReader(tmp_path / "model.onnx")
    assert len(reader) == 3
    feeds = list(iter(reader.get_next, None))
    assert [sorted(f) for f in feeds] == [["a", "b"]] * 3
    assert [float(f["a"][0]) for f in feeds] == [2.0, 1.0, 10.0]
    assert [float(f["b"][0]) for f in feeds] == [-2.0, 0.0, -10.0]
    reader.rewind()
    assert reader.get_next() is not None


def test_module_command_line(model_dir: Path) -> None:
    out = model_dir / "cli.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "onnxquant.ort.static_quantize_runner", "-i",
         str(model_dir / "model.onnx"), "-o", str(out), "--per_channel"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "quantized" in done.stdout
    model = onnx.load(out)
    assert _dq_inputs(model, _conv(model).input[1])[1].shape == (OUT_CHANNELS,)
    bad = subprocess.run(
        [sys.executable, "-m", "onnxquant.ort.static_quantize_runner", "-i",
         str(model_dir / "model.onnx"), "-o", str(out), "--activation_type", "qint8",
         "--weight_type", "quint8"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
