"""onnxquant.debug.match_models: every quantized weight traced to its float original and every
quantized activation to the float tensor it replaces, by graph structure, on models made by
onnxquant (static QDQ/QOperator, weight-only, dynamic), by onnxruntime's optimizer, and by hand.

Dequantized weights are checked against :mod:`dequant_reference` (numpy from the operator specs,
no onnxquant code) and their SQNR must be plausible for their bit width.
"""

from __future__ import annotations

from pathlib import Path

import dequant_reference as ref
import ml_dtypes
import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant.debug import Matching, match_models

F = onnxquant.QuantFormat


def _match(float_model: onnx.ModelProto, quant_path: Path) -> Matching:
    return match_models(ir.serde.deserialize_model(float_model), ir.load(str(quant_path)))


def _min_db(bits: int) -> float:
    return {2: 5.0, 4: 15.0}.get(bits, 30.0)


def _bits(quant: onnx.ModelProto, stored: str) -> int:
    node, _ = ref.quantized_constants(quant)[stored]
    if node.op_type == "MatMulNBits":
        return next(a.i for a in node.attribute if a.name == "bits")
    dtype = ref.constants(quant)[stored].dtype
    return 4 if dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)) else \
        8 * dtype.itemsize


def check_every_weight(float_model: onnx.ModelProto, quant_path: Path,
                       matching: Matching | None = None) -> Matching:
    """Every quantized constant is matched, dequantized as numpy says, with a plausible SQNR;
    a weight matched by name or node has the float constant of that name as its original."""
    quant = onnx.load(quant_path)
    matching = matching or _match(float_model, quant_path)
    stored = ref.quantized_constants(quant)
    assert stored, "the model stores nothing quantized: the case tests nothing"
    assert matching.unmatched_weights == []
    by_stored = {m.weight.stored: m for m in matching.weights.values()}
    assert set(by_stored) == set(stored)
    floats = ref.constants(float_model)
    for name, match in by_stored.items():
        expected = ref.dequantize(quant, name)
        expected = expected.T if match.transposed else expected
        np.testing.assert_allclose(match.dequantized, expected.reshape(match.original.shape),
                                   rtol=1e-12, atol=1e-300, err_msg=name)
        if match.how in ("name", "node"):
            np.testing.assert_array_equal(match.original, floats[match.name], err_msg=name)
        db = ref.sqnr_db(match.original, match.dequantized)
        assert match.sqnr_db == pytest.approx(db, abs=1e-6)
        assert db > _min_db(_bits(quant, name)), (name, match.how, db)
    return matching


