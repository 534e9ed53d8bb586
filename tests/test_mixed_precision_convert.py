"""Mixed precision ``convert``: a tensor quantized to its own type by its producer and read in a
second type by all its readers or the ``recv_nodes`` named (Q1→DQ1→Q2→DQ2).

Checked on the written graph (node names as onnxruntime writes them, element types, the plan's
parameters), against a numpy reference of the Q/DQ chain run by onnxruntime, and for the
errors a wrong convert raises.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant import INT8, UINT8, UINT16, QuantFormat, TensorConvert, TensorOverride
from onnxquant.core.errors import QuantizationError
from onnxquant.core.plan import QuantPlan
from onnxquant.ort._errors import InvalidOptionError
from onnxquant.ort.quant_utils import QuantType as OrtQuantType
from onnxquant.ort.tensor_quant_overrides import to_tensor_overrides

DIM = 6


def _model(graph_output: bool = False, readers: int = 2) -> onnx.ModelProto:
    """``x -> mm0 -> t``, ``t`` read by MatMuls ``mm1``.. (outputs ``y1``..), ``t`` optionally
    a graph output too."""
    rng = np.random.default_rng(7)
    weights = [rng.normal(0, 0.5, (DIM, DIM)).astype(np.float32) for _ in range(readers + 1)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["t"], name="mm0")]
    outputs = []
    for i in range(1, readers + 1):
        nodes.append(helper.make_node("MatMul", ["t", f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["N", DIM]))
    if graph_output:
        outputs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", DIM]))
    graph = helper.make_graph(
        nodes, "convert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIM])],
        outputs, [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(8)
    return [{"x": rng.normal(size=(3, DIM)).astype(np.float32)} for _ in range(count)]


def _quantize(tmp_path, model: onnx.ModelProto, tensors, **config):
    out = tmp_path / "q.onnx"
    result = onnxquant.quantize_static(
        model, out, _feeds(), onnxquant.StaticQuantConfig(evaluate=False, tensors=tensors,
                                                          **config))
    return onnx.load(out), result


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _reference_chain(v: np.ndarray, s1, z1, lo1, hi1, s2, z2, lo2, hi2):
    """Q1 -> DQ1 -> Q2 -> DQ2 in numpy (float32 division, round half to even)."""
    q1 = np.clip(np.rint(v / np.float32(s1)) + z1, lo1, hi1)
    d1 = ((q1 - z1) * np.float32(s1)).astype(np.float32)
    q2 = np.clip(np.rint(d1 / np.float32(s2)) + z2, lo2, hi2)
    return d1, ((q2 - z2) * np.float32(s2)).astype(np.float32)


def _run_with(model: onnx.ModelProto, extra: list[str]) -> dict[str, np.ndarray]:
    """Run ``model`` with onnxruntime, also returning the tensors ``extra``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in extra if name not in present)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, _feeds(1)[0]), strict=True))


def _check_numerics(model: onnx.ModelProto, producer_out: str, first: str, second: str) -> None:
    """Run ``model`` and compare the first and second grids' dequantized values with the
    numpy chain applied to the producer's output."""
    got = _run_with(model, [producer_out, first, second])
    s1 = float(numpy_helper.to_array(_init(model, "t_scale")))
    z1 = int(numpy_helper.to_array(_init(model, "t_zero_point")))
    s2 = float(numpy_helper.to_array(_init(model, "t_scale_convert")))
    z2 = int(numpy_helper.to_array(_init(model, "t_zero_point_convert")))
    d1, d2 = _reference_chain(got[producer_out], s1, z1, 0, 255, s2, z2, 0, 65535)
    np.testing.assert_array_equal(got[first], d1)
    np.testing.assert_allclose(got[second], d2, rtol=0, atol=s2 * 1.01)
    assert not np.array_equal(d1, got[producer_out])  # the 8-bit grid did round


