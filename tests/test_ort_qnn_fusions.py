"""onnxquant.ort's QNN helpers, fusions and ONNXModel on small models built here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.ort import QuantType, StaticQuantConfig
from onnxquant.ort.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model
from onnxquant.ort.execution_providers.qnn.fusion_lpnorm import FusionLpNormalization
from onnxquant.ort.execution_providers.qnn.mixed_precision_overrides_utils import (
    MixedPrecisionTensorQuantOverridesFixer,
)
from onnxquant.ort.fusions import FusionGelu, FusionLayerNormalization
from onnxquant.ort.onnx_model import ONNXModel
from onnxquant.ort.tensor_quant_overrides import TensorQuantOverridesHelper

SHAPE = (2, 3, 4)
RNG = np.random.default_rng(0)


def _const(name: str, value: object) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], *, opset: int = 18,
           outputs: tuple[str, ...] = ("y",), shape: tuple[int, ...] = SHAPE) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _erf(values: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(values.astype(np.float64))


def _gelu_model(pattern: int, extra_output: str | None = None) -> onnx.ModelProto:
    inits = [_const("one", 1.0), _const("half", 0.5), _const("r2", math.sqrt(2.0)),
             _const("ir2", 1 / math.sqrt(2.0))]
    scaled = (helper.make_node("Mul", ["ir2", "x"], ["s"]) if pattern == 4
              else helper.make_node("Div", ["x", "r2"], ["s"]))
    nodes = [scaled, helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Add", ["one", "e"], ["a"])]
    if pattern == 1:
        nodes += [helper.make_node("Mul", ["x", "half"], ["h"]),
                  helper.make_node("Mul", ["h", "a"], ["y"])]
    elif pattern == 2:
        nodes += [helper.make_node("Mul", ["a", "x"], ["m"]),
                  helper.make_node("Mul", ["half", "m"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["a", "half"], ["m"]),
                  helper.make_node("Mul", ["x", "m"], ["y"])]
    outputs = ("y",) if extra_output is None else ("y", extra_output)
    return _model(nodes, inits, outputs=outputs)


@pytest.mark.parametrize("pattern", [1, 2, 3, 4])
def test_gelu_fusion_gives_one_ms_gelu_with_erf_values(pattern: int) -> None:
    model = _gelu_model(pattern)
    assert FusionGelu(ONNXModel(model)).apply()
    (node,) = model.graph.node
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == \
        ("Gelu", "com.microsoft", ["x"], ["y"])
    assert node.name == "Gelu_fused_Erf_0"
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), ("com.microsoft", 1)}
    assert [t.name for t in model.graph.initializer] == []  # constants no one reads are gone
    x = RNG.normal(size=SHAPE).astype(np.float32)
    expected = 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    np.testing.assert_allclose(_run(model, x)[0], expected, rtol=1e-5, atol=1e-6)


def test_gelu_fusion_keeps_a_pattern_whose_intermediate_is_read_outside() -> None:
    model = _gelu_model(1, extra_output="e")
    before = [n.op_type for n in model.graph.node]
    assert not FusionGelu(ONNXModel(model)).apply()
    assert [n.op_type for n in model.graph.node] == before


def test_gelu_fusion_keeps_a_wrong_constant() -> None:
    model = _gelu_model(2)
    model.graph.initializer[1].CopyFrom(_const("half", 0.25))
    assert not FusionGelu(ONNXModel(model)).apply()
    assert len(model.graph.node) == 5


def _layernorm_model(scale_shape: tuple[int, ...], square: str = "Pow") -> onnx.ModelProto:
    inits = [_const("scale", RNG.normal(size=scale_shape)), _const("bias", RNG.normal(size=4)),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
             _const("two", 2.0), _const("eps", 1e-5)]
    squared = (helper.make_node("Pow", ["d", "two"], ["p"]) if square == "Pow"
               else helper.make_node("Mul", ["d", "d"], ["p"]))
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"]),
             helper.make_node("Sub", ["x", "m"], ["d"]), squared,
             helper.make_node("ReduceMean", ["p", "axes"], ["v"]),
             helper.make_node("Add", ["v", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]),
             helper.make_node("Mul", ["n", "scale"], ["ns"]),
             helper.make_node("Add", ["ns", "bias"], ["y"])]
    return _model(nodes, inits)


@pytest.mark.parametrize("square", ["Pow", "Mul"])
def test_layernorm_fusion_values_and_attributes(square: str) -> None:
    model = _layernorm_model((4,), square)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    assert FusionLayerNormalization(ONNXModel(model)).apply()
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, list(node.input), list(node.output)) == \
        ("LayerNormalization", ["x", "scale", "bias"], ["y"])
    assert attrs["axis"] == -1
    assert attrs["epsilon"] == pytest.approx(1e-5)
    x = RNG.normal(size=SHAPE).astype(np.float32)
    np.testing.assert_allclose(_run(model, x)[0], _run(reference, x)[0], rtol=1e-4, atol=1e-5)


def test_layernorm_fusion_refuses_a_scale_wider_than_the_normalized_axes() -> None:
    model = _layernorm_model((3, 4))
    assert not FusionLayerNormalization(ONNXModel(model)).apply()
    assert len(model.graph.node) == 9


def _lpnorm_model(epsilon: float) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
             _const("eps", epsilon),
             numpy_helper.from_array(np.array(SHAPE, dtype=np.int64), "shape")]
    nodes = [helper.make_node("ReduceL2", ["x", "axes"], ["l2"], keepdims=1),
             helper.make_node("Clip", ["l2", "eps"], ["c"]),
             helper.make_node("Expand", ["c", "shape"], ["ex"]),
             helper.make_node("Div", ["x", "ex"], ["y"])]
    return _model(nodes, inits)


def test_lpnorm_fusion_gives_l2_normalization() -> None:
    model = _lpnorm_model(1e-12)
    assert FusionLpNormalization(ONNXModel(model)).apply()
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, attrs) == ("LpNormalization", {"axis": -1, "p": 2})
    x = RNG.normal(size=SHAPE).astype(np.float32)
    expected = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(_run(model, x)[0], expected, rtol=1e-5)


def test_lpnorm_fusion_refuses_a_large_epsilon() -> None:
    assert not FusionLpNormalization(ONNXModel(_lpnorm_model(0.5))).apply()


def test_topological_sort_is_first_in_first_out_and_detects_cycles() -> None:
    nodes = [helper.make_node("Relu", ["b"], ["c"], name="n2"),
             helper.make_node("Relu", ["x"], ["a"], name="n0"),
             helper.make_node("Add", ["a", "c"], ["y"], name="n3"),
             helper.make_node("Relu", ["a"], ["b"], name="n1")]
    model = ONNXModel(_model(nodes, []))
    model.topological_sort()
    assert [n.name for n in model.nodes()] == ["n0", "n1", "n2", "n3"]
    cyclic = ONNXModel(_model([helper.make_node("Relu", ["y"], ["z"]),
                               helper.make_node("Relu", ["z"], ["y"])], []))
    with pytest.raises(ValueError, match="cycle"):
        cyclic.topological_sort()


def test_replace_gemm_with_matmul_keeps_values() -> None:
    w = RNG.normal(size=(5, 4)).astype(np.float32)
    c = RNG.normal(size=5).astype(np.float32)
    gemm = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1)
    model = _model([gemm], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")],
                   shape=(3, 4))
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    wrapped = ONNXModel(model)
    wrapped.replace_gemm_with_matmul()
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    assert model.graph.node[0].input[1] == "w_Transposed"
    np.testing.assert_array_equal(numpy_helper.to_array(wrapped.get_initializer("w_Transposed")),
                                  w.T)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x)[0], _run(reference, x)[0], rtol=1e-5)


def test_onnx_model_lookups_and_unused_constant_removal() -> None:
    nodes = [helper.make_node("Constant", [], ["k"], value_float=3.0),
             helper.make_node("Constant", [], ["unused"], value_float=1.0),
             helper.make_node("Mul", ["x", "k"], ["y"], name="mul_7")]
    model = ONNXModel(_model(nodes, [_const("dead", 0.0)]))
    assert model.get_constant_value("k") == np.float32(3.0)
    assert model.get_largest_node_name_suffix("mul_") == 7
    assert [n.name for n in model.input_name_to_nodes()["x"]] == ["mul_7"]
    assert model.output_name_to_node()["y"].name == "mul_7"
    model.remove_unused_constant()
    assert [list(n.output) for n in model.nodes()] == [["k"], ["y"]]
    assert model.get_initializer("dead") is None


def _io_model(shape: tuple[int, ...]) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    return _model(nodes, [], shape=shape, outputs=("y",))


def test_qnn_preprocess_makes_io_channel_last_and_names_nodes(tmp_path: Path) -> None:
    model = _io_model((1, 2, 3, 4))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                 (1, 2, 3, 4)))
    onnx.save(model, tmp_path / "m.onnx")
    assert qnn_preprocess_model(tmp_path / "m.onnx", tmp_path / "o.onnx",
                                inputs_to_make_channel_last=["x"],
                                outputs_to_make_channel_last=["y"])
    out = onnx.load(tmp_path / "o.onnx")
    assert [n.op_type for n in out.graph.node] == ["Transpose", "Relu", "Neg", "Transpose"]
    assert all(n.name for n in out.graph.node)
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (out.graph.input[0], out.graph.output[0])]
    assert dims == [[1, 3, 4, 2], [1, 3, 4, 2]]
    x = RNG.normal(size=(1, 2, 3, 4)).astype(np.float32)
    (y,) = _run(out, x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y.transpose(0, 3, 1, 2), -np.maximum(x, 0))


def test_qnn_preprocess_rank_error_and_nothing_to_do(tmp_path: Path) -> None:
    model = _io_model((2, 3))
    for node in model.graph.node:
        node.name = f"n_{node.op_type}"
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="to be of rank >= 3"):
        qnn_preprocess_model(tmp_path / "m.onnx", tmp_path / "o.onnx",
                             inputs_to_make_channel_last=["x"])
    assert not qnn_preprocess_model(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def _chain_model() -> onnx.ModelProto:
    """x -> a(Relu) -> b(Sigmoid) -> c(Neg) -> y, with b's output also read by d(Abs) -> z."""
    nodes = [helper.make_node("Relu", ["x"], ["a_out"], name="a"),
             helper.make_node("Sigmoid", ["a_out"], ["b_out"], name="b"),
             helper.make_node("Neg", ["b_out"], ["y"], name="c"),
             helper.make_node("Abs", ["b_out"], ["z"], name="d")]
    return onnx.shape_inference.infer_shapes(_model(nodes, [], outputs=("y", "z")))