def qdq_pairs(quant: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """``{tensor before QuantizeLinear: QuantizeLinear}`` for every Q → DQ pair of activations."""
    values = ref.constants(quant)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in quant.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return {q.input[0]: q for q in quant.graph.node
            if q.op_type == "QuantizeLinear" and q.input[0] not in values
            and any(r.op_type == "DequantizeLinear" for r in readers.get(q.output[0], []))}


def check_activation_pairs(quant_path: Path, matching: Matching,
                           stands_for: dict[str, str]) -> None:
    """Each Q → DQ pair is matched to ``stands_for.get(pre, pre)``, with the Q's parameters."""
    quant = onnx.load(quant_path)
    values = ref.constants(quant)
    pairs = qdq_pairs(quant)
    assert pairs
    got = {m.tensor.pre.name: name for name, m in matching.activations.items()
           if m.tensor.pre is not None}
    assert got == {pre: stands_for.get(pre, pre) for pre in pairs}
    for pre, q in pairs.items():
        params = matching.activations[got[pre]].params
        assert float(params.scale) == float(values[q.input[1]])
        assert int(params.zero_point) == int(values[q.input[2]])
    assert matching.unmatched_activations == []


# -- 2. onnxquant static quantization --------------------------------------------------------
STATIC = {
    "per_tensor": {},
    "per_channel": {"per_channel": True},
    "uint16": {"activation_type": onnxquant.UINT16, "weight_type": onnxquant.INT8},
    "int16": {"activation_type": onnxquant.INT16, "weight_type": onnxquant.INT8},
    "qoperator": {"format": F.QOPERATOR},
}
STATIC_MODELS = ("cnn", "transformer_block", "matmul_chain")
STANDS_FOR = {
    "cnn": {"conv1_out": "relu1_out", "conv2_out": "clip1_out", "add_residual_out": "relu2_out",
            "logits_QuantizeLinear_Input": "logits"},
    "matmul_chain": {"add_0_out": "relu_0_out", "add_1_out": "relu_1_out",
                     "y_QuantizeLinear_Input": "y"},
    "transformer_block": {},
}


@pytest.fixture(scope="module")
def static_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("static")
    made = {}
    for model_name in STATIC_MODELS:
        model = getattr(zoo, model_name)()
        feeds = zoo.random_feeds(model, 4, seed=1)
        for config, options in STATIC.items():
            path = folder / f"{model_name}_{config}.onnx"
            onnxquant.quantize_static(model, path, feeds, onnxquant.StaticQuantConfig(
                bias_correction=False, **options))
            made[model_name, config] = (model, path)
    return made


@pytest.mark.parametrize("config", list(STATIC))
@pytest.mark.parametrize("model_name", STATIC_MODELS)
def test_static_weights(static_models: dict, model_name: str, config: str) -> None:
    check_every_weight(*static_models[model_name, config])


@pytest.mark.parametrize("config", [c for c in STATIC if c != "qoperator"])
@pytest.mark.parametrize("model_name", STATIC_MODELS)
def test_static_qdq_activations(static_models: dict, model_name: str, config: str) -> None:
    model, path = static_models[model_name, config]
    check_activation_pairs(path, _match(model, path), STANDS_FOR[model_name])


def _batchnorm_folded(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    v = ref.constants(model)
    factor = v["bn1_scale"].astype(np.float64) / np.sqrt(v["bn1_var"].astype(np.float64) + 1e-5)
    weight = v["conv1_W"] * factor[:, None, None, None]
    bias = (v["conv1_B"] - v["bn1_mean"]) * factor + v["bn1_bias"]
    return weight, bias


@pytest.mark.parametrize("config", list(STATIC))
def test_cnn_batchnorm_folding_and_fused_relu(static_models: dict, config: str) -> None:
    model, path = static_models["cnn", config]
    matching = _match(model, path)
    weight, bias = _batchnorm_folded(model)
    if config != "qoperator":  # QOperator keeps the 3-channel first Conv float
        assert matching.weights["conv1_bn_weight"].how == "folded"
        assert matching.weights["conv1_bn_bias"].how == "folded"
        np.testing.assert_allclose(matching.weights["conv1_bn_weight"].original, weight,
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(matching.weights["conv1_bn_bias"].original, bias,
                                   rtol=1e-5, atol=1e-7)
        assert matching.activations["relu1_out"].tensor.pre.name == "conv1_out"
    assert matching.activations["clip1_out"].tensor.value.name.startswith("conv2_out")
    layers = {layer.name: layer.reference for layer in matching.layers}
    assert layers["conv2"] == "clip1_out"
    assert layers["add_residual"] == "relu2_out"
    if config != "qoperator":
        assert layers["conv1"] == "relu1_out"


def test_qoperator_division_by_constant_matches_reciprocal(static_models: dict) -> None:
    """x / sqrt2 runs as QLinearMul(x, 1/sqrt2): the original is the reciprocal."""
    model, path = static_models["transformer_block", "qoperator"]
    match = _match(model, path).weights["sqrt2_reciprocal"]
    assert match.how == "reciprocal"
    assert match.weight.reader[0].op_type == "QLinearMul"
    sqrt2 = ref.constants(model)["sqrt2"]
    np.testing.assert_allclose(match.original, 1 / sqrt2.astype(np.float64), rtol=1e-7)
    assert match.sqnr_db > 30


def test_qoperator_quantized_tables(static_models: dict) -> None:
    """QOperator Gather/Slice read uint8 tables; their output's DequantizeLinear has the
    table's parameters."""
    model, path = static_models["transformer_block", "qoperator"]
    matching = _match(model, path)
    for name, reader in (("word_embeddings", "Gather"), ("position_embeddings", "Slice")):
        assert matching.weights[name].how == "name"
        assert matching.weights[name].weight.reader[0].op_type == reader


def test_qoperator_activations(static_models: dict) -> None:
    model, path = static_models["cnn", "qoperator"]
    matching = _match(model, path)
    assert matching.unmatched_activations == []
    by_value = {m.tensor.value.name: name for name, m in matching.activations.items()}
    assert by_value["relu1_out_quantized"] == "relu1_out"
    assert by_value["conv2_out_quantized"] == "clip1_out"
    assert by_value["add_residual_out_quantized"] == "relu2_out"
    assert by_value["logits_quantized"] == "logits"


# -- weight-only ----------------------------------------------------------------------------
WEIGHT_ONLY = {
    "nbits4_b32": dict(bits=4, block_size=32),
    "nbits4_sym_b16": dict(bits=4, block_size=16, symmetric=True),
    "nbits8_b32": dict(bits=8, block_size=32),
    "nbits4_channel": dict(bits=4, block_size=None),
    "nbits2_b32": dict(bits=2, block_size=32),
    "dq4_b32": dict(bits=4, block_size=32, format=F.QDQ),
    "dq4_sym_b16": dict(bits=4, block_size=16, symmetric=True, format=F.QDQ),
    "dq8_b64": dict(bits=8, block_size=64, format=F.QDQ),
    "dq4_channel": dict(bits=4, block_size=None, format=F.QDQ),
}


@pytest.fixture(scope="module")
def weight_only_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("weight_only")
    made = {}
    for model_name, model in (("matmul_chain", zoo.matmul_chain(dim=64)),
                              ("transformer_block", zoo.transformer_block())):
        for config, options in WEIGHT_ONLY.items():
            path = folder / f"{model_name}_{config}.onnx"
            onnxquant.quantize_weights(model, path, onnxquant.WeightOnlyConfig(**options))
            made[model_name, config] = (model, path)
    return made


@pytest.mark.parametrize("config", list(WEIGHT_ONLY))
@pytest.mark.parametrize("model_name", ["matmul_chain", "transformer_block"])
def test_weight_only(weight_only_models: dict, model_name: str, config: str) -> None:
    model, path = weight_only_models[model_name, config]
    matching = check_every_weight(model, path)
    expected_reader = "MatMul" if config.startswith("dq") else "MatMulNBits"
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"
               and n.input[1] in ref.constants(model)]
    assert {m.weight.reader[0].op_type for m in matching.weights.values()} == {expected_reader}
    assert len(matching.weights) == len(matmuls)
    assert {layer.name for layer in matching.layers} == set(matmuls)
    if config.startswith("dq"):
        quant = onnx.load(path)
        for dq in (n for n in quant.graph.node if n.op_type == "DequantizeLinear"):
            assert any(a.name == "block_size" for a in dq.attribute)


# -- dynamic ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dynamic_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("dynamic")
    made = {}
    for model_name in ("cnn", "matmul_chain", "transformer_block"):
        model = getattr(zoo, model_name)()
        for config, options in (("qdq", {"format": F.QDQ}),
                                ("qdq_per_channel", {"format": F.QDQ, "per_channel": True}),
                                ("qoperator", {})):
            path = folder / f"{model_name}_{config}.onnx"
            onnxquant.quantize_dynamic(model, path, onnxquant.DynamicQuantConfig(**options))
            made[model_name, config] = (model, path)
        # onnxruntime's optimizer fuses MatMulInteger + scaling into DynamicQuantizeMatMul /
        # MatMulIntegerToFloat: a model made by neither quantizer
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(folder / f"{model_name}_fused.onnx")
        ort.InferenceSession(str(folder / f"{model_name}_qoperator.onnx"), options,
                             providers=["CPUExecutionProvider"])
        made[model_name, "fused"] = (model, Path(options.optimized_model_filepath))
    return made


@pytest.mark.parametrize("config", ["qdq", "qdq_per_channel"])
@pytest.mark.parametrize("model_name", ["cnn", "matmul_chain", "transformer_block"])
def test_dynamic_qdq_weights(dynamic_models: dict, model_name: str, config: str) -> None:
    model, path = dynamic_models[model_name, config]
    matching = check_every_weight(model, path)
    if model_name == "cnn":
        assert matching.weights["conv1_bn_weight"].how == "folded"


@pytest.mark.parametrize("model_name", ["matmul_chain", "transformer_block"])
def test_fused_dynamic_weights(dynamic_models: dict, model_name: str) -> None:
    model, path = dynamic_models[model_name, "fused"]
    fused = {n.op_type for n in onnx.load(path).graph.node}
    assert "DynamicQuantizeMatMul" in fused
    if model_name == "transformer_block":
        assert "MatMulIntegerToFloat" in fused
    check_every_weight(model, path)


def test_dynamic_gather_table(dynamic_models: dict) -> None:
    """Dynamic QOperator Gather reads a uint8 table dequantized after the Gather."""
    model, path = dynamic_models["transformer_block", "qoperator"]
    matching = _match(model, path)
    match = matching.weights["word_embeddings"]
    assert match.weight.reader[0].op_type == "Gather"
    np.testing.assert_allclose(match.dequantized,
                               ref.dequantize(onnx.load(path), match.weight.stored), rtol=1e-12)
    assert match.sqnr_db > 30


@pytest.mark.parametrize("model_name", ["cnn", "matmul_chain", "transformer_block"])
def test_dynamic_qoperator_weights(dynamic_models: dict, model_name: str) -> None:
    """MatMulInteger/ConvInteger: the weight's scale is the constant a Mul multiplies the
    input's run-time scale by; Gather reads an 8-bit table dequantized after it."""
    model, path = dynamic_models[model_name, "qoperator"]
    matching = check_every_weight(model, path)
    readers = {m.weight.reader[0].op_type for m in matching.weights.values()}
    expected = {"cnn": {"ConvInteger", "MatMulInteger"}, "matmul_chain": {"MatMulInteger"},
                "transformer_block": {"MatMulInteger", "Gather"}}[model_name]
    assert readers == expected


# -- 3. a model made by neither tool ----------------------------------------------------------
def _quantize_blocks(w: np.ndarray, block: int, dtype: type, qmin: int, qmax: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blocks along axis 0: (q, scale, zero point, dequantized)."""
    blocks = w.reshape(w.shape[0] // block, block, -1)
    low = np.minimum(blocks.min(axis=1), 0)
    high = np.maximum(blocks.max(axis=1), 0)
    scale = ((high - low) / (qmax - qmin)).astype(np.float32)
    zero = np.clip(np.rint(qmin - low / scale), qmin, qmax).astype(np.int64)
    s, z = np.repeat(scale, block, axis=0), np.repeat(zero, block, axis=0)
    q = np.clip(np.rint(w / s) + z, qmin, qmax).astype(np.int64)
    return q.astype(dtype), scale, zero.astype(dtype), (q - z) * s.astype(np.float64)


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Float: x -> conv -> relu -> flatten -> dense (MatMul) -> proj (MatMul) -> out.
    Quantized by hand at opset 21 with arbitrary names: per-channel int8 conv weight, int32
    bias, block-wise int4 dense kernel under a renamed node, block-wise uint8 proj kernel, and
    Q/DQ pairs on x, the Relu output and the dense output."""
    rng = np.random.default_rng(7)
    conv_w = (rng.standard_normal((8, 4, 3, 3)) * 0.2).astype(np.float32)
    conv_b = (rng.standard_normal(8) * 0.1).astype(np.float32)
    dense = (rng.standard_normal((512, 64)) / np.sqrt(512)).astype(np.float32)
    proj = (rng.standard_normal((64, 16)) / 8).astype(np.float32)
    value = helper.make_tensor_value_info
    float_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv_weight_fp", "conv_bias_fp"], ["conv_y"],
                          name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv_y"], ["relu_y"], name="relu"),
         helper.make_node("Flatten", ["relu_y"], ["flat"], name="flatten"),
         helper.make_node("MatMul", ["flat", "dense_kernel"], ["dense_y"], name="dense"),
         helper.make_node("MatMul", ["dense_y", "proj_kernel"], ["out"], name="proj")],
        "float", [value("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [value("out", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(conv_w, "conv_weight_fp"),
         numpy_helper.from_array(conv_b, "conv_bias_fp"),
         numpy_helper.from_array(dense, "dense_kernel"),
         numpy_helper.from_array(proj, "proj_kernel")])
    float_model = helper.make_model(float_graph, opset_imports=[helper.make_opsetid("", 21)],
                                     ir_version=10)

    x_scale, relu_scale, dense_scale = np.float32(8 / 255), np.float32(4 / 255), \
        np.float32(2 / 255)
    w_scale = (np.abs(conv_w).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.rint(conv_w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    b_scale = (x_scale * w_scale).astype(np.float32)
    b_q = np.rint(conv_b / b_scale).astype(np.int32)
    d_q, d_s, d_z, d_deq = _quantize_blocks(dense, 32, ml_dtypes.int4, -8, 7)
    p_q, p_s, p_z, p_deq = _quantize_blocks(proj, 16, np.uint8, 0, 255)
    inits = {
        "w_int8_blob": w_q, "s_w": w_scale, "b_i32_stuff": b_q, "s_b": b_scale,
        "blk4": d_q, "blk4_s": d_s, "blk4_z": d_z, "u8blk": p_q, "u8blk_s": p_s,
        "u8blk_z": p_z, "sa0": x_scale, "za0": np.uint8(128), "sa1": relu_scale,
        "za1": np.uint8(0), "sa2": dense_scale, "za2": np.uint8(128),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sa0", "za0"], ["in_u8"], name="qa0"),
        helper.make_node("DequantizeLinear", ["in_u8", "sa0", "za0"], ["in_f"], name="dqa0"),
        helper.make_node("DequantizeLinear", ["w_int8_blob", "s_w"], ["w_f"], name="n1",
                         axis=0),
        helper.make_node("DequantizeLinear", ["b_i32_stuff", "s_b"], ["b_f"], name="n2",
                         axis=0),
        helper.make_node("Conv", ["in_f", "w_f", "b_f"], ["c_out"], name="conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c_out"], ["r_out"], name="act_7"),
        helper.make_node("QuantizeLinear", ["r_out", "sa1", "za1"], ["t17_u8"], name="qq1"),
        helper.make_node("DequantizeLinear", ["t17_u8", "sa1", "za1"], ["t17_f"], name="dd1"),
        helper.make_node("Flatten", ["t17_f"], ["fl"], name="flatten"),
        helper.make_node("DequantizeLinear", ["blk4", "blk4_s", "blk4_z"], ["blk4_f"],
                         name="n3", axis=0, block_size=32),
        helper.make_node("MatMul", ["fl", "blk4_f"], ["m1"], name="mm_x"),
        helper.make_node("QuantizeLinear", ["m1", "sa2", "za2"], ["zz_u8"], name="zz_q"),
        helper.make_node("DequantizeLinear", ["zz_u8", "sa2", "za2"], ["zz_f"], name="zz_dq"),
        helper.make_node("DequantizeLinear", ["u8blk", "u8blk_s", "u8blk_z"], ["u8blk_f"],
                         name="n4", axis=0, block_size=16),
        helper.make_node("MatMul", ["zz_f", "u8blk_f"], ["out"], name="proj"),
    ]
    quant_graph = helper.make_graph(
        nodes, "hand_made", [value("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [value("out", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    quant_model = helper.make_model(quant_graph, opset_imports=[helper.make_opsetid("", 21)],
                                    ir_version=10)
    onnx.checker.check_model(quant_model, full_check=True)
    folder = tmp_path_factory.mktemp("hand_made")
    onnx.save(float_model, folder / "float.onnx")
    onnx.save(quant_model, folder / "quant.onnx")
    return {"float": float_model, "path": folder / "quant.onnx", "folder": folder,
            "expected": {"w_int8_blob": ("conv_weight_fp", "node",
                                         w_q * w_scale[:, None, None, None].astype(np.float64)),
                         "b_i32_stuff": ("conv_bias_fp", "node", b_q * b_scale.astype(np.float64)),
                         "blk4": ("dense_kernel", "value", d_deq),
                         "u8blk": ("proj_kernel", "node", p_deq)}}


def test_hand_made_weights(hand_made: dict) -> None:
    matching = check_every_weight(hand_made["float"], hand_made["path"])
    by_stored = {m.weight.stored: m for m in matching.weights.values()}
    for stored, (name, how, dequantized) in hand_made["expected"].items():
        match = by_stored[stored]
        assert (match.name, match.how) == (name, how), stored
        assert not match.transposed
        np.testing.assert_allclose(match.dequantized, dequantized, rtol=1e-12)
    assert by_stored["blk4"].weight.params.block_size == 32
    assert by_stored["blk4"].weight.scheme == "int4 blocks of 32 on axis 0"


def test_hand_made_activations(hand_made: dict) -> None:
    matching = _match(hand_made["float"], hand_made["path"])
    check_activation_pairs(hand_made["path"], matching,
                           {"r_out": "relu_y", "m1": "dense_y"})
    layers = {layer.layer.node.name: layer.reference for layer in matching.layers}
    assert layers["conv"] == "conv_y"  # the Relu is its own node here
    assert layers["proj"] == "out"


def test_hand_made_through_ort_compatible_api(hand_made: dict) -> None:
    from onnxquant.ort import qdq_loss_debug as ours

    folder = hand_made["folder"]
    weights = ours.create_weight_matching(folder / "float.onnx", hand_made["path"])
    assert set(weights) == {"conv_weight_fp", "conv_bias_fp", "dense_kernel", "proj_kernel"}
    errors = ours.compute_weight_error(weights)
    assert errors["dense_kernel"] > 15 and errors["conv_weight_fp"] > 30
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8, 8)).astype(np.float32)}
             for i in range(2)]
    ours.modify_model_output_intermediate_tensors(hand_made["path"], folder / "aug_q.onnx")
    ours.modify_model_output_intermediate_tensors(folder / "float.onnx", folder / "aug_f.onnx")
    matched = ours.create_activation_matching(
        ours.collect_activations(folder / "aug_q.onnx", feeds),
        ours.collect_activations(folder / "aug_f.onnx", feeds))
    # The activation stage has no float model: pairs are found by structure but keyed, as in
    # onnxruntime, by the tensor before the QuantizeLinear, so float values are attached only
    # where the float model uses the same name (structural names: match_models / compare).
    assert set(matched) == {"x", "r_out", "m1"}
    assert [name for name, m in matched.items() if "float" in m] == ["x"]


@pytest.mark.parametrize("dq_axis", [2, -1])
def test_hand_made_gather_table_per_axis(tmp_path: Path, dq_axis: int) -> None:
    """A per-channel int8 embedding table read by Gather (indices of rank 2) and dequantized
    after it on the hidden axis, given from the start or from the end of the output."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((10, 6)).astype(np.float32)
    scale = (np.abs(table).max(axis=0) / 127).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 6])
    float_model = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["emb_table", "ids"], ["out"], name="embed")],
        "float", [ids], [out], [numpy_helper.from_array(table, "emb_table")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    quant_model = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["emb_q8", "ids"], ["rows"], name="embed"),
         helper.make_node("DequantizeLinear", ["rows", "emb_s", "emb_z"], ["out"], name="dq",
                          axis=dq_axis)],
        "quant", [ids], [out],
        [numpy_helper.from_array(q, "emb_q8"), numpy_helper.from_array(scale, "emb_s"),
         numpy_helper.from_array(np.zeros(6, np.int8), "emb_z")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(quant_model, tmp_path / "quant.onnx")
    matching = _match(float_model, tmp_path / "quant.onnx")
    match = matching.weights["emb_table"]
    assert (match.how, match.weight.stored, match.weight.params.axis) == ("node", "emb_q8", 1)
    np.testing.assert_allclose(match.dequantized, q * scale.astype(np.float64), rtol=1e-12)
    assert match.sqnr_db > 30
