"""``onnxquant.preprocess(model_in, model_out, PreprocessConfig())``: the same function before
and after, the input never touched, the output written atomically and nowhere else, external
data both ways, and the result's account of what changed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant import (
    ModelLoadError,
    OutputPathError,
    PreprocessConfig,
    PreprocessResult,
    QuantizationError,
)
from onnxquant.preprocess import PREPROCESSED_KEY, passes

F = TensorProto.FLOAT


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _bn_dropout_model() -> onnx.ModelProto:
    """Identity -> Conv -> BatchNormalization -> Dropout -> Relu, weights in Constant nodes."""
    rng = np.random.default_rng(0)
    consts = {
        "W": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "bias": (rng.standard_normal(4) * 0.1).astype(np.float32),
        "mean": (rng.standard_normal(4) * 0.1).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
    }
    nodes = [helper.make_node("Constant", [], [name], name=f"const_{name}",
                              value=numpy_helper.from_array(value))
             for name, value in consts.items()]
    nodes += [
        helper.make_node("Identity", ["x"], ["x_id"], name="identity"),
        helper.make_node("Conv", ["x_id", "W"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"],
                         ["bn"], name="bn"),
        helper.make_node("Dropout", ["bn"], ["drop"], name="dropout"),
        helper.make_node("Relu", ["drop"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "bn_dropout",
                              [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _close(want: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> None:
    for feed_want, feed_got in zip(want, got, strict=True):
        for a, b in zip(feed_want, feed_got, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


ZOO = {
    "cnn": zoo.cnn,
    "constant_weights_cnn": zoo.constant_weights_cnn,
    "if_subgraph_model": zoo.if_subgraph_model,
    "loop_model": zoo.loop_model,
    "transformer_block": zoo.transformer_block,
    "bn_dropout": _bn_dropout_model,
}


@pytest.mark.parametrize("name", list(ZOO))
def test_the_output_computes_the_same_function(name: str, tmp_path: Path) -> None:
    proto = ZOO[name]()
    src = tmp_path / "model.onnx"
    onnx.save(proto, src)
    before = src.read_bytes()
    result = onnxquant.preprocess(src, tmp_path / "out.onnx")
    assert src.read_bytes() == before
    feeds = zoo.random_feeds(proto, 3, seed=1)
    _close(zoo.run(proto, feeds), zoo.run(str(tmp_path / "out.onnx"), feeds))
    assert result.files == [tmp_path / "out.onnx"]
    assert _files(tmp_path) == ["model.onnx", "out.onnx"]  # no temporary folder left


def test_result_accounts_for_what_changed(tmp_path: Path) -> None:
    onnx.save(_bn_dropout_model(), tmp_path / "m.onnx")
    result = onnxquant.preprocess(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert isinstance(result, PreprocessResult)
    assert dict(result.ops_before) == {"Constant": 5, "Identity": 1, "Conv": 1,
                                       "BatchNormalization": 1, "Dropout": 1, "Relu": 1}
    assert dict(result.ops_after) == {"Conv": 1, "Relu": 1}
    assert result.removed == {"Constant": 5, "Identity": 1, "BatchNormalization": 1,
                              "Dropout": 1}
    assert result.added == {}
    assert [s.step for s in result.steps] == ["symbolic shapes", "optimize", "onnx shapes"]
    assert result.shapes_before.known == 0 and result.shapes_after.total == 2
    assert result.shapes_after.known == 2  # x is [N,3,8,8]: every dimension named or numbered
    assert result.warnings() == [] and result.unknown == []
    text = result.summary()
    assert re.search(r"^nodes: +10 -> 2$", text, re.M)
    assert re.search(r"^  BatchNormalization +1 -> 0$", text, re.M)
    assert re.search(r"^              after:  2 known, 0 partial, 0 unknown \(of 2\)$", text,
                     re.M)
    assert "removed: Constant 5" in text
    out = onnx.load(tmp_path / "out.onnx")
    assert {p.key: p.value for p in out.metadata_props}[PREPROCESSED_KEY] == "onnxquant"


def test_steps_can_be_turned_off(tmp_path: Path) -> None:
    onnx.save(_bn_dropout_model(), tmp_path / "m.onnx")
    config = PreprocessConfig(optimize=False, symbolic_shapes=False)
    result = onnxquant.preprocess(tmp_path / "m.onnx", tmp_path / "out.onnx", config)
    assert [s.step for s in result.steps] == ["onnx shapes"]
    assert result.ops_after == result.ops_before
    nothing = PreprocessConfig(optimize=False, symbolic_shapes=False, onnx_shapes=False)
    result = onnxquant.preprocess(tmp_path / "m.onnx", tmp_path / "copy.onnx", nothing)
    assert result.steps == [] and "none (every step turned off)" in result.summary()


def test_model_proto_input_is_not_modified(tmp_path: Path) -> None:
    proto = _bn_dropout_model()
    before = proto.SerializeToString()
    onnxquant.preprocess(proto, tmp_path / "out.onnx")
    assert proto.SerializeToString() == before


def test_nothing_is_written_outside_the_destination(tmp_path: Path, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    onnx.save(zoo.transformer_block(), src_dir / "m.onnx")
    onnxquant.preprocess(src_dir / "m.onnx", out_dir / "m.onnx")
    assert _files(cwd) == [] and _files(src_dir) == ["m.onnx"]
    assert _files(out_dir) == ["m.onnx"]


def test_a_failed_run_leaves_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        onnxquant.preprocess(tmp_path / "broken.onnx", out)
    assert out.read_bytes() == b"previous output"
    assert _files(tmp_path) == ["broken.onnx", "out.onnx"]


def test_output_paths_that_would_overwrite_the_input_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(zoo.cnn(), src, save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    assert _files(tmp_path) == ["m.onnx", "weights.bin"]
    before = {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)}
    with pytest.raises(OutputPathError, match="input model"):
        onnxquant.preprocess(src, src)
    with pytest.raises(OutputPathError, match="weights.bin"):
        onnxquant.preprocess(src, tmp_path / "out.onnx",
                             PreprocessConfig(external_data=True,
                                              external_data_name="weights.bin"))
    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == before


def test_external_data_input_gives_a_self_contained_output(tmp_path: Path) -> None:
    proto = zoo.cnn()
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    onnx.save(zoo.cnn(), src_dir / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    onnxquant.preprocess(src_dir / "m.onnx", tmp_path / "out.onnx")
    for path in src_dir.iterdir():
        path.unlink()
    src_dir.rmdir()  # the output must not refer to the input's data
    feeds = zoo.random_feeds(proto, 2)
    _close(zoo.run(proto, feeds), zoo.run(str(tmp_path / "out.onnx"), feeds))


def test_external_data_output_with_a_name_and_threshold(tmp_path: Path) -> None:
    proto = zoo.cnn()
    onnx.save(proto, tmp_path / "m.onnx")
    config = PreprocessConfig(external_data=True, external_data_name="weights.bin",
                              external_data_threshold=256)
    result = onnxquant.preprocess(tmp_path / "m.onnx", tmp_path / "out.onnx", config)
    assert result.files == [tmp_path / "out.onnx", tmp_path / "weights.bin"]
    out = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    external = {t.name for t in out.graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    inline = [t for t in out.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data or b"") < 256 for t in inline)
    assert {e.value for t in out.graph.initializer for e in t.external_data
            if e.key == "location"} == {"weights.bin"}
    feeds = zoo.random_feeds(proto, 2)
    _close(zoo.run(proto, feeds), zoo.run(str(tmp_path / "out.onnx"), feeds))


@pytest.mark.parametrize("kwargs", [{"external_data_name": "../up.data"},
                                    {"external_data_name": "sub/x.data"},
                                    {"external_data_threshold": -1}, {"int_max": 0}])
def test_invalid_config_values_are_refused(kwargs: dict) -> None:
    with pytest.raises(QuantizationError):
        PreprocessConfig(**kwargs)


def test_public_name_is_the_function_and_the_passes_stay_importable() -> None:
    from onnxquant.preprocess.api import preprocess

    assert onnxquant.preprocess is preprocess
    assert callable(passes.prepare_for_quantization)
    assert "preprocess" in onnxquant.__all__


LARGE = os.environ.get("ONNXQUANT_LARGE_TESTS") == "1"


@pytest.mark.skipif(not LARGE, reason="writes ~7 GB to disk (about 30 s); set "
                    "ONNXQUANT_LARGE_TESTS=1 to run it")
def test_model_above_2_gb_with_external_data(tmp_path: Path) -> None:
    """2.2 GB of weights in external data: optimized, saved with external data (chosen by
    size), and the process never holds a whole copy of the weights (measured: 1.25 GB peak)."""
    import resource

    rows = 2 ** 18  # 4 x [rows, 528] float32 = 2.2 GB
    names = [f"w{i}" for i in range(4)]
    data = tmp_path / "big.onnx.data"
    with open(data, "wb") as handle:
        for i in range(4):
            block = np.full((rows, 528), i + 1, np.float32)
            handle.write(block.tobytes())
    inits = []
    size = rows * 528 * 4
    for i, name in enumerate(names):
        tensor = onnx.TensorProto(name=name, data_type=F, dims=[rows, 528])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(i * size)),
                           ("length", str(size))):
            tensor.external_data.add(key=key, value=value)
        inits.append(tensor)
    nodes = [helper.make_node("Identity", ["x"], ["x_id"], name="identity"),
             helper.make_node("Dropout", ["x_id"], ["x_drop"], name="dropout")]
    previous = "x_drop"
    for i, name in enumerate(names):
        nodes.append(helper.make_node("Gather", [name, "idx"], [f"g{i}"], name=f"gather{i}",
                                      axis=0))
        out = "y" if i == len(names) - 1 else f"a{i}"
        nodes.append(helper.make_node("Add", [previous, f"g{i}"], [out], name=f"add{i}"))
        previous = out
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", F, [1, 528]),
                                            helper.make_tensor_value_info("idx", TensorProto.INT64,
                                                                          [1])],
                              [helper.make_tensor_value_info("y", F, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "big.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = onnxquant.preprocess(tmp_path / "big.onnx", out_dir / "big.onnx")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert result.removed == {"Identity": 1, "Dropout": 1}
    assert result.files == [out_dir / "big.onnx", out_dir / "big.onnx.data"]
    assert (out_dir / "big.onnx.data").stat().st_size >= 4 * size
    print(f"peak memory {peak / 1e9:.2f} GB for {4 * size / 1e9:.2f} GB of weights")
    assert peak < 4 * size, f"peak memory {peak / 1e9:.1f} GB"  # less than one whole copy
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_dir / "big.onnx"), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.zeros((1, 528), np.float32),
                           "idx": np.array([3], np.int64)})[0]
    np.testing.assert_array_equal(y, np.full((1, 528), 10, np.float32))
