"""onnxruntime's ``fusions.FusionLayerNormalization``: layer normalization written out in basic
ops becomes one ``LayerNormalization`` node (ONNX opset 17 and later).

Matched, starting at the first ``ReduceMean``::

    mean = ReduceMean(x, axes)                 # the last axes of x, keepdims=1
    d    = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2) or Mul(d, d), axes)
    y    = Div(d, Sqrt(Add(var, epsilon)))
    out  = Add(Mul(y, scale), bias)            # the Add is optional

becomes ``LayerNormalization(x, scale[, bias], axis=first reduced axis, epsilon)``. Fused only
when the reduced axes are the last ones, ``epsilon`` is a constant scalar, ``scale`` (and
``bias``) have as many elements as the normalized part of ``x`` and no node outside the pattern
reads an intermediate tensor.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

from onnxquant.ort.fusions.fusion import ConsumerMap, Fusion, NodeMap
from onnxquant.ort.onnx_model import ONNXModel

__all__ = ["FusionLayerNormalization"]


class FusionLayerNormalization(Fusion):
    """Fuse ReduceMean-based layer normalization into ``LayerNormalization``.

    Args:
        model: The model, edited in place by :meth:`apply`.
    """

    def __init__(self, model: ONNXModel) -> None:
        super().__init__(model, "LayerNormalization", "ReduceMean")

    def fuse(self, node: onnx.NodeProto, input_name_to_nodes: ConsumerMap,
             output_name_to_node: NodeMap) -> None:
        """Fuse the layer normalization that starts at the ``ReduceMean`` ``node``."""
        x = node.input[0]
        axis = self._axis(node, x)
        sub = self.sole_child(node, "Sub", input_name_to_nodes)
        if axis is None or sub is None or list(sub.input) != [x, node.output[0]]:
            return
        middle = self._variance_chain(node, sub, input_name_to_nodes)
        if middle is None:
            return
        epsilon, div = middle[-1]
        chain = [node, sub, *middle[:-1], div]
        affine = self._affine(div, x, axis, input_name_to_nodes)
        if affine is None:
            return
        nodes, inputs = affine
        pattern = chain + nodes
        output = pattern[-1].output[0]
        if not self.is_safe_to_fuse_nodes(pattern, [output], input_name_to_nodes,
                                          output_name_to_node):
            return
        self.nodes_to_remove.extend(pattern)
        self.nodes_to_add.append(helper.make_node(
            "LayerNormalization", [x, *inputs], [output], name=self.create_unique_node_name(),
            axis=axis, epsilon=epsilon))

    def _axis(self, reduce_mean: onnx.NodeProto, x: str) -> int | None:
        if self.get_node_attribute(reduce_mean, "keepdims") == 0:
            return None
        axes = self.reduce_axes(reduce_mean)
        shape = self.tensor_shape(x)
        return None if axes is None else self.trailing_axis(
            axes, None if shape is None else len(shape))

    def _variance_chain(self, mean: onnx.NodeProto, sub: onnx.NodeProto,
                        input_name_to_nodes: ConsumerMap) -> list | None:
        """``[square, ReduceMean, Add, Sqrt, (epsilon, Div)]`` after ``sub``, or None."""
        d = sub.output[0]
        children = input_name_to_nodes.get(d, [])
        square = next((c for c in children if self._is_square(c, d)), None)
        div = next((c for c in children if c.op_type == "Div" and c.input[0] == d), None)
        if len(children) != 2 or square is None or div is None:
            return None
        variance = self.sole_child(square, "ReduceMean", input_name_to_nodes)
        if variance is None or self.reduce_axes(variance) != self.reduce_axes(mean) \
                or self.get_node_attribute(variance, "keepdims") == 0:
            return None
        add = self.sole_child(variance, "Add", input_name_to_nodes)
        sqrt = None if add is None else self.sole_child(add, "Sqrt", input_name_to_nodes)
        if add is None or sqrt is None or list(div.input) != [d, sqrt.output[0]]:
            return None
        epsilon = self._scalar(self.other_input(add, variance.output[0]))
        if epsilon is None:
            return None
        return [square, variance, add, sqrt, (epsilon, div)]

    def _is_square(self, node: onnx.NodeProto, d: str) -> bool:
        if node.op_type == "Mul":
            return list(node.input) == [d, d]
        return node.op_type == "Pow" and node.input[0] == d \
            and self.is_constant_with_specified_value(node.input[1], 2.0)

    def _scalar(self, name: str | None) -> float | None:
        value = None if name is None else self.model.get_constant_value(name)
        if value is None or value.size != 1:
            return None
        number = float(value.reshape(()))
        return number if math.isfinite(number) and number >= 0 else None

    def _affine(self, div: onnx.NodeProto, x: str, axis: int,
                input_name_to_nodes: ConsumerMap) -> tuple[list, list[str]] | None:
        """``([Mul, Add?], [scale, bias?])`` after the Div, or None."""
        mul = self.sole_child(div, "Mul", input_name_to_nodes)
        scale = None if mul is None else self.other_input(mul, div.output[0])
        if mul is None or scale is None or not self._fits(scale, x, axis):
            return None
        add = self.sole_child(mul, "Add", input_name_to_nodes)
        bias = None if add is None else self.other_input(add, mul.output[0])
        if add is None or bias is None or not self._fits(bias, x, axis):
            return [mul], [scale]
        return [mul, add], [scale, bias]

    def _fits(self, name: str, x: str, axis: int) -> bool:
        """Whether ``name`` holds one value per element of the normalized part of ``x``."""
        shape, x_shape = self.tensor_shape(name), self.tensor_shape(x)
        if shape is None or x_shape is None or len(shape) > -axis:
            return False
        normalized = x_shape[axis:]
        if None in shape or None in normalized:
            return False
        return shape == normalized[len(normalized) - len(shape):] \
            and math.prod(d or 0 for d in shape) == math.prod(d or 0 for d in normalized)
