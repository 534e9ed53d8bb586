"""Byte layouts of block-quantized weights, checked against deliberately simple references that
walk the packed bytes one by one (no numpy vectorisation, no shared code with packing.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnxquant.weight_only import packing
from onnxquant.weight_only.blocks import BlockQuantized

BITS = (2, 4, 8)


def _random_blocks(k: int, n: int, bits: int, block: int, zp: str | None,
                   seed: int = 0) -> BlockQuantized:
    rng = np.random.default_rng(seed)
    kb = -(-k // block)
    q = rng.integers(0, 1 << bits, size=(k, n), dtype=np.uint8)
    q[0, 0], q[-1, -1] = 0, (1 << bits) - 1  # both ends of the grid
    scales = rng.uniform(-0.5, 0.5, size=(kb, n)).astype(np.float32)
    zero_points = None
    if zp == "int":
        zero_points = rng.integers(0, 1 << bits, size=(kb, n), dtype=np.uint8)
    elif zp == "float":
        zero_points = rng.uniform(0, (1 << bits) - 1, size=(kb, n)).astype(np.float32)
    return BlockQuantized(q, scales, zero_points, bits, block)


# --------------------------------------------------------------------------- references
def _ref_matmul_nbits(b, scales, zp, k, n, bits, block) -> np.ndarray:
    """W[k, n] from MatMulNBits tensors, one byte and one sub-byte field at a time."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    kb = -(-k // block)
    w = np.zeros((k, n), np.float32)
    for col in range(n):
        for blk in range(kb):
            if zp is None:
                z = float(1 << (bits - 1))
            elif zp.dtype == np.uint8:
                zbyte = int(zp[col, (blk * bits) // 8])
                z = float((zbyte >> ((blk % per_byte) * bits)) & mask)
            else:
                z = float(zp[col * kb + blk])
            for byte_index in range(b.shape[2]):
                byte = int(b[col, blk, byte_index])
                for j in range(per_byte):
                    row = blk * block + byte_index * per_byte + j
                    if row < k:
                        v = (byte >> (j * bits)) & mask
                        w[row, col] = (v - z) * scales[col, blk]
    return w


def _ref_int4(raw: bytes, count: int, signed: bool) -> list[int]:
    """ONNX int4 storage: element i in byte i // 2, low nibble first."""
    out = []
    for i in range(count):
        nibble = (raw[i // 2] >> (4 * (i % 2))) & 0xF
        out.append(nibble - 16 if signed and nibble >= 8 else nibble)
    return out


def _ref_unpack_last(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 packed along the last axis (GatherBlockQuantized), one byte at a time."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    rows = packed.reshape(-1, packed.shape[-1])
    out = np.zeros((rows.shape[0], count), np.int64)
    for r in range(rows.shape[0]):
        for i in range(count):
            out[r, i] = (int(rows[r, i // per_byte]) >> ((i % per_byte) * bits)) & mask
    return out.reshape(*packed.shape[:-1], count)


# --------------------------------------------------------------------------- MatMulNBits
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("zp", [None, "int", "float"])
@pytest.mark.parametrize(("k", "block"), [(45, 16), (64, 32), (7, 16), (100, 64)])
def test_matmul_nbits_layout_matches_byte_walk(bits, zp, k, block):
    blocks = _random_blocks(k, 5, bits, block, zp, seed=bits * k)
    t = packing.matmul_nbits_arrays(blocks)
    kb = -(-k // block)
    assert t.b.dtype == np.uint8 and t.b.shape == (5, kb, block * bits // 8)
    assert t.scales.shape == (5, kb)
    if zp == "int":
        assert t.zero_points.shape == (5, -(-kb * bits // 8)) and t.zero_points.dtype == np.uint8
    elif zp == "float":
        assert t.zero_points.shape == (5 * kb,) and t.zero_points.dtype == np.float32
    else:
        assert t.zero_points is None
    ref = _ref_matmul_nbits(t.b, t.scales, t.zero_points, k, 5, bits, block)
    np.testing.assert_array_equal(ref, blocks.dequantize())


@pytest.mark.parametrize("bits", BITS)
def test_matmul_nbits_padding_dequantizes_to_zero(bits):
    blocks = _random_blocks(20, 3, bits, 16, "int")
    t = packing.matmul_nbits_arrays(blocks)
    full = _ref_matmul_nbits(t.b, t.scales, t.zero_points, 32, 3, bits, 16)
    assert not full[20:].any()  # rows 20..31 are padding


def test_matmul_nbits_float16_scales():
    blocks = _random_blocks(32, 4, 4, 16, "float")
    t = packing.matmul_nbits_arrays(blocks, np.float16)
    assert t.scales.dtype == np.float16 and t.zero_points.dtype == np.float16


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=(3, 13), dtype=np.uint8)
    packed = packing.pack_bits(values, bits)
    assert packed.shape == (3, -(-13 * bits // 8))
    np.testing.assert_array_equal(packing.unpack_bits(packed, bits, 13), values)
    np.testing.assert_array_equal(_ref_unpack_last(packed, bits, 13), values)


def test_pack_bits_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        packing.pack_bits(np.zeros(4, np.uint8), 3)


# --------------------------------------------------------------------------- int4 / DQ
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 3, 3)])
def test_int4_tensor_storage(signed, shape):
    lo, hi = (-8, 7) if signed else (0, 15)
    values = np.random.default_rng(0).integers(lo, hi + 1, size=shape)
    values.flat[0], values.flat[-1] = lo, hi
    tensor = packing.int4_tensor(values, signed=signed, name="t")
    assert tensor.dtype == (ir.DataType.INT4 if signed else ir.DataType.UINT4)
    assert tuple(tensor.shape) == shape
    assert _ref_int4(tensor.tobytes(), values.size, signed) == values.reshape(-1).tolist()
    proto = ir.serde.serialize_tensor(tensor)
    np.testing.assert_array_equal(numpy_helper.to_array(proto).astype(np.int64), values)


def test_int4_tensor_rejects_out_of_range():
    with pytest.raises(ValueError, match="INT4"):
        packing.int4_tensor(np.array([8]), signed=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dq_arrays_dequantize_like_blocks(bits, symmetric):
    blocks = _random_blocks(37, 6, bits, 16, None if symmetric else "int")
    data, scale, zp = packing.dq_arrays(blocks)
    assert tuple(data.shape) == (37, 6) and tuple(scale.shape) == (3, 6)
    assert (zp is None) == symmetric
    signed = symmetric
    expect = {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4,
              (8, True): ir.DataType.INT8, (8, False): ir.DataType.UINT8}[(bits, signed)]
    assert data.dtype == expect
    q = np.array(numpy_helper.to_array(ir.serde.serialize_tensor(data)), dtype=np.float32)
    z = 0.0 if zp is None else np.array(
        numpy_helper.to_array(ir.serde.serialize_tensor(zp)), np.float32)
    rows = np.arange(37) // 16
    zr = z if zp is None else z[rows]
    deq = (q - zr) * scale.numpy()[rows]
    np.testing.assert_array_equal(deq, blocks.dequantize())


def test_dq_arrays_refuse_float_zero_points_and_2_bits():
    with pytest.raises(ValueError, match="float zero points"):
        packing.dq_arrays(_random_blocks(16, 2, 4, 16, "float"))
    with pytest.raises(ValueError, match="2-bit"):
        packing.dq_arrays(_random_blocks(16, 2, 2, 16, None))


# --------------------------------------------------------------------------- Gather
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1])
def test_gather_typed_int4_layout(symmetric, axis):
    table_shape = (9, 40)
    kq = table_shape[axis]
    cols = table_shape[1 - axis]
    blocks = _random_blocks(kq, cols, 4, 16, None if symmetric else "int")
    t = packing.gather_block_arrays(blocks, table_shape, axis)
    assert tuple(t.data.shape) == table_shape
    scale_shape = list(table_shape)
    scale_shape[axis] = -(-kq // 16)
    assert tuple(t.scales.shape) == tuple(scale_shape)
    q = np.array(_ref_int4(t.data.tobytes(), 9 * 40, symmetric), np.float32).reshape(table_shape)
    if symmetric:
        z = np.zeros(scale_shape, np.float32)
    else:
        z = np.array(_ref_int4(t.zero_points.tobytes(), int(np.prod(scale_shape)), False),
                     np.float32).reshape(scale_shape)
    s = t.scales.numpy()
    deq = np.empty(table_shape, np.float32)
    for i in range(9):
        for j in range(40):
            idx = (i // 16, j) if axis == 0 else (i, j // 16)
            deq[i, j] = (q[i, j] - z[idx]) * s[idx]
    expected = blocks.dequantize() if axis == 0 else blocks.dequantize().T
    np.testing.assert_array_equal(deq, expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_uint8_layout(bits, symmetric):
    table_shape = (5, 48)
    blocks = _random_blocks(48, 5, bits, 16, None if symmetric else "int")  # rows along axis 1
    t = packing.gather_block_arrays(blocks, table_shape, 1, packed_uint8=True)
    q = _ref_unpack_last(t.data.numpy(), bits, 48)
    s = t.scales.numpy()
    assert s.shape == (5, 3)
    if symmetric:
        z = np.full((5, 3), 1 << (bits - 1))
    else:
        z = _ref_unpack_last(t.zero_points.numpy(), bits, 3)
    deq = np.empty(table_shape, np.float32)
    for i in range(5):
        for j in range(48):
            deq[i, j] = (q[i, j] - z[i, j // 16]) * s[i, j // 16]
    np.testing.assert_array_equal(deq, blocks.dequantize().T)


def test_gather_uint8_needs_last_axis_and_whole_bytes():
    blocks = _random_blocks(9, 40, 2, 16, None)
    with pytest.raises(ValueError, match="last axis"):
        packing.gather_block_arrays(blocks, (9, 40), 0, packed_uint8=True)
    blocks = _random_blocks(6, 3, 2, 16, None)
    with pytest.raises(ValueError, match="multiple of 4"):
        packing.gather_block_arrays(blocks, (3, 6), 1, packed_uint8=True)


# --------------------------------------------------------------------------- specs
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("zp", [None, "int", "float"])
def test_specs_match_built_tensors(bits, zp):
    blocks = _random_blocks(45, 7, bits, 16, zp)
    t = packing.matmul_nbits_arrays(blocks)
    specs = packing.matmul_nbits_specs(45, 7, bits, 16, zp)
    for spec, array in zip(specs, (t.b, t.scales, t.zero_points), strict=True):
        assert (spec is None) == (array is None)
        if spec is not None:
            assert spec.shape == array.shape
            assert spec.dtype == ir.DataType.from_numpy(array.dtype)
    if bits != 2 and zp != "float":
        sym = zp is None
        built = packing.dq_arrays(blocks)
        for spec, tensor in zip(packing.dq_specs(45, 7, bits, 16, sym), built, strict=True):
            assert (spec is None) == (tensor is None)
            if spec is not None:
                assert (spec.dtype, spec.shape) == (tensor.dtype, tuple(tensor.shape))
    if zp != "float" and bits != 2:  # 45 values do not fill whole 2-bit bytes
        sym = zp is None
        built = packing.gather_block_arrays(blocks, (7, 45), 1, packed_uint8=bits != 4)
        specs = packing.gather_block_specs((7, 45), 1, bits, 16, sym, packed_uint8=bits != 4)
        for spec, tensor in zip(specs, (built.data, built.scales, built.zero_points),
                                strict=True):
            assert (spec is None) == (tensor is None)
            if spec is not None:
                assert (spec.dtype, spec.shape) == (tensor.dtype, tuple(tensor.shape))


def test_int4_tensor_serialises_as_onnx_int4():
    tensor = packing.int4_tensor(np.array([[-8, 7, 1]]), signed=True, name="w")
    proto = ir.serde.serialize_tensor(tensor)
    assert proto.data_type == onnx.TensorProto.INT4
    assert len(proto.raw_data) == 2


def test_matmul_nbits_rejects_blocks_that_end_inside_a_byte():
    with pytest.raises(ValueError, match="whole bytes"):
        packing.matmul_nbits_arrays(_random_blocks(12, 3, 2, 6, None))
