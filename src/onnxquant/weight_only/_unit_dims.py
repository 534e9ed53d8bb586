"""MatMul's output shape for a weight stored 2-D, computed in the graph (onnxruntime's layout).

``MatMul(A, B)`` with ``B`` of shape ``[1, ..., 1, K, N]`` (rank ``r``) yields
``[1] * max(r - max(rank(A), 2), 0) + A.shape[:-1] + [N]``; with ``B`` squeezed to ``[K, N]``
the product has ``A.shape[:-1] + [N]``. When ``WeightOnlyConfig.reshape_unit_dims`` is set (the
ORT-compatible layer sets it), the missing leading ones are restored by a chain of shape ops
that works for any rank of ``A``, 1-D included: ``Shape``, ``Shape``, ``Gather`` (the rank),
``Max``/``Sub``/``Max`` (how many ones), ``Reshape``/``ConstantOfShape`` (the ones), ``Sub``/
``Reshape``/``Slice`` (``A.shape[:-1]``), ``Concat`` and the final ``Reshape``. Integer ``Max``
needs opset 12.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["MIN_OPSET", "needs_output_reshape", "output_reshape"]

MIN_OPSET = 12  # Max over int64

Constant = Callable[[str, np.ndarray], ir.Value]
Fresh = Callable[[str], str]


def needs_output_reshape(a: ir.Value | None, rank_b: int) -> bool:
    """Whether the 2-D product lacks leading ones (A's rank is below B's, or unknown)."""
    if rank_b <= 2:
        return False
    return a is None or a.shape is None or len(a.shape) < rank_b


def _op(nodes: list[ir.Node], fresh: Fresh, op: str, inputs: list[ir.Value], stem: str,
        **attrs: Any) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs or None, name=fresh(f"{stem}_{op.lower()}"))
    node.outputs[0].name = fresh(f"{stem}_{op.lower()}_out")
    nodes.append(node)
    return node.outputs[0]


def output_reshape(a: ir.Value, product: ir.Value, rank_b: int, n: int, *, stem: str,
                   constant: Constant, fresh: Fresh) -> tuple[ir.Value, list[ir.Node]]:
    """Nodes reshaping the 2-D-weight ``product`` of ``a`` to MatMul's broadcast shape.

    Args:
        a: The MatMul's activation input.
        product: The output of the MatMul (or MatMulNBits) over the squeezed weight.
        rank_b: Rank of the original weight.
        n: Output columns (the weight's last dimension).
        stem: Prefix of the new names.
        constant: Makes an int64 initializer ``(stem, array) -> value``.
        fresh: Makes a new unique name from a stem.

    Returns:
        The reshaped value and the nodes computing it, in order.
    """
    def const(suffix: str, values: int | list[int]) -> ir.Value:
        return constant(f"{stem}_{suffix}", np.array(values, np.int64))

    nodes: list[ir.Node] = []
    one_vec = const("one_vec", [1])
    shape = _op(nodes, fresh, "Shape", [a], stem)
    rank_vec = _op(nodes, fresh, "Shape", [shape], stem)
    rank = _op(nodes, fresh, "Gather", [rank_vec, const("zero", 0)], stem)
    # MatMul treats a 1-D A as rank 2 when it broadcasts against B.
    rank_eff = _op(nodes, fresh, "Max", [rank, const("two", 2)], stem)
    missing = _op(nodes, fresh, "Sub", [const("rank_b", rank_b), rank_eff], stem)
    missing = _op(nodes, fresh, "Max", [missing, const("zero_count", 0)], stem)
    missing_vec = _op(nodes, fresh, "Reshape", [missing, one_vec], stem)
    ones = _op(nodes, fresh, "ConstantOfShape", [missing_vec], stem,
               value=ir.tensor(np.array([1], np.int64)))
    batch_rank = _op(nodes, fresh, "Sub", [rank, const("one", 1)], stem)
    batch_end = _op(nodes, fresh, "Reshape", [batch_rank, one_vec], stem)
    start = const("start", [0])
    batch = _op(nodes, fresh, "Slice", [shape, start, batch_end, start], stem)
    target = _op(nodes, fresh, "Concat", [ones, batch, const("n", [n])], stem, axis=0)
    out = _op(nodes, fresh, "Reshape", [product, target], stem)
    return out, nodes