def test_some_readers_read_the_second_type(tmp_path):
    tensors = {"t": TensorOverride(UINT8, convert=TensorConvert(UINT16, recv_nodes={"mm2"})),
               "y2": TensorOverride(UINT16)}
    model, result = _quantize(tmp_path, _model(), tensors)
    nodes = _nodes(model)
    assert model.opset_import[0].version == 21  # uint16 only in the convert
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 5
    assert [n.op_type for n in model.graph.node].count("DequantizeLinear") == 9  # + 3 weights
    assert nodes["mm1"].input[0] == "t_DequantizeLinear_Output"
    assert nodes["mm2"].input[0] == "t_convert_DequantizeLinear_Output"
    # DQ1' (read by Q2 alone) keeps DQ1's group intact for fusion
    clone = nodes["t_convert_clone_DequantizeLinear"]
    assert clone.input == ["t_QuantizeLinear_Output", "t_scale", "t_zero_point"]
    assert clone.output == ["t_convert_clone_QuantizeLinear_Input"]
    assert nodes["t_convert_QuantizeLinear"].input == [
        "t_convert_clone_QuantizeLinear_Input", "t_scale_convert", "t_zero_point_convert"]
    assert nodes["t_convert_DequantizeLinear"].input[0] == "t_convert_QuantizeLinear_Output"
    assert _init(model, "t_zero_point").data_type == TensorProto.UINT8
    assert _init(model, "t_zero_point_convert").data_type == TensorProto.UINT16
    assert all(n.domain == "" for n in model.graph.node)
    # the plan: both grids from the calibrated range of t
    tq = result.plan.tensors["t"]
    assert tq.qtype == "uint8" and tq.convert is not None
    assert tq.convert.readers == ["mm2"] and tq.convert.params.qtype == "uint16"
    low, high = tq.range  # type: ignore[misc]
    assert tq.convert.params.range == tq.range
    assert tq.convert.params.scale[0] == pytest.approx((high - low) / 65535, rel=1e-6)
    assert tq.scale[0] == pytest.approx((high - low) / 255, rel=1e-6)
    assert float(numpy_helper.to_array(_init(model, "t_scale_convert"))) == pytest.approx(
        tq.convert.params.scale[0])
    _check_numerics(model, "t", "t_DequantizeLinear_Output",
                    "t_convert_DequantizeLinear_Output")


def test_every_reader_and_the_graph_output_read_the_second_type(tmp_path):
    tensors = {"t": TensorOverride(convert=TensorConvert(UINT16))}
    model, _ = _quantize(tmp_path, _model(graph_output=True), tensors)
    nodes = _nodes(model)
    assert "t_convert_clone_DequantizeLinear" not in nodes
    assert nodes["mm1"].input[0] == nodes["mm2"].input[0] == "t"
    assert nodes["t_convert_DequantizeLinear"].output == ["t"]  # DQ2 is the graph output
    assert nodes["t_convert_QuantizeLinear"].input[0] == "t_DequantizeLinear_Output"
    assert nodes["mm0"].output == ["t_QuantizeLinear_Input"]
    assert [o.name for o in model.graph.output] == ["y1", "y2", "t"]
    _check_numerics(model, "t_QuantizeLinear_Input", "t_DequantizeLinear_Output", "t")


def test_graph_output_reads_the_first_type_when_some_readers_do(tmp_path):
    tensors = {"t": TensorOverride(convert=TensorConvert(UINT16, recv_nodes=["mm1"]))}
    model, _ = _quantize(tmp_path, _model(graph_output=True), tensors)
    nodes = _nodes(model)
    assert nodes["t_DequantizeLinear"].output == ["t"]
    assert nodes["mm2"].input[0] == "t"
    assert nodes["mm1"].input[0] == "t_convert_DequantizeLinear_Output"
    _check_numerics(model, "t_QuantizeLinear_Input", "t", "t_convert_DequantizeLinear_Output")


