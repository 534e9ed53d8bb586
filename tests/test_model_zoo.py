"""Checks that the test models in model_zoo are valid, run, and compute what they claim."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import model_zoo as zoo
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

# builder -> expected output shapes for the default random_feeds (batch 2, other dims 8)
BUILDERS: dict[str, tuple[Callable[..., onnx.ModelProto], list[tuple[int, ...]]]] = {
    "cnn": (zoo.cnn, [(2, 10)]),
    "conv_transpose": (zoo.conv_transpose, [(2, 6, 8, 8)]),
    "transformer_block": (zoo.transformer_block, [(2, 8, 32)]),
    "if_subgraph_model": (zoo.if_subgraph_model, [(1, 4, 16)]),
    "loop_model": (zoo.loop_model, [(1, 8)]),
    "constant_weights_cnn": (zoo.constant_weights_cnn, [(2, 10)]),
    "matmul_chain": (zoo.matmul_chain, [(2, 16)]),
    "old_opset_model": (zoo.old_opset_model, [(2, 4, 8, 8)]),
    "model_with_shared_weight": (zoo.model_with_shared_weight, [(2, 4, 8, 8)]),
}


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for graph in _graphs(model.graph) for node in graph.node]


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant value in the model and its subgraphs, by name."""
    tensors = {}
    for graph in _graphs(model.graph):
        for init in graph.initializer:
            tensors[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type == "Constant":
                tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return tensors


def _conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference Conv1d (cross-correlation), kernel 3, pad 1."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1)))
    windows = np.stack([padded[:, :, i:i + 3] for i in range(x.shape[2])], axis=2)
    return np.einsum("nclk,ock->nol", windows, w) + b[None, :, None]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_is_valid_and_runs(name: str) -> None:
    builder, shapes = BUILDERS[name]
    model = builder()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == zoo.IR_VERSION
    assert model.doc_string.strip()
    names = [node.name for node in _nodes(model)]
    assert all(names) and len(names) == len(set(names))

    outputs = zoo.run(model, zoo.random_feeds(model, 2))
    assert len(outputs) == 2
    for result in outputs:
        assert [o.shape for o in result] == shapes
        for out in result:
            assert out.dtype == np.float32
            assert np.isfinite(out).all()
            assert 0.0 < np.abs(out).max() < 50.0  # O(1) activations, not all zero
    assert not np.array_equal(outputs[0][0], outputs[1][0])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_is_deterministic_and_seeded(name: str) -> None:
    builder, _ = BUILDERS[name]
    assert builder(seed=3).SerializeToString() == builder(seed=3).SerializeToString()
    first, second = _tensors(builder(seed=0)), _tensors(builder(seed=1))
    weights = [k for k, v in first.items()
               if v.dtype == np.float32 and v.ndim >= 1 and k != "resize_scales"]
    assert weights
    for key in weights:
        assert not np.array_equal(first[key], second[key]), key


def test_cnn_structure_and_static_batch() -> None:
    model = zoo.cnn(batch=4)
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["Conv", "BatchNormalization", "Relu", "MaxPool", "Conv", "Clip",
                   "AveragePool", "Conv", "Add", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    add = next(node for node in model.graph.node if node.name == "add_residual")
    assert list(add.input) == ["conv3_out", "avgpool1_out"]
    gemm = model.graph.node[-1]
    assert [a.i for a in gemm.attribute if a.name == "transB"] == [1]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    (out,) = zoo.run(model, zoo.random_feeds(model, 1))[0]
    assert out.shape == (4, 10)


def test_transformer_accepts_any_length_up_to_16() -> None:
    model = zoo.transformer_block()
    for seq in (1, 5, 16):
        feeds = zoo.random_feeds(model, 1, dims={"B": 3, "S": seq})
        (out,) = zoo.run(model, feeds)[0]
        assert out.shape == (3, seq, 32)
        assert np.isfinite(out).all()


def test_transformer_mask_hides_padded_tokens() -> None:
    model = zoo.transformer_block()
    ids = np.array([[3, 7, 11, 19, 23, 29]], np.int64)
    mask = np.array([[1, 1, 1, 1, 0, 0]], np.int64)
    changed = ids.copy()
    changed[0, 4:] = [41, 42]
    out_a, out_b = (r[0] for r in zoo.run(model, [
        {"input_ids": ids, "attention_mask": mask},
        {"input_ids": changed, "attention_mask": mask},
    ]))
    np.testing.assert_allclose(out_a[:, :4], out_b[:, :4], rtol=0, atol=1e-5)
    assert not np.allclose(out_a[:, 4:], out_b[:, 4:])
    # LayerNormalization at the end: each position has mean ~ mean(beta), std ~ O(1)
    assert 0.5 < out_a.std(axis=-1).min() and out_a.std(axis=-1).max() < 2.0


def test_if_model_matches_numpy_per_branch() -> None:
    model = zoo.if_subgraph_model()
    t = _tensors(model)
    assert {"then_conv_W", "inner_conv_W", "else_conv_W"} <= set(t)
    then_branch = onnx.helper.get_node_attr_value(model.graph.node[0], "then_branch")
    assert {i.name for i in then_branch.initializer} == {"then_conv_W", "then_conv_B"}
    assert [n.op_type for n in then_branch.node].count("If") == 1

    x = np.random.default_rng(5).standard_normal((1, 4, 16)).astype(np.float32)
    out_true, out_false = (r[0] for r in zoo.run(model, [
        {"x": x, "flag": np.array(True)}, {"x": x, "flag": np.array(False)},
    ]))
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    expect_true = _conv1d(relu(_conv1d(x, t["then_conv_W"], t["then_conv_B"])),
                          t["inner_conv_W"], t["inner_conv_B"])
    expect_false = relu(_conv1d(x, t["else_conv_W"], t["else_conv_B"]))
    np.testing.assert_allclose(out_true, expect_true, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_false, expect_false, rtol=1e-5, atol=1e-5)
    assert np.abs(out_true - out_false).max() > 0.1


def test_loop_runs_three_iterations() -> None:
    model = zoo.loop_model()
    weight = _tensors(model)["body_W"]
    assert weight.shape == (8, 8)
    body = onnx.helper.get_node_attr_value(model.graph.node[0], "body")
    assert not body.initializer  # the weight is a Constant node
    feeds = zoo.random_feeds(model, 3, seed=2)
    for feed, (out,) in zip(feeds, zoo.run(model, feeds), strict=True):
        states = [feed["x"].astype(np.float64)]
        for _ in range(4):
            states.append(np.tanh(states[-1] @ weight))
        np.testing.assert_allclose(out, states[3], rtol=1e-5, atol=1e-6)
        assert np.abs(out - states[2]).max() > 1e-3
        assert np.abs(out - states[4]).max() > 1e-3


def test_constant_weights_cnn_has_no_initializers() -> None:
    model = zoo.constant_weights_cnn()
    assert model.opset_import[0].version == 13
    assert len(model.graph.initializer) == 0
    constants = [n for n in model.graph.node if n.op_type == "Constant"]
    assert len(constants) == 6
    assert {n.output[0] for n in constants} == {
        "conv1_W", "conv1_B", "conv2_W", "conv2_B", "fc_W", "fc_B"}


def test_matmul_chain_matches_numpy() -> None:
    model = zoo.matmul_chain(n=5, dim=12)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Relu"] * 5
    t = _tensors(model)
    feeds = zoo.random_feeds(model, 1, dims={"B": 7})
    (out,) = zoo.run(model, feeds)[0]
    ref = feeds[0]["x"]
    for i in range(5):
        ref = np.maximum(ref @ t[f"fc_{i}_W"] + t[f"fc_{i}_B"], 0.0)
    assert out.shape == (7, 12)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_old_opset_model_is_opset_9() -> None:
    model = zoo.old_opset_model()
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 9)]


