"""Loading and saving models on ``onnx_ir``.

Loading accepts a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` and always returns a model
that the caller may change freely: the input model is never modified. External data is memory
mapped lazily. Saving is atomic (a private temporary folder next to the destination, then
``os.replace``), refuses to overwrite the input model and writes external data when asked or when
the model would not fit a 2 GB protobuf.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxquant.core.errors import ModelLoadError, OutputPathError, UnsupportedModelError

__all__ = [
    "ModelInput",
    "load_model",
    "save_model",
    "model_size_bytes",
    "clone_model",
    "convert_opset",
    "default_opset",
    "PROTOBUF_LIMIT",
]

logger = logging.getLogger(__name__)

ModelInput = str | os.PathLike | onnx.ModelProto | ir.Model
PROTOBUF_LIMIT = 2**31 - 1
MIN_OPSET = 10


def load_model(source: ModelInput, *, upgrade_opset: bool = False) -> ir.Model:
    """Load a model into a private ``onnx_ir.Model``.

    Args:
        source: A path to an ``.onnx`` file (external data next to it is memory mapped lazily),
            an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (copied, never modified).
        upgrade_opset: Convert models below opset 10 to opset 13 with the ONNX version
            converter instead of refusing them.

    Raises:
        ModelLoadError: The file is missing or not a valid ONNX model.
        UnsupportedModelError: The default-domain opset is below 10 and ``upgrade_opset`` is off.
    """
    model = _read(source)
    opset = default_opset(model)
    if opset < MIN_OPSET:
        if not upgrade_opset:
            raise UnsupportedModelError(
                f"{_describe(source)} uses ONNX opset {opset}; quantization needs opset "
                f"{MIN_OPSET} or newer (QuantizeLinear/DequantizeLinear). Convert it with "
                "`onnx.version_converter.convert_version(model, 13)`, or pass "
                "upgrade_opset=True (CLI: --upgrade-opset) to do it automatically."
            )
        model = convert_opset(model, 13)
    return model


def _describe(source: ModelInput) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"model file '{os.fspath(source)}'"
    return f"model '{getattr(getattr(source, 'graph', None), 'name', '') or '<in memory>'}'"


def clone_model(model: ir.Model) -> ir.Model:
    """A structural copy of ``model``: new graphs, nodes and values, shared (read-only) tensors.

    onnxquant never changes a tensor in place, so sharing them is safe and costs no memory;
    external tensors stay memory-mapped references to their files.
    """
    return model.clone()


def _read(source: ModelInput) -> ir.Model:
    if isinstance(source, ir.Model):
        return clone_model(source)
    if isinstance(source, onnx.ModelProto):
        return ir.serde.deserialize_model(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(
            f"cannot load a model from {type(source).__name__}; pass a path, an "
            "onnx.ModelProto or an onnx_ir.Model"
        )
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"model file '{path}' does not exist (or is not a file)")
    try:
        return ir.load(path)
    except Exception as err:  # protobuf raises several unrelated types
        raise ModelLoadError(
            f"model file '{path}' is not a valid ONNX model ({type(err).__name__}: {err}); "
            "check that the file is complete and really an .onnx protobuf"
        ) from err


def default_opset(model: ir.Model) -> int:
    """The model's opset of the default ONNX domain (``""`` / ``"ai.onnx"``)."""
    imports = model.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    if version is None:
        raise UnsupportedModelError("the model imports no default ONNX domain opset")
    return int(version)


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """Convert ``model`` to default-domain opset ``target`` with ``onnx.version_converter``.

    Only the graph structure passes through the converter: large in-memory initializers are
    detached first (replaced by placeholders that reference no data) and the same tensor
    objects are attached to the converted model, so converting a big model does not copy its
    weights (external tensors stay external).
    """
    from onnx import version_converter

    detached = _detach_large_tensors(model)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        _reattach(model, detached)
    domains = {i.domain for i in proto.opset_import}
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as err:
        raise UnsupportedModelError(
            f"the ONNX version converter could not convert the model from opset "
            f"{default_opset(model)} to {target}: {err}. Convert it yourself (e.g. re-export "
            "with a newer opset) and try again"
        ) from err
    del proto
    # The converter may drop non-default domains it does not know; restore them.
    present = {i.domain for i in converted.opset_import}
    for imp in model.opset_imports.items():
        if imp[0] in domains - present:
            converted.opset_import.append(onnx.helper.make_opsetid(imp[0], imp[1]))
    result = ir.serde.deserialize_model(converted)
    _reattach(result, detached)
    if any(isinstance(t, ir.ExternalTensor) and str(t.location).startswith(_PLACEHOLDER_DIR)
           for t in _all_initializer_tensors(result)):
        raise UnsupportedModelError(  # the converter renamed or rewrote a large initializer
            f"converting the model to opset {target} changed its large initializers; convert it "
            "yourself (e.g. re-export with a newer opset) and try again")
    _copy_external_base_dir(model, result)
    logger.info("converted the model to opset %d", target)
    return result


