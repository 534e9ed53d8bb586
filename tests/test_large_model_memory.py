"""Memory of models with external data: one-file outputs are streamed one tensor at a time,
weights are read without keeping whole-file memory maps, and weight-only quantization never
holds the model's weights at once (issue 14, "Large models")."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant.core import model_io
from onnxquant.core.external_data import read_array

HIDDEN = 512
VOCAB = 12288  # a 24 MB float Gather table
LAYERS = 6  # six 1 MB MatMul weights


def _llm_like(folder, *, hidden: int = HIDDEN, vocab: int = VOCAB, layers: int = LAYERS):
    """An embedding Gather and a chain of MatMul + Relu, every weight in external data."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(vocab, hidden)).astype(np.float32),
                                     "embed")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h0"], name="gather")]
    for i in range(layers):
        w = rng.normal(0, hidden ** -0.5, (hidden, hidden)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"], name=f"relu{i}"))
    nodes.append(helper.make_node("Identity", [f"h{layers}"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "llm_like", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "float.onnx"
    onnx.save(model, path, save_as_external_data=True, location="float.onnx.data",
              size_threshold=1024)
    return path


def _feed() -> dict[str, np.ndarray]:
    return {"ids": np.array([[1, 5, 77, 200]], dtype=np.int64)}


def _run(path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, _feed())[0]


def test_read_array_reads_the_tensor_without_a_memory_map(tmp_path):
    model = ir.load(_llm_like(tmp_path, vocab=64, layers=2))
    tensor = model.graph.initializers["w1"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and tensor.offset
    data = read_array(tensor)
    assert tensor.raw is None  # nothing mapped, nothing to release
    expected = numpy_helper.to_array(onnx.load(tmp_path / "float.onnx").graph.initializer[2])
    np.testing.assert_array_equal(data, expected)


def test_load_external_tensors_closes_the_maps(tmp_path):
    model = ir.load(_llm_like(tmp_path, vocab=64, layers=2))
    originals = [v.const_value for v in model.graph.initializers.values()]
    assert model_io.load_external_tensors(model) == 3
    assert all(isinstance(t, ir.ExternalTensor) and t.raw is None for t in originals)
    assert not any(isinstance(v.const_value, ir.ExternalTensor)
                   for v in model.graph.initializers.values())


def test_single_file_output_is_streamed_and_equals_the_model(tmp_path):
    source = _llm_like(tmp_path, vocab=1024, layers=3)
    model = ir.load(source)
    lazy = ir.LazyTensor(lambda: ir.tensor(np.full((HIDDEN, HIDDEN), 0.5, np.float32)),
                         dtype=ir.DataType.FLOAT, shape=ir.Shape([HIDDEN, HIDDEN]))
    model.graph.initializers["w0"].const_value = lazy  # quantizers hand over lazy tensors
    model.graph.initializers["w2"].const_value = ir.tensor(
        np.full((HIDDEN, HIDDEN), 0.25, np.float32), name="w2")  # and in-memory ones
    out = tmp_path / "one.onnx"
    written = model_io.save_model(model, out, external_data=False)
    assert written == [out] and not (tmp_path / "one.onnx.data").exists()
    onnx.checker.check_model(str(out))
    loaded = onnx.load(out)
    got = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    want = {t.name: numpy_helper.to_array(t)
            for t in onnx.load(source).graph.initializer}
    want["w0"] = np.full((HIDDEN, HIDDEN), 0.5, np.float32)
    want["w2"] = np.full((HIDDEN, HIDDEN), 0.25, np.float32)
    assert got.keys() == want.keys()
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    assert [n.name for n in loaded.graph.node] == [n.name for n in model.graph]
    # the model object is unchanged: its tensors are the same objects again
    assert isinstance(model.graph.initializers["w1"].const_value, ir.ExternalTensor)
    assert np.isfinite(_run(out)).all()


def test_single_file_output_holds_one_tensor_at_a_time(tmp_path):
    model = ir.load(_llm_like(tmp_path))  # 24 MB table + 6 x 1 MB weights, all external
    total = model_io.model_size_bytes(model)
    tracemalloc.start()
    try:
        model_io.save_model(model, tmp_path / "one.onnx", external_data=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Building the ModelProto in memory held every tensor twice (proto + serialised bytes).
    assert peak < 0.1 * total, (peak, total)
    np.testing.assert_allclose(_run(tmp_path / "one.onnx"), _run(tmp_path / "float.onnx"))


def test_weight_only_never_holds_the_weights_at_once(tmp_path):
    source = _llm_like(tmp_path)
    float_bytes = sum(p.stat().st_size for p in tmp_path.iterdir())
    out = tmp_path / "w4.onnx"
    tracemalloc.start()
    try:
        result = onnxquant.quantize_weights(
            source, out, onnxquant.WeightOnlyConfig(bits=4, block_size=32, evaluate=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.output_files == [out]  # one file: the float table stays float in it
    assert peak < 0.25 * float_bytes, (peak, float_bytes)
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("MatMulNBits") == LAYERS and "MatMul" not in ops
    float_y, quant_y = _run(source), _run(out)
    cosine = float(np.sum(float_y * quant_y)
                   / (np.linalg.norm(float_y) * np.linalg.norm(quant_y)))
    assert cosine > 0.98


@pytest.mark.parametrize("mode", ["dynamic", "static_qdq", "static_qop"])
def test_weights_are_read_without_whole_file_maps(tmp_path, monkeypatch, mode):
    """Every MatMul weight is read with read_array (a positioned file read), never through
    ExternalTensor.numpy(), which maps the whole data file per tensor and keeps the map."""
    source = _llm_like(tmp_path, vocab=256, hidden=64, layers=3)
    mapped: list[str] = []
    original = ir.ExternalTensor.numpy

    def numpy(self):
        mapped.append(str(self.name))
        return original(self)

    monkeypatch.setattr(ir.ExternalTensor, "numpy", numpy)
    out = tmp_path / f"{mode}.onnx"
    if mode == "dynamic":
        onnxquant.quantize_dynamic(source, out, onnxquant.DynamicQuantConfig(evaluate=False))
    else:
        fmt = onnxquant.QuantFormat.QDQ if mode == "static_qdq" \
            else onnxquant.QuantFormat.QOPERATOR
        feeds = [{"ids": np.array([[i, i + 7, 200]], dtype=np.int64)} for i in range(4)]
        onnxquant.quantize_static(source, out, feeds,
                                  onnxquant.StaticQuantConfig(format=fmt, evaluate=False))
    assert not {"w0", "w1", "w2"} & set(mapped), mapped
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "DequantizeLinear"}
    assert np.isfinite(_run(out)).all()