def test_shared_weight_is_one_initializer() -> None:
    model = zoo.model_with_shared_weight()
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [n.input[1] for n in convs] == ["shared_W", "shared_W"]
    assert [i.name for i in model.graph.initializer].count("shared_W") == 1
    assert convs[0].input[2] != convs[1].input[2]


def test_random_feeds_shapes_and_ranges() -> None:
    model = zoo.transformer_block(vocab=37)
    feeds = zoo.random_feeds(model, 20, seed=1, dims={"B": 4, "S": 10})
    assert len(feeds) == 20
    ids = np.stack([f["input_ids"] for f in feeds])
    assert ids.dtype == np.int64 and ids.shape == (20, 4, 10)
    assert ids.min() >= 0 and ids.max() == 36  # the vocab comes from the Gather table
    for feed in feeds:
        mask = feed["attention_mask"]
        assert mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1}
        assert mask[0].all()
        for row in mask[1:]:
            zeros = int((row == 0).sum())
            assert 1 <= zeros <= 5 and not row[10 - zeros:].any()
    again = zoo.random_feeds(model, 20, seed=1, dims={"B": 4, "S": 10})
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(feeds, again,
                                                                               strict=True))
    other = zoo.random_feeds(model, 1, seed=2, dims={"B": 4, "S": 10})
    assert not np.array_equal(other[0]["input_ids"], feeds[0]["input_ids"])


def test_random_feeds_float_and_bool() -> None:
    feeds = zoo.random_feeds(zoo.if_subgraph_model(), 40)
    flags = {bool(f["flag"]) for f in feeds}
    assert flags == {True, False}
    assert feeds[0]["flag"].shape == () and feeds[0]["flag"].dtype == np.bool_
    x = np.stack([f["x"] for f in feeds])
    assert x.dtype == np.float32 and abs(x.mean()) < 0.1 and 0.9 < x.std() < 1.1
    (cnn_feed,) = zoo.random_feeds(zoo.cnn(), 1)
    assert cnn_feed["image"].shape == (2, 3, 32, 32)  # defaults: batch 2


def test_run_accepts_a_path(tmp_path) -> None:
    model = zoo.matmul_chain()
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    feeds = zoo.random_feeds(model, 2)
    from_path, from_proto = zoo.run(str(path), feeds), zoo.run(model, feeds)
    for a, b in zip(from_path, from_proto, strict=True):
        np.testing.assert_array_equal(a[0], b[0])


def test_sqnr_db() -> None:
    ref = np.ones(4, np.float32)
    assert zoo.sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)
    assert zoo.sqnr_db(ref, ref) == math.inf
    assert zoo.sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert zoo.sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert zoo.sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(
        10 * math.log10(25 / 0.25))
    with pytest.raises(ValueError, match="shape"):
        zoo.sqnr_db(np.ones(3), np.ones(4))
