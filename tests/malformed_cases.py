"""Malformed inputs, built in code: each case writes a model (and its data files) into a folder
and says which error it must raise and which name the message must contain.

Used by ``test_malformed.py`` for every entry point. A case with ``error=None`` is a model that
is unusual but valid after repair (sparse initializers, duplicate node names): it must quantize
into a model onnxruntime runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxquant import ModelLoadError, UnsupportedModelError

DIM = 32


def base_model(opset: int = 17) -> onnx.ModelProto:
    """x [B,32] -> MatMul(W1 [32,32]) -> Add(b1) -> Relu -> MatMul(W2 [32,32]) -> y."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
    w2 = (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
    b1 = (rng.standard_normal(DIM) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
         helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
         helper.make_node("Relu", ["hb"], ["r"], name="relu1"),
         helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")],
        "base",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", DIM])],
        initializer=[onnx.numpy_helper.from_array(w1, "W1"),
                     onnx.numpy_helper.from_array(w2, "W2"),
                     onnx.numpy_helper.from_array(b1, "b1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=8)


def feeds(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((2, DIM)).astype(np.float32)} for _ in range(n)]


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _init(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _save(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _external(model: onnx.ModelProto, name: str, location: str, offset: int = 0,
              length: int | None = None) -> None:
    """Point initializer ``name`` at ``location`` (its bytes are dropped from the proto)."""
    tensor = _init(model, name)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="offset", value=str(offset))
    if length is not None:
        tensor.external_data.add(key="length", value=str(length))


W1_BYTES = DIM * DIM * 4


@dataclasses.dataclass
class Case:
    """One malformed input: ``build(folder)`` writes it and returns the model path."""

    name: str
    build: Callable[[Path], Path]
    error: type[Exception] | None
    culprit: str  # a name the message must contain


def _mutated(mutate: Callable[[onnx.ModelProto], None]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        model = base_model()
        mutate(model)
        return _save(model, folder)
    return build


def _dangling(m: onnx.ModelProto) -> None:
    _node(m, "add1").input[1] = "ghost_bias"


def _missing_initializer(m: onnx.ModelProto) -> None:
    m.graph.initializer.remove(_init(m, "W2"))


def _cycle(m: onnx.ModelProto) -> None:
    _node(m, "mm1").input[0] = "r"  # mm1 <- relu1 <- add1 <- mm1
    m.graph.node.append(helper.make_node("Identity", ["x"], ["unused"], name="keep_x"))


def _duplicate_output(m: onnx.ModelProto) -> None:
    _node(m, "relu1").output[0] = "h"
    _node(m, "mm2").input[0] = "h"


def _unknown_op(m: onnx.ModelProto) -> None:
    _node(m, "relu1").op_type = "Rellu"


def _unknown_domain(m: onnx.ModelProto) -> None:
    _node(m, "relu1").domain = "my.company"
    m.opset_import.append(helper.make_opsetid("my.company", 1))


def _wrong_rank_weight(m: onnx.ModelProto) -> None:
    w = _init(m, "W2")
    w.CopyFrom(onnx.numpy_helper.from_array(np.ones((), np.float32), "W2"))  # MatMul needs 1-D+


def _shape_mismatch(m: onnx.ModelProto) -> None:
    w = _init(m, "W2")
    w.CopyFrom(onnx.numpy_helper.from_array(np.ones((DIM + 3, DIM), np.float32), "W2"))


def _data_not_matching_dims(m: onnx.ModelProto) -> None:
    w = _init(m, "W2")
    w.dims[0] = DIM * 2


def _opset_too_new(m: onnx.ModelProto) -> None:
    m.opset_import[0].version = 99


def _ir_too_new(m: onnx.ModelProto) -> None:
    m.ir_version = 99


def _sparse(m: onnx.ModelProto) -> None:
    w = onnx.numpy_helper.to_array(_init(m, "W2")).copy()
    w[np.abs(w) < 0.2] = 0
    idx = np.flatnonzero(w)
    sparse = helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(w.ravel()[idx].astype(np.float32), "W2"),
        onnx.numpy_helper.from_array(idx.astype(np.int64), "W2_idx"), [DIM, DIM])
    m.graph.initializer.remove(_init(m, "W2"))
    m.graph.sparse_initializer.append(sparse)


def _duplicate_node_names(m: onnx.ModelProto) -> None:
    for node in m.graph.node:
        node.name = "same"


def _absurd_annotation(m: onnx.ModelProto) -> None:
    m.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT,
                                                            [7, 99_999_999_999, 3]))


def _wrong_annotated_type(m: onnx.ModelProto) -> None:
    m.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.INT64, ["B", DIM]))


def _negative_output_dim(m: onnx.ModelProto) -> None:
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = -7


