"""External data is read only from files inside the model's folder.

Every external tensor's ``location`` is checked before anything reads it: no absolute paths, no
``..`` escape, no symlink or hard link that leads out of the folder (after resolving symlinks),
a regular non-empty file, and an offset and length that lie inside it and match the tensor's
dtype and shape. onnx_ir and onnxruntime check some of this, but only when the bytes are read,
with errors that name neither the tensor nor what to do.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxquant.core.errors import ModelLoadError

__all__ = ["external_tensors", "check_external_data", "read_array", "load_external_tensors",
           "release_external"]


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every external tensor: initializers of all graphs, and tensor attributes of nodes."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if isinstance(attr, ir.Attr) and isinstance(attr.value, ir.ExternalTensor):
                    yield attr.value


def read_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's values, read without keeping a memory map of its data file.

    ``ExternalTensor.numpy()`` maps the *whole* data file for every tensor it reads and keeps
    the map (and the pages it touched) until the tensor is released; reading every weight of a
    3 GB model that way reserves 3 GB of address space per weight. An external tensor of a
    byte-sized numpy type is read here with one positioned file read into an array the caller
    owns (freed with it); other tensors (in memory, lazy, sub-byte types) are returned as
    ``tensor.numpy()`` gives them.
    """
    if not isinstance(tensor, ir.ExternalTensor) or tensor.dtype.bitwidth < 8:
        return tensor.numpy()
    dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
    if dtype.kind in "OUSV" or not tensor.size:
        return tensor.numpy()
    data = np.fromfile(tensor.path, dtype=dtype, count=tensor.size, offset=tensor.offset or 0)
    if data.size != tensor.size:
        raise ModelLoadError(f"tensor '{tensor.name}': its data file '{tensor.path}' is shorter "
                             "than the tensor; restore the complete data file")
    return data.reshape(tensor.shape.numpy())


def check_external_data(model: ir.Model, folder: Path | None, where: str) -> list[Path]:
    """Check every external tensor of ``model`` against ``folder``; return the data files.

    Args:
        model: The loaded model (tensors not read yet).
        folder: The model's folder; None when the model came from memory without one (then
            external data is refused: there is no folder to contain it in).
        where: How to name the model in messages.

    Raises:
        ModelLoadError: A location is absolute, escapes the folder, is not a regular file with
            one link, or the tensor's bytes do not lie inside the file.
    """
    files: dict[Path, int] = {}
    for tensor in external_tensors(model):
        base = Path(tensor.base_dir) if str(tensor.base_dir) else folder
        if base is None:
            raise ModelLoadError(
                f"{where}: tensor '{tensor.name}' is stored in external file "
                f"'{tensor.location}', but the model was given in memory without a folder; "
                "pass the model's path instead (or onnx.load it with its external data)")
        path = _contained(tensor, base, where)
        size = files.get(path)
        if size is None:
            size = files[path] = _data_file_size(tensor, path, where)
        _check_extent(tensor, size, where)
    return list(files)


def _label(tensor: ir.ExternalTensor, where: str) -> str:
    return f"{where}: tensor '{tensor.name}' (external location '{tensor.location}')"


def _contained(tensor: ir.ExternalTensor, base: Path, where: str) -> Path:
    location = str(tensor.location)
    if not location or os.path.isabs(location) or Path(location).drive:
        raise ModelLoadError(
            f"{_label(tensor, where)}: external data must be given relative to the model's "
            "folder, not as an absolute path; move the file next to the model and fix the "
            "location")
    root = base.resolve()
    path = (base / location).resolve()
    if not path.is_relative_to(root):
        raise ModelLoadError(
            f"{_label(tensor, where)} leads outside the model's folder '{root}' (to '{path}'); "
            "external data is only read from inside the model's folder: copy the file there")
    return path


def _data_file_size(tensor: ir.ExternalTensor, path: Path, where: str) -> int:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ModelLoadError(
            f"{_label(tensor, where)}: the data file '{path}' does not exist; copy it next to "
            "the model") from None
    except OSError as err:
        raise ModelLoadError(
            f"{_label(tensor, where)}: the data file '{path}' cannot be read "
            f"({err.strerror or err})") from err
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(
            f"{_label(tensor, where)}: '{path}' is not a regular file; the location must name "
            "a data file")
    if info.st_nlink > 1:
        raise ModelLoadError(
            f"{_label(tensor, where)}: the data file '{path}' has {info.st_nlink} hard links; "
            "a hard link may lead outside the model's folder, so it is refused: replace it by "
            "a copy of the file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{_label(tensor, where)}: the data file '{path}' is not readable")
    return info.st_size


def _check_extent(tensor: ir.ExternalTensor, size: int, where: str) -> None:
    offset = tensor.offset or 0
    want = tensor.nbytes
    if offset < 0:
        raise ModelLoadError(f"{_label(tensor, where)} has a negative offset {offset}")
    if tensor.length is not None and tensor.length != want:
        raise ModelLoadError(
            f"{_label(tensor, where)} declares length {tensor.length} bytes, but its dtype "
            f"{tensor.dtype} and shape {tensor.shape} need {want} bytes; fix the model")
    if offset + want > size:
        raise ModelLoadError(
            f"{_label(tensor, where)} needs bytes {offset}..{offset + want} of its data file, "
            f"which has only {size} bytes (empty, truncated or the wrong file); restore the "
            "complete data file")


def load_external_tensors(model: ir.Model, *, main_graph: bool = True) -> int:
    """Read every external initializer of ``model`` (subgraphs too; the main graph's unless
    ``main_graph=False``) into memory, so that the model no longer depends on its data files;
    returns how many were read.

    Each tensor is copied out of its data file and the file's memory map is closed right away:
    onnx_ir maps the whole data file for every external tensor it reads, so keeping the maps
    would reserve the data file's size in address space once per tensor.
    """
    count = 0
    graphs = [model.graph] if main_graph else []
    for graph in (*graphs, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(np.array(tensor.numpy(), copy=True),
                                              name=tensor.name)
                release_external(tensor)
                count += 1
    return count


def release_external(tensor: ir.TensorProtocol) -> None:
    """Close the memory map onnx_ir holds for an external tensor (no-op for other tensors, or
    while a numpy view of the map is still alive: it is freed with that view)."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            pass
