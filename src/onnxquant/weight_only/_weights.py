"""Read one float weight in slabs and quantize it, without holding more than one slab.

A weight stored as external data is read with plain file reads, slab by slab along its first
axis (the bytes of a slab are contiguous in the file), so neither the whole float tensor nor a
memory map of the data file stays resident. Where blocks do not cross slab borders — RTN and
HQQ with a block size, or a Gather table blocked along its last axis — each slab is quantized on
its own and the (small) results are concatenated; GPTQ and channel-wise blocks read the whole
weight at once. An in-memory weight is sliced the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from onnxquant.weight_only.blocks import BlockQuantized

__all__ = ["read_slabs", "quantize_slabs", "release", "SLAB_BYTES"]

SLAB_BYTES = 16 << 20  # float32 bytes handed to the numerics at once

Quantizer = Callable[[np.ndarray], BlockQuantized]


def read_slabs(tensor: ir.TensorProtocol, rows: int, shape: tuple[int, ...] | None = None
               ) -> Iterator[np.ndarray]:
    """The tensor as float32 ``[dim0, rest]`` slabs of ``rows`` rows (the last may be shorter).

    ``shape`` reinterprets the tensor (same number of elements, e.g. leading 1s dropped).
    """
    shape = tuple(int(d) for d in (shape if shape is not None else tensor.shape.numpy()))
    dim0 = shape[0] if shape else 1
    rest = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    if isinstance(tensor, ir.ExternalTensor):
        dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        with open(tensor.path, "rb") as f:
            for r0 in range(0, dim0, rows):
                r1 = min(dim0, r0 + rows)
                f.seek((tensor.offset or 0) + r0 * rest * dtype.itemsize)
                data = np.fromfile(f, dtype=dtype, count=(r1 - r0) * rest)
                if data.size != (r1 - r0) * rest:
                    raise OSError(f"external data file '{tensor.path}' is shorter than tensor "
                                  f"'{tensor.name}' needs")
                yield data.reshape(r1 - r0, rest).astype(np.float32, copy=False)
        return
    array = tensor.numpy().reshape(dim0, rest)
    for r0 in range(0, dim0, rows):
        yield np.asarray(array[r0:r0 + rows], dtype=np.float32)


def release(tensor: ir.TensorProtocol) -> None:
    """Drop a memory map onnx_ir may hold for an external tensor (no-op otherwise)."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # a numpy view is still alive somewhere; it will be freed with it
            pass


def _concat(parts: list[BlockQuantized], axis: int) -> BlockQuantized:
    if len(parts) == 1:
        return parts[0]
    zps = [p.zero_points for p in parts if p.zero_points is not None]
    return BlockQuantized(
        q=np.concatenate([p.q for p in parts], axis=axis),
        scales=np.concatenate([p.scales for p in parts], axis=axis),
        zero_points=np.concatenate(zps, axis=axis) if zps else None,
        bits=parts[0].bits,
        block_size=parts[0].block_size,
    )


def quantize_slabs(tensor: ir.TensorProtocol, axis: int, quantize: Quantizer, *,
                   block_size: int | None, splittable: bool,
                   slab_bytes: int | None = None) -> BlockQuantized:
    """Quantize ``tensor`` blocked along ``axis``, reading it in slabs where that is exact.

    The weight is seen as the matrix ``M = [dim(axis), rest]`` (for a MatMul B with unit
    leading dims, ``[K, N]``). ``quantize(M_part)`` must treat columns independently, and,
    when ``splittable``, also whole groups of ``block_size`` rows independently.

    Args:
        tensor: The float weight.
        axis: The blocked axis (non-negative).
        quantize: Maps a float32 ``[rows, cols]`` matrix to its blocks.
        block_size: Rows per block of ``quantize`` (None: one block for all rows).
        splittable: Whether row groups of ``block_size`` may be quantized separately.
        slab_bytes: Float32 bytes per slab (default :data:`SLAB_BYTES`).
    """
    slab_bytes = slab_bytes or SLAB_BYTES
    shape = tuple(int(d) for d in tensor.shape.numpy())
    rank = len(shape)
    leading_ones = all(d == 1 for d in shape[:axis])
    cols = max(1, int(np.prod(shape[1:], dtype=np.int64)))
    if leading_ones:
        # Rows of M are contiguous runs of the tensor: slabs of whole blocks of rows.
        k = shape[axis]
        per_row = int(np.prod(shape[axis + 1:], dtype=np.int64))
        if splittable and block_size is not None:
            rows = max(block_size, slab_bytes // (4 * per_row) // block_size * block_size)
        else:
            rows = k
        parts = [quantize(slab.reshape(-1, per_row))
                 for slab in _rows_of(tensor, shape, axis, rows)]
        return _concat(parts, axis=0)
    if axis == rank - 1 and rank == 2:
        # A table blocked along its last axis: slabs of table rows are column groups of M.
        rows = max(1, slab_bytes // (4 * cols))
        parts = [quantize(np.ascontiguousarray(slab.T)) for slab in read_slabs(tensor, rows)]
        return _concat(parts, axis=1)
    (whole,) = read_slabs(tensor, shape[0])
    moved = np.moveaxis(whole.reshape(shape), axis, 0)
    return quantize(np.ascontiguousarray(moved.reshape(shape[axis], -1)))


def _rows_of(tensor: ir.TensorProtocol, shape: tuple[int, ...], axis: int, rows: int
             ) -> Iterator[np.ndarray]:
    """Slabs of ``rows`` indices along ``axis`` when every dim before it is 1."""
    yield from read_slabs(tensor, rows, shape[axis:])
