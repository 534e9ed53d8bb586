"""Write a model as one protobuf file, streaming its large initializers one at a time.

``onnx_ir.save`` without external data builds the whole ``ModelProto`` in memory (every tensor
copied into ``raw_data``) and then serialises it (a second copy), so writing a 700 MB model needs
about three times that. Here only the structure is serialised in memory; every large
initializer of the main graph is appended to the file afterwards as its own ``graph`` field
holding one ``initializer``: the protobuf encoding merges repeated occurrences of an embedded
message field (as ``MergeFrom`` does, so repeated fields concatenate), which every conforming
parser — onnx's and onnxruntime's — applies. A tensor's bytes are written with its ``tofile``
(external data: copied file to file; lazy tensors: computed, written, dropped), so the peak is
one tensor, not the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir

from onnxquant.core.external_data import load_external_tensors

__all__ = ["save_single_file", "STREAM_BYTES"]

STREAM_BYTES = 1024
"""Main-graph initializers of at least this many bytes are streamed."""

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_PLACEHOLDER = "__onnxquant_streamed__"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _streamable(tensor: ir.TensorProtocol | None) -> bool:
    return (tensor is not None and tensor.nbytes >= STREAM_BYTES
            and not isinstance(tensor, (ir.StringTensor, ir.serde.TensorProtoTensor)))


def _header(name: str, tensor: ir.TensorProtocol) -> bytes:
    """The tensor's TensorProto without ``raw_data``."""
    proto = onnx.TensorProto(name=name, data_type=tensor.dtype.value,
                             dims=[int(d) for d in tensor.shape.numpy()])
    if tensor.doc_string:
        proto.doc_string = tensor.doc_string
    for key, value in tensor.metadata_props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _write_initializer(f: BinaryIO, name: str, tensor: ir.TensorProtocol) -> None:
    """Append ``graph { initializer { <header> raw_data: <bytes> } }`` to ``f``."""
    nbytes = tensor.nbytes
    tensor_body = _header(name, tensor) + _tag(_TENSOR_RAW_DATA) + _varint(nbytes)
    tensor_len = len(tensor_body) + nbytes
    graph_prefix = _tag(_GRAPH_INITIALIZER) + _varint(tensor_len)
    graph_len = len(graph_prefix) + tensor_len
    f.write(_tag(_MODEL_GRAPH) + _varint(graph_len) + graph_prefix + tensor_body)
    f.flush()
    start = f.tell()
    tofile = getattr(tensor, "tofile", None)  # onnx_ir's tensors; not in TensorProtocol
    if tofile is not None:
        tofile(f)
    else:
        f.write(tensor.tobytes())
    f.flush()
    f.seek(0, os.SEEK_END)
    if f.tell() - start != nbytes:
        raise OSError(f"initializer '{name}' wrote {f.tell() - start} bytes, expected {nbytes}")


def save_single_file(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` as one ``.onnx`` file, holding one large tensor at a time.

    External tensors of subgraphs are read into memory first (they are serialised with the
    structure); the main graph's large tensors never are as a whole model. ``model`` is left
    as it was (its tensors are put back).
    """
    graph = model.graph
    streamed = {name: value.const_value for name, value in graph.initializers.items()
                if _streamable(value.const_value)}
    for index, name in enumerate(streamed):
        tensor = streamed[name]
        assert tensor is not None
        graph.initializers[name].const_value = ir.ExternalTensor(
            f"{_PLACEHOLDER}/{index}", 0, tensor.nbytes, tensor.dtype,
            shape=ir.Shape(tensor.shape.numpy()), name=name)
    try:
        load_external_tensors(model, main_graph=False)
        proto = ir.serde.serialize_model(model)
    finally:
        for name, tensor in streamed.items():
            graph.initializers[name].const_value = tensor
    kept = [t for t in proto.graph.initializer if t.name not in streamed]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    with open(Path(path), "wb") as f:
        f.write(proto.SerializeToString())
        del proto, kept
        for name, tensor in streamed.items():
            assert tensor is not None
            _write_initializer(f, name, tensor)
