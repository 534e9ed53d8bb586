"""Rewrite a node around its block-quantized weight.

* MatMul, QOPERATOR: ``MatMulNBits(A, B, scales[, zero_points])`` (``com.microsoft``; attributes
  K, N, bits, block_size and accuracy_level when set). A B with unit leading dims gives MatMul a
  broadcast output rank that MatMulNBits lacks: when A's rank is known to be smaller than B's,
  an ``Unsqueeze`` restores it; when A's rank is unknown, an ``Add`` of a ``[1, ..., 1]`` zero
  broadcasts to exactly MatMul's output shape.
* MatMul, QDQ: ``DequantizeLinear(data, scale[, zero_point]; axis=K axis, block_size)`` in the
  weight's own shape feeding the unchanged MatMul (opset 21; the caller converts the model).
* ``reshape_unit_dims``: such a B is stored 2-D in both formats and the output goes through
  onnxruntime's shape-op chain (:mod:`._unit_dims`) instead.
* Gather: ``GatherBlockQuantized(data, indices, scales[, zero_points]; gather_axis,
  quantize_axis, block_size[, bits])`` (``com.microsoft``).

The new node replaces the old one and its output takes over the old output's name, type, shape
and consumers (graph outputs included). Quantized tensors of a weight shared by several nodes
with the same settings are stored once.

Lazy mode: the quantized initializers are ``onnx_ir.LazyTensor`` s whose dtype and shape are
known up front (:mod:`.packing` specs); the weight is quantized when the model is serialised,
once for its B/scales/zero-point group (a one-slot memo), and freed right after — so saving a
model holds one weight's results at a time, not all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxquant.core.graph import add_initializer
from onnxquant.core.model_io import default_opset
from onnxquant.core.names import UniqueNames
from onnxquant.core.qtypes import QuantFormat
from onnxquant.weight_only import _unit_dims, packing
from onnxquant.weight_only._select import Target
from onnxquant.weight_only.blocks import BlockQuantized

__all__ = ["WeightEmitter", "MS_DOMAIN"]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"

BlocksFn = Callable[[], BlockQuantized]
Build = Callable[[BlockQuantized], list]  # blocks -> [tensor | None, ...] in spec order


@dataclasses.dataclass
class _Group:
    """The quantized tensors of one weight, computed on demand."""

    make_blocks: BlocksFn
    build: Build
    specs: list[packing.TensorSpec | None]
    label: str

    def compute(self) -> list:
        tensors = self.build(self.make_blocks())
        for spec, tensor in zip(self.specs, tensors, strict=True):
            got = None if tensor is None else (tensor.dtype, tuple(tensor.shape))
            want = None if spec is None else (spec.dtype, spec.shape)
            if got != want:
                raise AssertionError(f"{self.label}: built {got}, expected {want}")
        return tensors


class _Memo:
    """One group's tensors, kept until each of them has been handed out once."""

    def __init__(self) -> None:
        self.group: _Group | None = None
        self.tensors: list = []
        self.pending: set[int] = set()

    def get(self, group: _Group, index: int) -> ir.TensorProtocol:
        if self.group is not group:
            self.group, self.tensors = None, []  # free the previous group first
            self.tensors = group.compute()
            self.group = group
            self.pending = {i for i, t in enumerate(self.tensors) if t is not None}
        tensor = self.tensors[index]
        self.pending.discard(index)
        if not self.pending:
            self.group, self.tensors = None, []
        return tensor


def _graph_of(value: ir.Value, fallback: ir.Graph) -> ir.Graph:
    graph = value.graph
    return graph if isinstance(graph, ir.Graph) else fallback


