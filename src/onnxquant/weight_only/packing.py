"""Byte layouts of block-quantized weights, for the three operators that read them.

Every function takes a :class:`~onnxquant.weight_only.blocks.BlockQuantized` (``W[K, N]``
quantized in blocks along K) or plain integer arrays and returns numpy arrays or ``onnx_ir``
tensors; nothing here knows about graphs. All packing is vectorised numpy.

Layouts (``k_blocks = ceil(K / block_size)``):

* ``com.microsoft.MatMulNBits``: ``B`` uint8 ``[N, k_blocks, block_size * bits / 8]`` — column
  n's K values, blocks of ``block_size`` consecutive values, packed low bits first (value 2i in
  the low nibble of byte i for 4 bits; value 4i in bits 0-1 for 2 bits); the last block is
  padded with its zero point. ``scales`` ``[N, k_blocks]``. ``zero_points``: integer ones packed
  the same way per column, ``[N, ceil(k_blocks * bits / 8)]``; float ones ``[N * k_blocks]``.
* ``DequantizeLinear`` (opset 21, ``axis=0, block_size``): data INT4/UINT4 (or INT8/UINT8)
  ``[K, N]`` in the original shape, scales and zero points ``[k_blocks, N]``. Symmetric blocks
  are stored signed (``q - 2**(bits-1)``) without zero points; asymmetric ones unsigned.
* ``com.microsoft.GatherBlockQuantized``: either typed INT4/UINT4 data in the table's own shape
  (any gather/quantize axis; bits 4 only), or uint8 data packed along the last axis (the
  quantize axis must be the last one; bits 2, 4 or 8) with zero points packed the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from numpy.typing import DTypeLike

from onnxquant.weight_only.blocks import BlockQuantized

__all__ = [
    "SUPPORTED_BITS",
    "pack_bits",
    "unpack_bits",
    "MatMulNBitsTensors",
    "matmul_nbits_arrays",
    "int4_tensor",
    "dq_arrays",
    "GatherTensors",
    "gather_block_arrays",
    "blocks_along_axis",
    "TensorSpec",
    "matmul_nbits_specs",
    "dq_specs",
    "gather_block_specs",
]

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``values`` (integers in ``[0, 2**bits)``) low bits first.

    The last axis is padded with zeros to a multiple of ``8 // bits``; the result has
    ``ceil(last / (8 // bits))`` bytes on its last axis.
    """
    _check_bits(bits)
    values = np.asarray(values, dtype=np.uint8)
    per_byte = 8 // bits
    if per_byte == 1:
        return np.ascontiguousarray(values)
    last = values.shape[-1]
    pad = -last % per_byte
    if pad:
        widths = [(0, 0)] * (values.ndim - 1) + [(0, pad)]
        values = np.pad(values, widths)
    grouped = values.reshape(*values.shape[:-1], -1, per_byte)
    packed = grouped[..., 0].copy()
    for j in range(1, per_byte):
        packed |= grouped[..., j] << np.uint8(j * bits)
    return packed


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` values of the packed last axis."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[..., :count].copy()
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)
    values = (packed[..., None] >> shifts) & mask
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


# --------------------------------------------------------------------------- MatMulNBits
@dataclasses.dataclass
class MatMulNBitsTensors:
    """The constant inputs of one MatMulNBits node (numpy arrays, in input order)."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int
    block_size: int


def matmul_nbits_arrays(blocks: BlockQuantized, scale_dtype: DTypeLike = np.float32
                        ) -> MatMulNBitsTensors:
    """``B``, ``scales`` and ``zero_points`` of MatMulNBits for ``blocks`` (``W[K, N]``).

    Args:
        blocks: The quantized weight; ``block_size`` must be the node's block size.
        scale_dtype: Element type of A (float32 or float16); scales and float zero points
            are stored in it.
    """
    bits, bs = blocks.bits, blocks.block_size
    _check_bits(bits)
    k, n = blocks.shape
    k_blocks = -(-k // bs)
    if blocks.scales.shape != (k_blocks, n):
        raise ValueError(f"scales have shape {blocks.scales.shape}, expected {(k_blocks, n)}")
    if bs % (8 // bits):
        raise ValueError(f"a MatMulNBits block of {bs} {bits}-bit values does not fill whole "
                         "bytes; use a block size that is a multiple of 8 / bits")
    q = np.asarray(blocks.q, dtype=np.uint8)
    pad = k_blocks * bs - k
    if pad:
        # Padded rows dequantize to 0: they repeat the last block's zero point.
        zp_last = blocks.zero_point_array()[-1].astype(np.uint8)
        q = np.concatenate([q, np.broadcast_to(zp_last, (pad, n))], axis=0)
    b = _pack_columns(q, bits).reshape(n, k_blocks, -1)
    scales = np.ascontiguousarray(blocks.scales.T, dtype=scale_dtype)
    zero_points = None
    if blocks.zero_points is not None:
        zp = np.asarray(blocks.zero_points)
        if np.issubdtype(zp.dtype, np.floating):
            zero_points = np.ascontiguousarray(zp.T, dtype=scale_dtype).reshape(-1)
        else:
            zero_points = pack_bits(np.ascontiguousarray(zp.T.astype(np.uint8)), bits)
    return MatMulNBitsTensors(b=b, scales=scales, zero_points=zero_points, k=k, n=n,
                              bits=bits, block_size=bs)


def _pack_columns(q: np.ndarray, bits: int) -> np.ndarray:
    """``pack_bits(q.T, bits)`` for ``q[K, N]`` with ``K`` a multiple of ``8 // bits``.

    Packs along K first (rows ``j::per_byte`` are whole contiguous rows) and then transposes
    the smaller packed array in strips, which is an order of magnitude faster than
    transposing the codes.
    """
    per_byte = 8 // bits
    packed = q[0::per_byte].copy()
    for j in range(1, per_byte):
        packed |= q[j::per_byte] << np.uint8(j * bits)
    return _transposed(packed)


def _transposed(a: np.ndarray, strip: int = 32) -> np.ndarray:
    """``a.T`` as a C-contiguous copy, built from ``strip``-row pieces (cache friendly)."""
    out = np.empty(a.shape[::-1], dtype=a.dtype)
    for r0 in range(0, a.shape[0], strip):
        out[:, r0:r0 + strip] = a[r0:r0 + strip].T
    return out


# --------------------------------------------------------------------------- DequantizeLinear
def int4_tensor(values: np.ndarray, *, signed: bool, name: str | None = None) -> ir.TensorProtocol:
    """An INT4 (``signed``) or UINT4 ``onnx_ir`` tensor holding ``values`` in their shape.

    Values are packed row-major, two per byte, low nibble first (ONNX's int4 layout), so the
    tensor keeps half a byte per element in memory.
    """
    values = np.asarray(values)
    lo, hi = (-8, 7) if signed else (0, 15)
    if values.size and (values.min() < lo or values.max() > hi):
        raise ValueError(f"values outside [{lo}, {hi}] cannot be stored as "
                         f"{'INT4' if signed else 'UINT4'}")
    nibbles = (values.astype(np.int16) & 0xF).astype(np.uint8).reshape(-1)
    packed = pack_bits(nibbles, 4)
    dtype = ir.DataType.INT4 if signed else ir.DataType.UINT4
    return ir.PackedTensor(packed, dtype, shape=ir.Shape(values.shape), name=name)


def _typed_tensor(values: np.ndarray, bits: int, signed: bool, name: str | None
                  ) -> ir.TensorProtocol:
    if bits == 4:
        return int4_tensor(values, signed=signed, name=name)
    if bits == 8:
        return ir.tensor(values.astype(np.int8 if signed else np.uint8), name=name)
    raise ValueError(f"{bits}-bit values have no DequantizeLinear storage type here "
                     "(use 4 or 8 bits)")


def dq_arrays(blocks: BlockQuantized, scale_dtype: DTypeLike = np.float32, *,
              names: tuple[str, str, str] = ("", "", "")
              ) -> tuple[ir.TensorProtocol, ir.TensorProtocol, ir.TensorProtocol | None]:
    """Data, scale and zero-point tensors of a blocked ``DequantizeLinear(axis=0)``.

    Symmetric blocks (implied zero point ``2**(bits-1)``) are stored signed without zero
    points; asymmetric ones unsigned with unsigned zero points of the same type.

    Raises:
        ValueError: Float zero points (only MatMulNBits stores those) or 2-bit blocks.
    """
    bits = blocks.bits
    q = np.asarray(blocks.q, dtype=np.uint8)
    scales = ir.tensor(np.ascontiguousarray(blocks.scales, dtype=scale_dtype), name=names[1])
    if blocks.zero_points is None:
        data = _typed_tensor(q.astype(np.int16) - (1 << (bits - 1)), bits, True, names[0])
        return data, scales, None
    zp = np.asarray(blocks.zero_points)
    if np.issubdtype(zp.dtype, np.floating):
        raise ValueError("float zero points cannot be stored for DequantizeLinear; quantize "
                         "with integer zero points")
    data = _typed_tensor(q, bits, False, names[0])
    return data, scales, _typed_tensor(zp.astype(np.uint8), bits, False, names[2])


# --------------------------------------------------------------------------- Gather tables
def blocks_along_axis(table: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``table`` as a 2-D ``[dim(axis), rest]`` matrix whose rows run along ``axis``, and the
    shape of the moved table (to undo with :func:`_from_blocks_layout`)."""
    moved = np.moveaxis(table, axis, 0)
    return moved.reshape(moved.shape[0], -1), moved.shape


def _from_blocks_layout(matrix: np.ndarray, moved_shape: tuple[int, ...], axis: int,
                        rows: int | None = None) -> np.ndarray:
    shape = (rows if rows is not None else moved_shape[0], *moved_shape[1:])
    return np.moveaxis(matrix.reshape(shape), 0, axis)


@dataclasses.dataclass
class GatherTensors:
    """Constant inputs and attributes of one GatherBlockQuantized node."""

    data: ir.TensorProtocol
    scales: ir.TensorProtocol
    zero_points: ir.TensorProtocol | None
    bits: int
    block_size: int
    quantize_axis: int


def gather_block_arrays(blocks: BlockQuantized, table_shape: tuple[int, ...], axis: int,
                        scale_dtype: DTypeLike = np.float32, *, packed_uint8: bool = False,
                        names: tuple[str, str, str] = ("", "", "")) -> GatherTensors:
    """GatherBlockQuantized inputs for a table quantized along ``axis``.

    Args:
        blocks: The table as returned by quantizing :func:`blocks_along_axis` (its rows run
            along ``axis``).
        table_shape: Shape of the float table.
        axis: The quantize axis (non-negative).
        scale_dtype: Element type of the table (the op's output type).
        packed_uint8: uint8 storage with ``bits`` attribute (needed for 2 and 8 bits; the
            quantize axis must then be the last axis and its length a multiple of
            ``8 // bits``). Otherwise typed INT4/UINT4 data in the table's shape (4 bits).
    """
    bits = blocks.bits
    moved_shape = tuple(np.moveaxis(np.empty(table_shape, dtype=np.uint8), axis, 0).shape)
    k_blocks = blocks.scales.shape[0]
    q = _from_blocks_layout(blocks.q, moved_shape, axis)
    scales = _from_blocks_layout(np.asarray(blocks.scales, dtype=scale_dtype), moved_shape,
                                 axis, k_blocks)
    zp = blocks.zero_points
    if zp is not None and np.issubdtype(np.asarray(zp).dtype, np.floating):
        raise ValueError("float zero points cannot be stored for GatherBlockQuantized")
    scale_t = ir.tensor(np.ascontiguousarray(scales), name=names[1])
    if packed_uint8:
        if axis != len(table_shape) - 1:
            raise ValueError("uint8 GatherBlockQuantized data must be quantized along the "
                             "last axis")
        if table_shape[-1] % (8 // bits):
            raise ValueError(f"the last axis ({table_shape[-1]}) must be a multiple of "
                             f"{8 // bits} for {bits}-bit uint8 storage")
        data = ir.tensor(pack_bits(q, bits), name=names[0])
        zp_t = None
        if zp is not None:
            zps = _from_blocks_layout(np.asarray(zp, dtype=np.uint8), moved_shape, axis, k_blocks)
            zp_t = ir.tensor(pack_bits(zps, bits), name=names[2])
        return GatherTensors(data, scale_t, zp_t, bits, blocks.block_size, axis)
    if bits != 4:
        raise ValueError(f"typed GatherBlockQuantized storage is 4-bit only, got {bits} bits")
    if zp is None:
        data = int4_tensor(q.astype(np.int16) - 8, signed=True, name=names[0])
        return GatherTensors(data, scale_t, None, bits, blocks.block_size, axis)
    zps = _from_blocks_layout(np.asarray(zp, dtype=np.uint8), moved_shape, axis, k_blocks)
    return GatherTensors(int4_tensor(q, signed=False, name=names[0]), scale_t,
                         int4_tensor(zps, signed=False, name=names[2]), bits,
                         blocks.block_size, axis)


# --------------------------------------------------------------------------- shapes only
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Element type and shape of a tensor the layout functions above will produce."""

    dtype: ir.DataType
    shape: tuple[int, ...]


def _float_type(scale_dtype: DTypeLike) -> ir.DataType:
    return ir.DataType.from_numpy(np.dtype(scale_dtype))


def matmul_nbits_specs(k: int, n: int, bits: int, block_size: int, zero_points: str | None,
                       scale_dtype: DTypeLike = np.float32) -> list[TensorSpec | None]:
    """Specs of :func:`matmul_nbits_arrays`'s ``b, scales, zero_points``.

    ``zero_points`` is None (symmetric), ``"int"`` or ``"float"``.
    """
    kb = -(-k // block_size)
    zp = None
    if zero_points == "int":
        zp = TensorSpec(ir.DataType.UINT8, (n, -(-kb * bits // 8)))
    elif zero_points == "float":
        zp = TensorSpec(_float_type(scale_dtype), (n * kb,))
    return [TensorSpec(ir.DataType.UINT8, (n, kb, block_size * bits // 8)),
            TensorSpec(_float_type(scale_dtype), (n, kb)), zp]


def _typed(bits: int, signed: bool) -> ir.DataType:
    if bits == 4:
        return ir.DataType.INT4 if signed else ir.DataType.UINT4
    return ir.DataType.INT8 if signed else ir.DataType.UINT8


def dq_specs(k: int, n: int, bits: int, block_size: int, symmetric: bool,
             scale_dtype: DTypeLike = np.float32) -> list[TensorSpec | None]:
    """Specs of :func:`dq_arrays`'s ``data, scale, zero_point`` for a ``[K, N]`` weight."""
    kb = -(-k // block_size)
    data = TensorSpec(_typed(bits, symmetric), (k, n))
    scale = TensorSpec(_float_type(scale_dtype), (kb, n))
    return [data, scale, None if symmetric else TensorSpec(_typed(bits, False), (kb, n))]


def gather_block_specs(table_shape: tuple[int, ...], axis: int, bits: int, block_size: int,
                       symmetric: bool, scale_dtype: DTypeLike = np.float32, *,
                       packed_uint8: bool = False) -> list[TensorSpec | None]:
    """Specs of :func:`gather_block_arrays`'s ``data, scales, zero_points``."""
    shape = tuple(table_shape)
    kb = -(-shape[axis] // block_size)
    scale_shape = (*shape[:axis], kb, *shape[axis + 1:])
    scales = TensorSpec(_float_type(scale_dtype), scale_shape)
    if packed_uint8:
        per_byte = 8 // bits
        data = TensorSpec(ir.DataType.UINT8, (*shape[:-1], -(-shape[-1] // per_byte)))
        zp = TensorSpec(ir.DataType.UINT8, (*scale_shape[:-1], -(-scale_shape[-1] // per_byte)))
        return [data, scales, None if symmetric else zp]
    data = TensorSpec(_typed(4, symmetric), shape)
    return [data, scales, None if symmetric else TensorSpec(ir.DataType.UINT4, scale_shape)]
