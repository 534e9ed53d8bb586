"""onnxruntime's ``fusions.FusionGelu``: the exact (Erf) GELU written out in basic ops becomes one
``com.microsoft.Gelu`` node.

``Gelu(x) = x * 0.5 * (1 + erf(x / sqrt(2)))``. Exporters write it in several orders; matched,
around the ``Erf`` node (``x`` is the same tensor everywhere, constants may be on either side of
a commutative op)::

    erf = Erf(Div(x, sqrt(2)))   or   Erf(Mul(x, 1/sqrt(2)))
    y   = Mul(Add(erf, 1), Mul(x, 0.5))        # pattern 1
    y   = Mul(Mul(Add(erf, 1), x), 0.5)        # pattern 2
    y   = Mul(Mul(Add(erf, 1), 0.5), x)        # pattern 3

Constants are compared with a tolerance of 1e-4 (``sqrt(2)`` is stored rounded). The pattern is
fused only when no node outside it reads an intermediate tensor.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

from onnxquant.ort.fusions.fusion import ConsumerMap, Fusion, NodeMap
from onnxquant.ort.onnx_model import ONNXModel

__all__ = ["FusionGelu"]

MS_DOMAIN = "com.microsoft"
_TOLERANCE = 1e-4


class FusionGelu(Fusion):
    """Fuse Erf-based GELU sequences into ``com.microsoft.Gelu``.

    Args:
        model: The model, edited in place by :meth:`apply`.
    """

    def __init__(self, model: ONNXModel) -> None:
        super().__init__(model, "Gelu", "Erf")

    def fuse(self, node: onnx.NodeProto, input_name_to_nodes: ConsumerMap,
             output_name_to_node: NodeMap) -> None:
        """Fuse the GELU sequence around the ``Erf`` ``node`` if it matches."""
        scaled = self._erf_argument(node, output_name_to_node)
        add = self.sole_child(node, "Add", input_name_to_nodes)
        if scaled is None or add is None or not self._other_is(add, node.output[0], 1.0):
            return
        x, scale_node = scaled
        mul = self.sole_child(add, "Mul", input_name_to_nodes)
        if mul is None:
            return
        tail = self._tail(mul, add.output[0], x, input_name_to_nodes, output_name_to_node)
        if tail is None:
            return
        extra, output = tail
        pattern = [scale_node, node, add, mul, extra]
        if not self.is_safe_to_fuse_nodes(pattern, [output], input_name_to_nodes,
                                          output_name_to_node):
            return
        self.nodes_to_remove.extend(pattern)
        self.nodes_to_add.append(helper.make_node(
            "Gelu", [x], [output], name=self.create_unique_node_name(), domain=MS_DOMAIN))

    def _other_is(self, node: onnx.NodeProto, name: str, value: float) -> bool:
        other = self.other_input(node, name)
        return other is not None and self.is_constant_with_specified_value(
            other, value, _TOLERANCE)

    def _erf_argument(self, erf: onnx.NodeProto, output_name_to_node: NodeMap
                      ) -> tuple[str, onnx.NodeProto] | None:
        """``(x, node)`` when the Erf reads ``x / sqrt(2)`` written by ``node``."""
        parent = output_name_to_node.get(erf.input[0])
        if parent is None or len(parent.input) != 2:
            return None
        if parent.op_type == "Div" and self.is_constant_with_specified_value(
                parent.input[1], math.sqrt(2.0), _TOLERANCE):
            return parent.input[0], parent
        if parent.op_type == "Mul":
            for index in (0, 1):
                if self.is_constant_with_specified_value(
                        parent.input[index], 1.0 / math.sqrt(2.0), _TOLERANCE):
                    return parent.input[1 - index], parent
        return None

    def _tail(self, mul: onnx.NodeProto, add_out: str, x: str,
              input_name_to_nodes: ConsumerMap, output_name_to_node: NodeMap
              ) -> tuple[onnx.NodeProto, str] | None:
        """The other node that finishes ``x * 0.5 * (...)`` with ``Mul(Add(erf, 1), ...)``,
        and the tensor holding the result."""
        other = self.other_input(mul, add_out)
        if other is None:
            return None
        half = output_name_to_node.get(other)
        if half is not None and half.op_type == "Mul" and self._other_is(half, x, 0.5):
            return half, mul.output[0]  # pattern 1: 0.5 * x is the Mul's other input
        if other == x:
            last = self.sole_child(mul, "Mul", input_name_to_nodes)
            if last is None or not self._other_is(last, mul.output[0], 0.5):
                return None
            return last, last.output[0]  # pattern 2
        if self.is_constant_with_specified_value(other, 0.5, _TOLERANCE):
            last = self.sole_child(mul, "Mul", input_name_to_nodes)
            if last is None or self.other_input(last, mul.output[0]) != x:
                return None
            return last, last.output[0]  # pattern 3
        return None