class WeightEmitter:
    """Emits the quantized form of each target into ``model`` (in place).

    Args:
        model: The model to change.
        fmt: QOPERATOR (MatMulNBits) or QDQ (DequantizeLinear) for MatMul nodes.
        lazy: Quantize when the model is serialised instead of now.
        reshape_unit_dims: Store MatMul weights with unit leading dims 2-D and reshape the
            output (from opset 12; below, the default rewrite is used).
    """

    def __init__(self, model: ir.Model, fmt: QuantFormat, *, lazy: bool = False,
                 reshape_unit_dims: bool = False) -> None:
        self.model = model
        self.format = fmt
        self.lazy = lazy
        self.names = UniqueNames(model)
        self.opset = default_opset(model)
        self._shared: dict[Hashable, list[ir.Value | None]] = {}
        self._weights: dict[int, tuple[ir.Value, ir.Graph]] = {}
        self._memo = _Memo()
        self.uses_ms_domain = False
        self.uses_int4 = False
        self.reshape_unit_dims = reshape_unit_dims and self.opset >= _unit_dims.MIN_OPSET

    # -- building blocks ------------------------------------------------------------------
    def _initializer(self, graph: ir.Graph, stem: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = add_initializer(graph, self.names.new(stem), tensor)
        if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            self.uses_int4 = True
        return value

    def has(self, key: Hashable) -> bool:
        """Whether the quantized tensors for ``key`` exist already (a shared weight)."""
        return key in self._shared

    def _constants(self, target: Target, key: Hashable, make_blocks: BlocksFn,
                   stems: list[str], specs: list[packing.TensorSpec | None], build: Build,
                   now: bool) -> list[ir.Value | None]:
        """The initializers of ``key``, created once (lazily or now)."""
        graph = _graph_of(target.weight, target.node.graph or self.model.graph)
        self._weights[id(target.weight)] = (target.weight, graph)
        if key in self._shared:
            return self._shared[key]
        group = _Group(make_blocks, build, specs, f"weight '{target.weight.name}'")
        if self.lazy and not now:
            tensors: list = [
                None if spec is None else ir.LazyTensor(
                    functools.partial(self._memo.get, group, i), spec.dtype,
                    ir.Shape(spec.shape))
                for i, spec in enumerate(specs)]
        else:
            tensors = group.compute()
        values = [None if t is None else self._initializer(graph, stem, t)
                  for stem, t in zip(stems, tensors, strict=True)]
        self._shared[key] = values
        return values

    def _replace(self, old: ir.Node, new_nodes: list[ir.Node], new_out: ir.Value) -> None:
        graph = old.graph
        assert graph is not None
        ir.convenience.replace_nodes_and_values(
            graph, old, [old], new_nodes, [old.outputs[0]], [new_out])

    @staticmethod
    def _scale_dtype(target: Target) -> np.dtype:
        return np.dtype(target.weight.const_value.dtype.numpy())  # type: ignore[union-attr]

    @staticmethod
    def _zero_points(target: Target, fmt: QuantFormat) -> str | None:
        from onnxquant.weight_only.config import WeightOnlyAlgorithm

        s = target.settings
        if s.symmetric:
            return None
        float_zp = (s.algorithm is WeightOnlyAlgorithm.HQQ and target.op_type == "MatMul"
                    and fmt is QuantFormat.QOPERATOR)
        return "float" if float_zp else "int"

    # -- MatMul ---------------------------------------------------------------------------
    def matmul(self, target: Target, make_blocks: BlocksFn, key: Hashable, *,
               now: bool = False) -> str:
        """Rewrite a MatMul; returns the op type that now reads the weight.

        ``make_blocks()`` quantizes the weight; ``now`` builds its tensors at once even in
        lazy mode (e.g. GPTQ blocks that are already computed).
        """
        if self.format is QuantFormat.QDQ:
            self._matmul_qdq(target, make_blocks, key, now)
            return "DequantizeLinear"
        self._matmul_nbits(target, make_blocks, key, now)
        return "MatMulNBits"

    def _matmul_nbits(self, target: Target, make_blocks: BlocksFn, key: Hashable,
                      now: bool) -> None:
        node, stem = target.node, target.weight.name or "B"
        bits, block = target.settings.bits, target.block_size
        k, n = target.shape[-2:]
        dtype = self._scale_dtype(target)
        specs = packing.matmul_nbits_specs(k, n, bits, block,
                                           self._zero_points(target, self.format), dtype)

        def build(blocks: BlockQuantized) -> list:
            arrays = packing.matmul_nbits_arrays(blocks, dtype)
            zp = None if arrays.zero_points is None else ir.tensor(arrays.zero_points)
            return [ir.tensor(arrays.b), ir.tensor(arrays.scales), zp]

        b, scales, zp = self._constants(
            target, key, make_blocks,
            [f"{stem}_Q{bits}", f"{stem}_scales", f"{stem}_zero_points"], specs, build, now)
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block}
        if target.settings.accuracy_level:
            attrs["accuracy_level"] = target.settings.accuracy_level
        inputs = [node.inputs[0], b, scales] + ([zp] if zp is not None else [])
        new = ir.node("MatMulNBits", inputs, attributes=attrs, domain=MS_DOMAIN,
                      name=node.name)
        self.uses_ms_domain = True
        out = new.outputs[0]
        out.name = self.names.new(f"{node.name or stem}_nbits")
        nodes = [new]
        if self.reshape_unit_dims:
            out, extra = self._output_reshape(target, out)
            nodes += extra
        elif len(target.shape) > 2:
            out, extra = self._restore_rank(node, out, len(target.shape))
            nodes += extra
        self._replace(node, nodes, out)

    def _output_reshape(self, target: Target, product: ir.Value
                        ) -> tuple[ir.Value, list[ir.Node]]:
        """onnxruntime's shape-op chain after a product over the weight stored 2-D."""
        node, rank_b = target.node, len(target.shape)
        a = node.inputs[0]
        if a is None or not _unit_dims.needs_output_reshape(a, rank_b):
            return product, []
        graph = node.graph or self.model.graph
        return _unit_dims.output_reshape(
            a, product, rank_b, target.shape[-1], stem=node.name or "matmul",
            constant=lambda stem, array: self._initializer(graph, stem, ir.tensor(array)),
            fresh=self.names.new)

    def _restore_rank(self, node: ir.Node, out: ir.Value, rank_b: int
                      ) -> tuple[ir.Value, list[ir.Node]]:
        a = node.inputs[0]
        a_rank = len(a.shape) if a is not None and a.shape is not None else None
        if a_rank is not None and a_rank >= rank_b:
            return out, []
        graph = node.graph or self.model.graph
        stem = node.name or "matmul"
        if a_rank is not None:
            axes = list(range(rank_b - a_rank))
            if self.opset >= 13:
                axes_v = self._initializer(graph, f"{stem}_unsqueeze_axes",
                                           ir.tensor(np.array(axes, np.int64)))
                extra = ir.node("Unsqueeze", [out, axes_v], name=self.names.new(
                    f"{stem}_unsqueeze"))
            else:
                extra = ir.node("Unsqueeze", [out], attributes={"axes": axes},
                                name=self.names.new(f"{stem}_unsqueeze"))
        else:
            out_type = node.outputs[0].dtype
            dtype = np.dtype(out_type.numpy()) if out_type is not None else np.float32
            zero = self._initializer(graph, f"{stem}_broadcast_zero",
                                     ir.tensor(np.zeros([1] * rank_b, dtype)))
            extra = ir.node("Add", [out, zero], name=self.names.new(f"{stem}_broadcast"))
        result = extra.outputs[0]
        result.name = self.names.new(f"{stem}_out")
        return result, [extra]

    def _matmul_qdq(self, target: Target, make_blocks: BlocksFn, key: Hashable,
                    now: bool) -> None:
        node, stem = target.node, target.weight.name or "B"
        shape = target.shape[-2:] if self.reshape_unit_dims else target.shape
        lead = shape[:-2]
        bits, block = target.settings.bits, target.block_size
        dtype = self._scale_dtype(target)
        specs = packing.dq_specs(shape[-2], shape[-1], bits, block, target.settings.symmetric,
                                 dtype)
        specs = [None if s is None else dataclasses.replace(s, shape=(*lead, *s.shape))
                 for s in specs]

        def build(blocks: BlockQuantized) -> list:
            tensors = list(packing.dq_arrays(blocks, dtype))
            if lead:  # keep B's own shape: the MatMul stays exactly as it was
                tensors = [None if t is None else _reshaped(t, (*lead, *t.shape))
                           for t in tensors]
            return tensors

        data, scale, zp = self._constants(
            target, key, make_blocks,
            [f"{stem}_q{bits}", f"{stem}_scale", f"{stem}_zero_point"], specs, build, now)
        inputs = [data, scale] + ([zp] if zp is not None else [])
        dq = ir.node("DequantizeLinear", inputs,
                     attributes={"axis": len(shape) - 2, "block_size": block},
                     name=self.names.new(f"{node.name or stem}_dq"))
        out = dq.outputs[0]
        out.name = self.names.new(f"{stem}_dequantized")
        out.type = ir.TensorType(target.weight.const_value.dtype)  # type: ignore[union-attr]
        out.shape = ir.Shape(shape)
        graph = node.graph or self.model.graph
        if len(shape) == len(target.shape):
            graph.insert_before(node, dq)
            node.replace_input_with(1, out)
            return
        matmul = ir.node("MatMul", [node.inputs[0], out], name=node.name)
        product = matmul.outputs[0]
        product.name = self.names.new(f"{node.name or stem}_product")
        result, extra = self._output_reshape(target, product)
        self._replace(node, [dq, matmul, *extra], result)

    # -- Gather ---------------------------------------------------------------------------
    def gather(self, target: Target, make_blocks: BlocksFn, key: Hashable, *,
               now: bool = False) -> str:
        """Rewrite a Gather; returns ``"GatherBlockQuantized"``."""
        node, stem = target.node, target.weight.name or "data"
        shape, bits, block = target.shape, target.settings.bits, target.block_size
        dtype = self._scale_dtype(target)
        specs = packing.gather_block_specs(shape, target.axis, bits, block,
                                           target.settings.symmetric, dtype,
                                           packed_uint8=target.packed_uint8)

        def build(blocks: BlockQuantized) -> list:
            t = packing.gather_block_arrays(blocks, shape, target.axis, dtype,
                                            packed_uint8=target.packed_uint8)
            return [t.data, t.scales, t.zero_points]

        data, scales, zp = self._constants(
            target, key, make_blocks,
            [f"{stem}_q{bits}", f"{stem}_scales", f"{stem}_zero_points"], specs, build, now)
        attrs: dict[str, Any] = {
            "gather_axis": node.attributes.get_int("axis", 0) % len(shape),
            "quantize_axis": target.axis,
            "block_size": block,
        }
        if target.packed_uint8:
            attrs["bits"] = bits
        inputs = [data, node.inputs[1], scales] + ([zp] if zp is not None else [])
        new = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN,
                      name=node.name)
        self.uses_ms_domain = True
        out = new.outputs[0]
        out.name = self.names.new(f"{node.name or stem}_gbq")
        self._replace(node, [new], out)
        return "GatherBlockQuantized"

    # -- bookkeeping ----------------------------------------------------------------------
    def finish(self) -> list[str]:
        """Declare the domains/IR version the new nodes need and drop float weights no node
        reads any more; returns the names of the removed initializers."""
        if self.uses_ms_domain:
            self.model.opset_imports.setdefault(MS_DOMAIN, 1)
        if self.uses_int4 or self.opset >= 21:
            self.model.ir_version = max(self.model.ir_version or 0, 10)
        removed = []
        for value, graph in self._weights.values():
            if value.uses() or value.is_graph_output() or value.is_graph_input():
                continue
            name = value.name or ""
            if graph.initializers.get(name) is value:
                graph.initializers.pop(name)
                removed.append(name)
        return removed


def _reshaped(tensor: ir.TensorProtocol, shape: tuple[int, ...]) -> ir.TensorProtocol:
    """The same tensor data with unit dims added in front."""
    if isinstance(tensor, ir.PackedTensor):
        return ir.PackedTensor(tensor.raw, tensor.dtype, shape=ir.Shape(shape))
    return ir.tensor(tensor.numpy().reshape(shape))
