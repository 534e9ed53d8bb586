"""Model I/O: external data in and out, the 2 GB switch, atomic saves, input never modified."""

from __future__ import annotations

import model_zoo as zoo
import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxquant
from onnxquant.core import front_door, model_io


def _save_external(model: onnx.ModelProto, path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)


def test_external_data_input_and_output(tmp_path):
    model = zoo.matmul_chain(n=3, dim=64)
    src = tmp_path / "src" / "float.onnx"
    src.parent.mkdir()
    _save_external(zoo.matmul_chain(n=3, dim=64), src)  # onnx.save mutates its argument
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    out = tmp_path / "q.onnx"
    calib = zoo.random_feeds(model, 8, seed=1)
    result = onnxquant.quantize_static(src, out, calib,
                                       onnxquant.StaticQuantConfig(external_data=True))
    assert [p.name for p in result.output_files] == ["q.onnx", "q.onnx.data"]
    data_file = tmp_path / "q.onnx.data"
    assert data_file.stat().st_size > 0
    loaded = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in loaded.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "large tensors should live in the external data file"
    feeds = zoo.random_feeds(model, 2, seed=2)
    ref, got = zoo.run(model, feeds), zoo.run(str(out), feeds)
    assert zoo.sqnr_db(ref[0][0], got[0][0]) > 20
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before


def test_large_models_switch_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1 << 26)  # pretend 64 MB is the limit
    model = ir.from_proto(zoo.matmul_chain(n=1, dim=16))
    big = ir.Value(name="big", const_value=ir.tensor(np.ones((1 << 24,), np.float32), name="big"))
    model.graph.register_initializer(big)  # 64 MB of float
    written = model_io.save_model(model, tmp_path / "big.onnx")
    assert [p.name for p in written] == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 1 << 20


def test_save_refuses_input_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(zoo.matmul_chain(), str(path))
    original = path.read_bytes()
    _, source = front_door.open_model(path)
    with pytest.raises(onnxquant.OutputPathError, match="input model"):
        front_door.check_output_files(path, source)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_load_copies_ir_model_and_proto():
    proto = zoo.matmul_chain()
    before = proto.SerializeToString()
    model, _ = front_door.open_model(proto)
    model.graph.remove(list(model.graph)[0], safe=False)
    assert proto.SerializeToString() == before
    original = ir.from_proto(zoo.matmul_chain())
    copy, _ = front_door.open_model(original)
    copy.graph.remove(list(copy.graph)[0], safe=False)
    assert len(list(original.graph)) == len(proto.graph.node)


def test_unknown_source_type():
    with pytest.raises(onnxquant.ModelLoadError, match="cannot load a model from int"):
        front_door.open_model(3)  # type: ignore[arg-type]


def test_convert_opset_keeps_large_tensors_without_copying() -> None:
    model, _ = front_door.open_model(zoo.matmul_chain(opset=13, dim=64))
    before = {n: v.const_value for n, v in model.graph.initializers.items()}
    converted = model_io.convert_opset(model, 21)
    assert model_io.default_opset(converted) == 21
    for name, tensor in before.items():
        after = converted.graph.initializers[name].const_value
        if tensor.nbytes > 1024:
            assert after is tensor  # the same object: nothing was copied
        np.testing.assert_array_equal(after.numpy(), tensor.numpy())
    # The input model still holds its own tensors (no placeholder left behind).
    assert all(v.const_value is before[n] for n, v in model.graph.initializers.items())
    proto = ir.serde.serialize_model(converted)
    onnx.checker.check_model(proto, full_check=True)


def test_a_one_file_output_does_not_point_at_the_inputs_data_file(tmp_path):
    """A float tensor left as it was (a node kept float) is written into the output, not left
    as a reference to the input's external-data file (which the output's folder lacks)."""
    import onnxruntime as ort
    import target_models as tm

    import onnxquant

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    onnx.save(tm.unequal_cnn(), tmp_path / "in" / "m.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    for name, quantize in (
            ("static.onnx", lambda out: onnxquant.quantize_static(
                tmp_path / "in" / "m.onnx", out, tm.image_feeds(4, 1),
                onnxquant.StaticQuantConfig(evaluate=False, nodes_to_exclude=["conv3"]))),
            ("dynamic.onnx", lambda out: onnxquant.quantize_dynamic(
                tmp_path / "in" / "m.onnx", out,
                onnxquant.DynamicQuantConfig(nodes_to_exclude=["conv3"])))):
        out = tmp_path / "out" / name
        quantize(out)
        written = onnx.load(out, load_external_data=False)
        assert not [t.name for t in written.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL]
        ort.InferenceSession(str(out)).run(None, tm.image_feeds(1, 2)[0])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dynamic.onnx", "static.onnx"]


def test_external_data_threshold_is_inclusive(tmp_path):
    """Tensors of at least ``size_threshold`` bytes go to the data file (onnx_ir's own
    threshold is exclusive)."""
    graph = ir.Graph([], [], nodes=[], name="g")
    for name, elements in (("at", 256), ("below", 255)):  # float32: 1024 and 1020 bytes
        value = ir.Value(name=name, const_value=ir.tensor(np.ones(elements, np.float32),
                                                          name=name))
        graph.register_initializer(value)
        graph.outputs.append(value)
    model = ir.Model(graph, ir_version=10)
    model.opset_imports[""] = 17
    model_io.save_model(model, tmp_path / "m.onnx", external_data=True, size_threshold=1024)
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    where = {t.name: t.data_location for t in loaded.graph.initializer}
    assert where == {"at": onnx.TensorProto.EXTERNAL, "below": onnx.TensorProto.DEFAULT}
