"""Transformer fusion with onnxruntime's transformer optimizer: a decomposed BERT attention
block built from MatMul/Softmax becomes Attention (the head count read from the graph), the
function is unchanged, and dynamic quantization then gives QAttention with every MatMul
integer."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant.core.errors import QuantizationError
from onnxquant.preprocess.transformers import detect_attention_shape, fuse_transformer

HEADS, SIZE = 4, 8
HIDDEN = HEADS * SIZE


def _bert_layer(reshape_heads: int = HEADS) -> onnx.ModelProto:
    """LayerNorm -> Q/K/V projections -> scaled dot-product softmax attention -> output
    projection -> residual Add -> LayerNorm -> feed-forward MatMul, as a BERT export has it."""
    rng = np.random.default_rng(0)
    inits: dict[str, np.ndarray] = {
        "ln_scale": np.ones(HIDDEN, np.float32), "ln_bias": np.zeros(HIDDEN, np.float32),
        "heads_shape": np.array([0, 0, reshape_heads, SIZE], np.int64),
        "merge_shape": np.array([0, 0, HIDDEN], np.int64),
        "scale": np.array(np.sqrt(SIZE), np.float32),
        "ff": rng.normal(0, 0.2, (HIDDEN, HIDDEN)).astype(np.float32)}
    for name in ("q", "k", "v", "o"):
        inits[f"w{name}"] = rng.normal(0, 0.2, (HIDDEN, HIDDEN)).astype(np.float32)
        inits[f"b{name}"] = rng.normal(0, 0.05, HIDDEN).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["r"],
                              name="ln0", axis=-1, epsilon=1e-5)]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            helper.make_node("MatMul", ["r", f"w{name}"], [f"{name}_mm"], name=f"{name}_proj"),
            helper.make_node("Add", [f"{name}_mm", f"b{name}"], [f"{name}_add"]),
            helper.make_node("Reshape", [f"{name}_add", "heads_shape"], [f"{name}_heads"]),
            helper.make_node("Transpose", [f"{name}_heads"], [f"{name}_t"], perm=perm)]
    nodes += [
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]),
        helper.make_node("Div", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge_shape"], ["merged"]),
        helper.make_node("MatMul", ["merged", "wo"], ["o_mm"], name="o_proj"),
        helper.make_node("Add", ["o_mm", "bo"], ["o_add"]),
        helper.make_node("Add", ["o_add", "r"], ["residual"]),
        helper.make_node("LayerNormalization", ["residual", "ln_scale", "ln_bias"], ["ln1_out"],
                         name="ln1", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["ln1_out", "ff"], ["y"], name="ff_proj")]
    graph = helper.make_graph(
        nodes, "bert_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           ["B", "S", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", HIDDEN])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_the_head_count_is_read_from_the_graph():
    assert detect_attention_shape(_bert_layer()) == (HEADS, HIDDEN)
    assert detect_attention_shape(_bert_layer(reshape_heads=-1)) == (HEADS, HIDDEN)


def test_a_decomposed_attention_block_fuses_and_keeps_its_function():
    model = _bert_layer(reshape_heads=-1)  # heads implicit: the optimizer alone cannot fuse
    fused, counts = fuse_transformer(model, "bert")
    assert counts.get("Attention") == 1 and counts.get("SkipLayerNormalization") == 1
    assert "Softmax" not in {n.op_type for n in fused.graph.node}
    x = np.random.default_rng(1).normal(size=(2, 5, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(_run(fused, x), _run(model, x), rtol=1e-3, atol=1e-4)


def test_dynamic_quantization_after_fusion_gives_qattention(tmp_path):
    fused, _ = fuse_transformer(_bert_layer(), "bert")
    result = onnxquant.quantize_dynamic(fused, tmp_path / "q.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node)
    assert ops["QAttention"] == 1 and ops["Attention"] == 0
    assert ops["MatMul"] == 0  # output projection and feed-forward are integer too
    assert all(d.action == "quantized" for d in result.decisions
               if d.op_type in ("MatMul", "Attention")), result.decisions


def test_an_unknown_model_type_is_refused():
    with pytest.raises(QuantizationError, match="unknown model type 'bret'.*bert"):
        fuse_transformer(_bert_layer(), "bret")


def test_preprocess_with_a_model_type_fuses(tmp_path):
    source = tmp_path / "layer.onnx"
    onnx.save(_bert_layer(reshape_heads=-1), source)
    result = onnxquant.preprocess(source, tmp_path / "fused.onnx",
                                  onnxquant.PreprocessConfig(model_type="bert"))
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "fused.onnx").graph.node)
    assert ops["Attention"] == 1 and ops["Softmax"] == 0
    assert "1 Attention" in result.summary()
    x = np.random.default_rng(2).normal(size=(1, 7, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(_run(onnx.load(tmp_path / "fused.onnx"), x),
                               _run(_bert_layer(), x), rtol=1e-3, atol=1e-4)


def test_preprocess_cli_model_type(tmp_path):
    import subprocess
    import sys

    source = tmp_path / "layer.onnx"
    onnx.save(_bert_layer(), source)
    run = subprocess.run([sys.executable, "-m", "onnxquant", "preprocess", str(source), "-o",
                          str(tmp_path / "fused.onnx"), "--model-type", "bert"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "Attention" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "onnxquant", "preprocess", str(source), "-o",
                          str(tmp_path / "x.onnx"), "--model-type", "bret"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "bert" in bad.stderr
    with pytest.raises(QuantizationError, match="unknown model type"):
        onnxquant.PreprocessConfig(model_type="bret")