_DETACH_BYTES = 1024
_PLACEHOLDER_DIR = "__onnxquant_detached__"


def _detach_large_tensors(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """Replace in-memory initializers above 1 KB by data-less placeholders; returns the
    originals by initializer name (small ones stay: converters may read shapes or scales; so do
    names used in more than one graph)."""
    graphs = [model.graph, *model.graph.subgraphs()]
    seen = collections.Counter(name for graph in graphs for name in graph.initializers)
    detached: dict[str, ir.TensorProtocol] = {}
    for graph in graphs:
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            if tensor.nbytes <= _DETACH_BYTES or seen[name] > 1:  # names must identify them
                continue
            detached[name] = tensor
            value.const_value = ir.ExternalTensor(
                f"{_PLACEHOLDER_DIR}/{len(detached)}", 0, tensor.nbytes, tensor.dtype,
                shape=tensor.shape, name=name)
    return detached


def _reattach(model: ir.Model, detached: dict[str, ir.TensorProtocol]) -> None:
    """Put the detached tensors back on the initializers of the same names."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            if name in detached:
                value.const_value = detached[name]


def _copy_external_base_dir(src: ir.Model, dst: ir.Model) -> None:
    base = _external_base_dir(src)
    if base is not None:
        ir.external_data.set_base_dir(dst.graph, base)


def _external_base_dir(model: ir.Model) -> str | None:
    for tensor in _all_initializer_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            return str(tensor.base_dir)
    return None


def _all_initializer_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    graphs = [model.graph, *model.graph.subgraphs()]
    for graph in graphs:
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def model_size_bytes(model: ir.Model) -> int:
    """Total bytes of all initializers (main graph and subgraphs)."""
    return sum(t.nbytes for t in _all_initializer_tensors(model))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protected: tuple[str | os.PathLike, ...] = (),
) -> list[Path]:
    """Save ``model`` atomically and return the paths written.

    Args:
        model: The model to save.
        path: Destination ``.onnx`` path; its folder must exist.
        external_data: True: write all large tensors to ``<name>.data`` next to the model;
            False: one protobuf file; None: external data only when the model exceeds 2 GB.
        protected: Files that must not be overwritten (the input model and its data).

    Raises:
        OutputPathError: The destination is a protected file, a folder, or its folder is missing.
    """
    dest = Path(path).absolute()
    if not dest.parent.is_dir():
        raise OutputPathError(f"output folder '{dest.parent}' does not exist; create it first")
    if dest.is_dir():
        raise OutputPathError(f"output path '{dest}' is a folder; give a file name like model.onnx")
    data_name = dest.name + ".data"
    for p in protected:
        for target in (dest, dest.parent / data_name):
            if _same_file(Path(p), target):
                raise OutputPathError(
                    f"refusing to overwrite '{target}', which is the input model (or its "
                    "data); choose another output path"
                )
    if external_data is None:
        external_data = model_size_bytes(model) > PROTOBUF_LIMIT - (64 << 20)
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxquant-", dir=dest.parent))
    try:
        tmp_model = tmpdir / dest.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024)
        else:
            ir.save(model, tmp_model)
        written = []
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, dest.parent / data_name)
            written.append(dest.parent / data_name)
        os.replace(tmp_model, dest)
        written.insert(0, dest)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
