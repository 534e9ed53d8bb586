"""Models with a planted quantization difficulty, for the accuracy-target tests: each float
model is built so that one specific fix (a 16-bit tensor or a float layer, per-channel weights,
SmoothQuant, cross-layer equalization) is what 8-bit quantization needs."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

DIM = 16

def _mm_model(nodes, inits, inp="x", out="z", dim=DIM):
    graph = helper.make_graph(nodes, "planted",
        [helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(w, n) for n, w in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

def weights(seed, count, shape=(DIM, DIM)):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.3, shape).astype(np.float32) for _ in range(count)]

def input_outlier():
    """x's channel 0 is 500x the others (see :func:`outlier_feeds`) and W1's row 0 is /500: the
    layer reading x (mm1) needs more than 8 bits — x is a graph input, so no correction can
    move the scale upstream, and W1's small row vanishes on a per-tensor grid."""
    w1, w2 = weights(0, 2)
    w1[0, :] /= 500.0
    return _mm_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                      helper.make_node("Relu", ["h"], ["r"], name="relu"),
                      helper.make_node("MatMul", ["r", "w2"], ["z"], name="mm2")],
                     {"w1": w1, "w2": w2})

def outlier_feeds(count, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.normal(size=(4, DIM)).astype(np.float32)
        x[:, 0] *= 500.0
        out.append({"x": x})
    return out

def feeds(count, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(4, DIM)).astype(np.float32)} for _ in range(count)]

def hidden_outlier():
    """h = x @ W1 has channel 0 500x the others (W1's column 0 scaled up, W2's row 0 down)."""
    w1, w2, w3 = weights(0, 3)
    w1[:, 0] *= 500.0
    w2[0, :] /= 500.0
    return _mm_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                      helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
                      helper.make_node("MatMul", ["y", "w3"], ["z"], name="mm3")],
                     {"w1": w1, "w2": w2, "w3": w3})

def badly_scaled_weight():
    """mm2's weight has column 0 300x the others (mm3 scales it back): a per-tensor grid for
    it wipes out every other column."""
    w1, w2, w3 = weights(0, 3)
    w2[:, 0] *= 300.0
    w3[0, :] /= 300.0
    return _mm_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                      helper.make_node("Relu", ["h"], ["r"], name="relu"),
                      helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
                      helper.make_node("MatMul", ["y", "w3"], ["z"], name="mm3")],
                     {"w1": w1, "w2": w2, "w3": w3})

def unequal_cnn():
    """Conv(3->8) -> Relu -> Conv(8->8, 1x1) -> Conv: conv1's output channels span 100x
    (W1 scaled per channel, W2's input channels scaled back): the float model is unchanged."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32)
    k = np.geomspace(1, 100, 8).astype(np.float32)
    w1 *= k[:, None, None, None]
    w2 /= k[None, :, None, None]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
         helper.make_node("Conv", ["y", "w3"], ["z"], name="conv3", pads=[1, 1, 1, 1])],
        "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(
            (0.1 * k).astype(np.float32), "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w3, "w3")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

def image_feeds(count, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(count)]