def test_mixed_precision_fixer_converts_at_both_ends() -> None:
    overrides = TensorQuantOverridesHelper({"a_out": [{"quant_type": QuantType.QUInt16}]})
    fixer = MixedPrecisionTensorQuantOverridesFixer.create_from_model(
        overrides, _chain_model(), QuantType.QUInt8)
    fixer.apply(QuantType.QUInt8, default_activation_symmetric=False)
    assert overrides.get_dict() == {
        "x": [{"quant_type": QuantType.QUInt8,
               "convert": {"quant_type": QuantType.QUInt16, "recv_nodes": {"a"}}}],
        "a_out": [{"quant_type": QuantType.QUInt16}],
        "b_out": [{"quant_type": QuantType.QUInt16,
                   "convert": {"quant_type": QuantType.QUInt8, "recv_nodes": {"c", "d"}}}],
    }


def test_get_qnn_qdq_config_16bit_sigmoid_and_options(tmp_path: Path) -> None:
    onnx.save(_chain_model(), tmp_path / "m.onnx")
    user = {"a_out": [{"quant_type": QuantType.QUInt16}]}
    config = get_qnn_qdq_config(tmp_path / "m.onnx", None, init_overrides=user,
                                nodes_to_exclude=["d"])
    assert isinstance(config, StaticQuantConfig)
    assert user == {"a_out": [{"quant_type": QuantType.QUInt16}]}  # the caller's dict is kept
    assert sorted(config.op_types_to_quantize) == ["Neg", "Relu", "Sigmoid"]
    (b_out,) = config.extra_options["TensorQuantOverrides"]["b_out"]
    assert b_out["quant_type"] is QuantType.QUInt16
    assert b_out["scale"] == np.float32(1 / 65536) and b_out["zero_point"].dtype == np.uint16
    assert b_out["convert"]["recv_nodes"] == {"c", "d"}
    options = config.extra_options
    assert (options["MinimumRealRange"], options["DedicatedQDQPair"], options["WeightSymmetric"],
            options["UseQDQContribOps"]) == (0.0001, False, False, True)
    assert (config.activation_type, config.weight_type) == (QuantType.QUInt8, QuantType.QUInt8)
    assert config.use_external_data_format is False


def test_get_qnn_qdq_config_matmul_weight_next_to_16bit_activation() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
             helper.make_node("Cast", ["y"], ["c"], name="cast", to=TensorProto.FLOAT)]
    model = _model(nodes, [_const("w", RNG.normal(size=(4, 2)))], opset=21, outputs=("c",))
    config = get_qnn_qdq_config(model, None, activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QInt8)
    assert config.extra_options["TensorQuantOverrides"] == {
        "w": [{"quant_type": QuantType.QInt8, "symmetric": True}]}
    assert "UseQDQContribOps" not in config.extra_options  # opset 21 has 16-bit Q/DQ
    assert sorted(config.op_types_to_quantize) == ["MatMul", "Relu"]  # Cast is never quantized
