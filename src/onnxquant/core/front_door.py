"""The front door every mode enters through: load → validate → (each mode) prepare.

:func:`open_model` reads a model from a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``
and checks it before any work starts: a readable protobuf, external data only from inside the
model's folder (:mod:`~onnxquant.core.external_data`), a sound graph, ops, versions and shapes
(:mod:`~onnxquant.core.validate`). The weights are not read: a model of any size is checked in
the memory of its structure. :func:`check_output` and :func:`check_output_files` make sure an
output never touches an input file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from onnxquant.core import model_io, validate
from onnxquant.core.errors import ModelLoadError, OutputPathError, UnsupportedModelError
from onnxquant.core.external_data import check_external_data

__all__ = ["ModelSource", "Entry", "enter", "open_model", "check_output", "check_output_files",
           "MIN_OPSET"]

logger = logging.getLogger(__name__)

MIN_OPSET = 10


@dataclasses.dataclass
class ModelSource:
    """Where the input model lives.

    Attributes:
        description: How messages name it (``model file 'a.onnx'`` or ``model 'g' (in memory)``).
        path: The model file, when it came from one.
        data_files: Its external-data files (resolved, inside the model's folder).
    """

    description: str
    path: Path | None
    data_files: list[Path]

    @property
    def files(self) -> list[Path]:
        """Every file of the input: the model, then its data files."""
        return ([self.path] if self.path is not None else []) + self.data_files

    def float_bytes(self, model: ir.Model) -> int:
        """Size of the float model: its files when it came from disk, else its tensors."""
        if self.path is None:
            return model_io.model_size_bytes(model)
        return sum(p.stat().st_size for p in self.files)


@dataclasses.dataclass
class Entry:
    """A checked model on its way to a checked output.

    Attributes:
        model: The private, validated model (at ``min_opset`` or newer).
        source: Where the input lives (its files are never written).
        output: The absolute output path.
    """

    model: ir.Model
    source: ModelSource
    output: Path


def enter(model_input: model_io.ModelInput, model_output: str | os.PathLike, *,
          upgrade_opset: bool = False, min_opset: int | None = None) -> Entry:
    """The whole front door of a quantization run, before any work: the output path is
    usable, the model loads and is valid, no output file is an input file, and the model is
    converted to ``min_opset`` when it is older.

    Raises:
        OutputPathError: See :func:`check_output` and :func:`check_output_files`.
        ModelLoadError, UnsupportedModelError: See :func:`open_model`.
    """
    output = check_output(model_input, model_output)
    model, source = open_model(model_input, upgrade_opset=upgrade_opset)
    check_output_files(output, source)
    if min_opset is not None and model_io.default_opset(model) < min_opset:
        model = model_io.convert_opset(model, min_opset)
    return Entry(model, source, output)


def open_model(source: model_io.ModelInput, *, upgrade_opset: bool = False
               ) -> tuple[ir.Model, ModelSource]:
    """Load a private copy of a model and check it before any work starts.

    Args:
        source: A path to an ``.onnx`` file (external data next to it stays on disk), an
            ``onnx.ModelProto`` or an ``onnx_ir.Model`` (copied, never modified).
        upgrade_opset: Convert models below opset 10 to opset 13 with the ONNX version
            converter instead of refusing them.

    Returns:
        The model (tensors not read yet) and where it came from.

    Raises:
        ModelLoadError: The file is missing, not ONNX, or its data is outside the model's
            folder, missing or short.
        UnsupportedModelError: The model is invalid (undefined inputs, cycles, unknown ops,
            inconsistent shapes, versions onnxruntime refuses) or below opset 10.
    """
    model, info = _read(source)
    where = info.description
    structure = model_io.structure_proto(model)
    if isinstance(source, ir.Model):  # a protobuf source was checked before deserializing
        validate.validate_structure(structure, where)
    _drop_shapes(model, validate.check_shapes(structure, where), where)
    del structure
    info.data_files = check_external_data(model, info.path.parent if info.path else None, where)
    # Duplicate or empty node names are renamed on purpose: onnxruntime refuses duplicates, and
    # every plan and decision is keyed by name.
    NameFixPass()(model)
    return _upgrade(model, where, upgrade_opset), info


def _drop_shapes(model: ir.Model, names: set[str], where: str) -> None:
    """Forget declared shapes that contradict inference (inputs keep theirs: they are the
    model's contract with its callers)."""
    if not names:
        return
    for graph in (model.graph, *model.graph.subgraphs()):
        values = [v for node in graph for v in node.outputs]
        for value in values:
            if value.name in names:
                value.shape = None
    logger.warning("%s: declared shapes of %s contradict shape inference and were dropped",
                   where, ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else ""))


def _read(source: model_io.ModelInput) -> tuple[ir.Model, ModelSource]:
    """The model and where it came from (a protobuf is checked before it is deserialized)."""
    if isinstance(source, ir.Model):
        name = source.graph.name or "<in memory>"
        return model_io.clone_model(source), ModelSource(f"model '{name}'", None, [])
    if isinstance(source, onnx.ModelProto):
        info = ModelSource(f"model '{source.graph.name or '<in memory>'}'", None, [])
        if any(g.sparse_initializer for g in validate.iter_graphs(source.graph)):
            copy = onnx.ModelProto()
            copy.CopyFrom(source)  # densifying must not change the caller's model
            source = copy
        return _from_proto(source, info, None), info
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(
            f"cannot load a model from {type(source).__name__}; pass a path, an "
            "onnx.ModelProto or an onnx_ir.Model")
    path = Path(source)
    info = ModelSource(f"model file '{path}'", path, [])
    if not path.is_file():
        raise ModelLoadError(f"model file '{path}' does not exist (or is not a file)")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf raises several unrelated types
        raise ModelLoadError(
            f"model file '{path}' is not a valid ONNX model ({type(err).__name__}: {err}); "
            "check that the file is complete and really an .onnx protobuf") from err
    return _from_proto(proto, info, path.parent), info


def _from_proto(proto: onnx.ModelProto, info: ModelSource, folder: Path | None) -> ir.Model:
    densified = validate.densify_sparse_initializers(proto.graph)
    if densified:
        logger.info("%s: %d sparse initializers made dense", info.description, densified)
    validate.check_initializer_sizes(proto.graph)
    validate.validate_structure(proto, info.description)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # onnx_ir raises ValueError/TypeError/KeyError on bad protos
        raise ModelLoadError(
            f"{info.description} cannot be read ({type(err).__name__}: {err}); fix the model "
            "(re-export it) and try again") from err
    if folder is not None:
        ir.external_data.set_base_dir(model.graph, folder)
    return model


def _upgrade(model: ir.Model, where: str, upgrade_opset: bool) -> ir.Model:
    opset = model_io.default_opset(model)
    if opset >= MIN_OPSET:
        return model
    if not upgrade_opset:
        raise UnsupportedModelError(
            f"{where} uses ONNX opset {opset}; quantization needs opset {MIN_OPSET} or newer "
            "(QuantizeLinear/DequantizeLinear). Convert it with "
            "`onnx.version_converter.convert_version(model, 13)`, or pass "
            "upgrade_opset=True (CLI: --upgrade-opset) to do it automatically.")
    return model_io.convert_opset(model, 13)


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def check_output(model_input: Any, model_output: str | os.PathLike) -> Path:
    """Refuse an unusable output path before the model is even read; returns it absolute.

    Raises:
        OutputPathError: The output is the input model, a folder, or its folder is missing or
            not writable.
    """
    out = Path(model_output).absolute()
    if isinstance(model_input, (str, os.PathLike)) and _resolved(model_input) == _resolved(out):
        raise OutputPathError(
            f"the output path '{model_output}' is the input model; choose another output path "
            "(the input model is never overwritten)")
    if out.is_dir():
        raise OutputPathError(f"output path '{out}' is a folder; give a file name like "
                              "model.onnx")
    if not out.parent.is_dir():
        raise OutputPathError(f"output folder '{out.parent}' does not exist; create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder '{out.parent}' is not writable; choose another "
                              f"destination for '{out.name}'")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputPathError(f"output file '{out}' exists and is read-only; choose another "
                              "output path or make it writable")
    return out


def output_files(model_output: str | os.PathLike) -> list[Path]:
    """Every file a save to ``model_output`` may write: the model and its ``.data`` file."""
    out = Path(model_output).absolute()
    return [out, out.parent / (out.name + model_io.DATA_SUFFIX)]


def check_output_files(model_output: str | os.PathLike, source: ModelSource) -> None:
    """Refuse an output whose files (model or external data) are files of the input.

    Compared by resolved path and by inode (hard links), before any work is done.

    Raises:
        OutputPathError: An output file is the input model or one of its data files.
    """
    for target in output_files(model_output):
        for existing in source.files:
            if _resolved(target) == _resolved(existing) or _same_inode(target, existing):
                what = "input model" if existing == source.path else "input's external data"
                raise OutputPathError(
                    f"writing '{model_output}' would overwrite '{existing}', the "
                    f"{what} (output file '{target.name}'); choose another output path")


def _same_inode(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
