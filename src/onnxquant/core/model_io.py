"""Loading and saving models on ``onnx_ir``.

Loading accepts a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` and always returns a model
that the caller may change freely: the input model is never modified. External data is memory
mapped lazily. Saving is atomic (a private temporary folder next to the destination, then
``os.replace``), refuses to overwrite the input model and writes external data when asked or when
the model would not fit a 2 GB protobuf.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxquant.core import tempdirs
from onnxquant.core._single_file import save_single_file
from onnxquant.core.errors import OutputPathError, UnsupportedModelError
from onnxquant.core.external_data import load_external_tensors, release_external

__all__ = [
    "ModelInput",
    "save_model",
    "model_size_bytes",
    "clone_model",
    "load_external_tensors",
    "release_external",
    "convert_opset",
    "structure_proto",
    "default_opset",
    "PROTOBUF_LIMIT",
    "DATA_SUFFIX",
]

logger = logging.getLogger(__name__)

ModelInput = str | os.PathLike | onnx.ModelProto | ir.Model
PROTOBUF_LIMIT = 2**31 - 1


def clone_model(model: ir.Model) -> ir.Model:
    """A structural copy of ``model``: new graphs, nodes and values, shared (read-only) tensors.

    onnxquant never changes a tensor in place, so sharing them is safe and costs no memory;
    external tensors stay memory-mapped references to their files.
    """
    return model.clone()


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
    declared = {info.name for info in proto.graph.value_info}
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as err:
        raise UnsupportedModelError(
            f"the ONNX version converter could not convert the model from opset "
            f"{default_opset(model)} to {target}: {err}. Convert it yourself (e.g. re-export "
            "with a newer opset) and try again"
        ) from err
    del proto
    # The converter writes the shapes it inferred as value_info; keep only the model's own
    # (inferred ones would pass for declared shapes and be written into the output).
    kept = [info for info in converted.graph.value_info if info.name in declared]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
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


def structure_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a protobuf without its large weights (in-memory initializers above 1 KB
    become data-less external placeholders): cheap to check, at any model size."""
    detached = _detach_large_tensors(model)
    try:
        return ir.serde.serialize_model(model)
    finally:
        _reattach(model, detached)


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
                shape=ir.Shape(tensor.shape.numpy()), name=name)
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


DATA_SUFFIX = ".data"
TEMP_PREFIX = ".onnxquant-"


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    data_name: str | None = None,
    size_threshold: int = 1024,
) -> list[Path]:
    """Save ``model`` atomically and return the paths written.

    The files are written into a private folder next to the destination and renamed into
    place: a failed or killed save leaves the previous output as it was (with external data,
    the model and its data file are two renames, microseconds apart). Callers check first
    that no output file is an input file (:func:`onnxquant.core.front_door.check_output_files`).

    Args:
        model: The model to save.
        path: Destination ``.onnx`` path; its folder must exist.
        external_data: True: write all large tensors to ``<name>.data`` next to the model;
            False: one protobuf file; None: external data only when the model exceeds 2 GB.
        data_name: The external-data file name (in the model's folder) instead of
            ``<name>.data``.
        size_threshold: With external data, tensors of at least this many bytes go there.

    Raises:
        OutputPathError: The destination cannot be written (folder missing or read-only, disk
            full, ...); nothing is left behind.
    """
    dest = Path(path).absolute()
    data_name = data_name or dest.name + DATA_SUFFIX
    if external_data is None:
        external_data = model_size_bytes(model) > PROTOBUF_LIMIT - (64 << 20)
    try:
        with tempdirs.private_dir(dest.parent, TEMP_PREFIX) as tmpdir:
            tmp_model = tmpdir / dest.name
            if external_data:
                # onnx_ir moves tensors strictly larger than its threshold
                ir.save(model, tmp_model, external_data=data_name,
                        size_threshold_bytes=size_threshold - 1)
            else:  # one file, streamed: one large tensor in memory at a time
                save_single_file(model, tmp_model)
            written = []
            if (tmpdir / data_name).exists():
                os.replace(tmpdir / data_name, dest.parent / data_name)
                written.append(dest.parent / data_name)
            os.replace(tmp_model, dest)
            written.insert(0, dest)
            return written
    except OSError as err:
        if err.errno == errno.ENOMEM:  # out of memory (e.g. a map), not a destination problem
            raise
        raise OutputPathError(
            f"cannot write the output '{dest}': {err.strerror or err}; check that its folder "
            "exists, is writable and has space") from err