def test_graph_output_without_readers(tmp_path):
    tensors = {"t": TensorOverride(UINT16, convert=TensorConvert(UINT8))}
    model, _ = _quantize(tmp_path, _model(graph_output=True, readers=0), tensors)
    nodes = _nodes(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 4
    assert nodes["t_convert_DequantizeLinear"].output == ["t"]
    assert _init(model, "t_zero_point").data_type == TensorProto.UINT16
    assert _init(model, "t_zero_point_convert").data_type == TensorProto.UINT8


def test_a_graph_input_read_in_two_types(tmp_path):
    """A tensor whose producer is not quantized (a graph input): only its quantized readers
    get the Q/DQ chain."""
    tensors = {"x": TensorOverride(convert=TensorConvert(UINT16, rmin=-2.0, rmax=6.0))}
    model, result = _quantize(tmp_path, _model(), tensors)
    nodes = _nodes(model)
    assert nodes["mm0"].input[0] == "x_convert_DequantizeLinear_Output"
    assert nodes["x_QuantizeLinear"].input[0] == "x"
    convert = result.plan.tensors["x"].convert
    assert convert is not None and convert.params.range == (-2.0, 6.0)
    assert convert.params.scale[0] == pytest.approx(8.0 / 65535)
    assert convert.params.zero_point == [16384]


def test_explicit_second_grid_and_plan_round_trip(tmp_path):
    tensors = {"t": TensorOverride(convert=TensorConvert(UINT16, scale=1e-4, zero_point=30000))}
    model, result = _quantize(tmp_path, _model(), tensors)
    assert float(numpy_helper.to_array(_init(model, "t_scale_convert"))) == pytest.approx(1e-4)
    assert int(numpy_helper.to_array(_init(model, "t_zero_point_convert"))) == 30000
    again = QuantPlan.from_json(result.plan.to_json())
    assert again.tensors["t"] == result.plan.tensors["t"]
    assert again.tensors["t"].convert.params.zero_point == [30000]  # type: ignore[union-attr]


# -- errors ---------------------------------------------------------------------------------
def test_recv_nodes_must_read_the_tensor(tmp_path):
    tensors = {"t": TensorOverride(convert=TensorConvert(UINT16, recv_nodes={"mm0", "nope"}))}
    with pytest.raises(QuantizationError, match=r"'t'.*recv_nodes \['mm0', 'nope'\]"):
        _quantize(tmp_path, _model(), tensors)


def test_convert_on_a_constant_is_refused(tmp_path):
    tensors = {"w1": TensorOverride(convert=TensorConvert(UINT16))}
    with pytest.raises(QuantizationError, match="'w1'.*convert is for activations"):
        _quantize(tmp_path, _model(), tensors)


@pytest.mark.parametrize(("override", "config", "message"), [
    (TensorOverride(convert=TensorConvert(UINT8)), {}, "must differ from the tensor's own"),
    (TensorOverride(INT8, convert=TensorConvert(INT8)), {}, "must differ"),
    (TensorOverride(convert=TensorConvert(UINT16)), {"format": QuantFormat.QOPERATOR},
     "needs the QDQ format"),
    (TensorOverride(convert=TensorConvert(UINT16)), {"dedicated_qdq_pairs": True},
     "dedicated_qdq_pairs"),
    (TensorOverride(axis=0, convert=TensorConvert(UINT16)), {}, "convert is for activations"),
    (TensorOverride(convert=TensorConvert(UINT16, recv_nodes="mm1")), {},  # type: ignore[arg-type]
     "recv_nodes must be a set"),
    (TensorOverride(convert=TensorConvert(UINT16, recv_nodes=set())), {}, "recv_nodes is empty"),
    (TensorOverride(convert=TensorConvert(UINT16, scale=0.1)), {}, "together"),
    (TensorOverride(convert=TensorConvert("uint16")), {},  # type: ignore[arg-type]
     "needs a quant_type"),
    (TensorOverride(convert={"quant_type": UINT16}), {},  # type: ignore[arg-type]
     "must be a TensorConvert"),
])
def test_invalid_converts_name_the_tensor(override, config, message):
    with pytest.raises(QuantizationError, match=f"tensor override 't'.*{message}"):
        onnxquant.StaticQuantConfig(tensors={"t": override}, **config)


def test_a_16_bit_convert_needs_opset_21():
    config = onnxquant.StaticQuantConfig(
        tensors={"t": TensorOverride(UINT8, convert=TensorConvert(UINT16))})
    assert config.required_opset() == 21


# -- onnxruntime's TensorQuantOverrides -----------------------------------------------------
def test_ort_convert_becomes_a_tensor_convert():
    native = to_tensor_overrides({"t": [{
        "quant_type": OrtQuantType.QUInt8,
        "convert": {"quant_type": OrtQuantType.QUInt16, "rmin": np.float32(-1.0),
                    "rmax": 2.0, "symmetric": False, "recv_nodes": {"a", "b"}}}]})
    assert native["t"].quant_type is UINT8
    assert native["t"].convert == TensorConvert(UINT16, rmin=-1.0, rmax=2.0, symmetric=False,
                                                recv_nodes=frozenset({"a", "b"}))


@pytest.mark.parametrize(("convert", "message"), [
    ({"rmin": 0.0}, "must give a quant_type"),
    ({"quant_type": OrtQuantType.QUInt16, "recv_nodes": "a"}, "recv_nodes must be a set"),
    ({"quant_type": OrtQuantType.QUInt16, "reduce_range": True}, "reduce_range"),
    ({"quant_type": OrtQuantType.QUInt16, "scale": 0.1}, "both 'scale' and 'zero_point'"),
])
def test_ort_invalid_converts(convert, message):
    with pytest.raises(InvalidOptionError, match=message):
        to_tensor_overrides({"t": [{"convert": convert}]})