def _string_input(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.STRING


def _untyped_input(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED


def _absurd_input_dim(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 10**12


def _with_data(location: str, *, offset: int = 0, length: int | None = None,
               prepare: Callable[[Path], None] | None = None) -> Callable[[Path], Path]:
    """W1 stored externally at ``location`` (``prepare`` makes the file system around it)."""
    def build(folder: Path) -> Path:
        if prepare is not None:
            prepare(folder)
        model = base_model()
        _external(model, "W1", location, offset, length)
        return _save(model, folder)
    return build


def _w1_bytes() -> bytes:
    return onnx.numpy_helper.to_array(_init(base_model(), "W1")).tobytes()


def _outside_file(folder: Path) -> Path:
    """A file with W1's bytes outside the model folder (in its parent)."""
    path = folder.parent / f"secret-{folder.name}.bin"
    path.write_bytes(_w1_bytes())
    return path


def _symlink_out(folder: Path) -> None:
    os.symlink(_outside_file(folder), folder / "w.bin")


def _symlinked_folder_out(folder: Path) -> None:
    outside = folder.parent / f"outside-{folder.name}"
    outside.mkdir()
    (outside / "w.bin").write_bytes(_w1_bytes())
    os.symlink(outside, folder / "sub")


def _hard_link(folder: Path) -> None:
    os.link(_outside_file(folder), folder / "w.bin")


def _file(content: bytes) -> Callable[[Path], None]:
    def prepare(folder: Path) -> None:
        (folder / "w.bin").write_bytes(content)
    return prepare


def _directory(folder: Path) -> None:
    (folder / "w.bin").mkdir()


def _absolute_build(folder: Path) -> Path:
    return _with_data(str(_outside_file(folder)))(folder)


def _corrupt(folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(700))
    return path


def _truncated(folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(base_model().SerializeToString()[:-200])
    return path


UNSUPPORTED = UnsupportedModelError
LOAD = ModelLoadError

CASES = [
    Case("dangling_input", _mutated(_dangling), UNSUPPORTED, "ghost_bias"),
    Case("missing_initializer", _mutated(_missing_initializer), UNSUPPORTED, "W2"),
    Case("cycle", _mutated(_cycle), UNSUPPORTED, "cycle"),
    Case("duplicate_output", _mutated(_duplicate_output), UNSUPPORTED, "'h'"),
    Case("unknown_op", _mutated(_unknown_op), UNSUPPORTED, "Rellu"),
    Case("unknown_domain", _mutated(_unknown_domain), UNSUPPORTED, "my.company"),
    Case("wrong_rank_weight", _mutated(_wrong_rank_weight), UNSUPPORTED, "MatMul"),
    Case("shape_mismatch", _mutated(_shape_mismatch), UNSUPPORTED, "MatMul"),
    Case("data_not_matching_dims", _mutated(_data_not_matching_dims), LOAD, "W2"),
    Case("opset_too_new", _mutated(_opset_too_new), UNSUPPORTED, "99"),
    Case("ir_too_new", _mutated(_ir_too_new), UNSUPPORTED, "99"),
    Case("corrupt_file", _corrupt, LOAD, "model.onnx"),
    Case("truncated_file", _truncated, LOAD, "model.onnx"),
    Case("data_dotdot_escape", _with_data("../secret.bin"), LOAD, "outside the model's folder"),
    Case("data_absolute_path", _absolute_build, LOAD, "absolute"),
    Case("data_symlink_out", _with_data("w.bin", prepare=_symlink_out), LOAD,
         "outside the model's folder"),
    Case("data_symlinked_folder_out", _with_data("sub/w.bin", prepare=_symlinked_folder_out),
         LOAD, "outside the model's folder"),
    Case("data_hard_link", _with_data("w.bin", prepare=_hard_link), LOAD, "hard link"),
    Case("data_missing", _with_data("nowhere.bin"), LOAD, "does not exist"),
    Case("data_empty", _with_data("w.bin", prepare=_file(b"")), LOAD, "W1"),
    Case("data_truncated", _with_data("w.bin", prepare=_file(_w1_bytes()[:-10])), LOAD, "W1"),
    Case("data_directory", _with_data("w.bin", prepare=_directory), LOAD, "not a regular file"),
    Case("data_offset_beyond", _with_data("w.bin", offset=10**6, prepare=_file(_w1_bytes())),
         LOAD, "W1"),
    Case("data_wrong_length", _with_data("w.bin", length=W1_BYTES - 4,
                                         prepare=_file(_w1_bytes())), LOAD, "W1"),
    Case("wrong_annotated_type", _mutated(_wrong_annotated_type), UNSUPPORTED, "add1"),
    Case("string_input", _mutated(_string_input), UNSUPPORTED, "mm1"),
    Case("untyped_input", _mutated(_untyped_input), UNSUPPORTED, "mm1"),
    Case("absurd_input_dim", _mutated(_absurd_input_dim), UNSUPPORTED, "mm1"),
    Case("sparse_initializer", _mutated(_sparse), None, ""),
    Case("absurd_annotation", _mutated(_absurd_annotation), None, ""),
    Case("negative_output_dim", _mutated(_negative_output_dim), None, ""),
    Case("duplicate_node_names", _mutated(_duplicate_node_names), None, ""),
]
