"""onnxruntime's ``execution_providers.qnn.fusion_lpnorm.FusionLpNormalization``: L2
normalization written out in basic ops becomes one ``LpNormalization(p=2)`` node.

Matched, starting at the ``ReduceL2``::

    norm = ReduceL2(x, axes=[a], keepdims=1)
    y    = Div(x, Expand(Clip(norm, min=epsilon), shape))     # the Expand is optional

becomes ``LpNormalization(x, axis=a, p=2)``. ``LpNormalization`` has no epsilon: the result
differs only where the norm is below ``epsilon``, so the Clip's ``min`` must be a constant no
larger than 1e-6 (PyTorch's ``F.normalize`` uses 1e-12) and its ``max`` must be absent.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxquant.ort.fusions.fusion import ConsumerMap, Fusion, NodeMap
from onnxquant.ort.onnx_model import ONNXModel

__all__ = ["FusionLpNormalization"]

_MAX_EPSILON = 1e-6


class FusionLpNormalization(Fusion):
    """Fuse ReduceL2-based L2 normalization into ``LpNormalization(p=2)``.

    Args:
        model: The model, edited in place by :meth:`apply`.
    """

    def __init__(self, model: ONNXModel) -> None:
        super().__init__(model, "LpNormalization", "ReduceL2")

    def fuse(self, node: onnx.NodeProto, input_name_to_nodes: ConsumerMap,
             output_name_to_node: NodeMap) -> None:
        """Fuse the L2 normalization that starts at the ``ReduceL2`` ``node``."""
        x = node.input[0]
        axes = self.reduce_axes(node)
        clip = self.sole_child(node, "Clip", input_name_to_nodes)
        if axes is None or len(axes) != 1 or self.get_node_attribute(node, "keepdims") == 0 \
                or clip is None or not self._clips_at_epsilon(clip):
            return
        expand = self.sole_child(clip, "Expand", input_name_to_nodes)
        last = expand if expand is not None else clip
        div = self.sole_child(last, "Div", input_name_to_nodes)
        if div is None or list(div.input) != [x, last.output[0]]:
            return
        pattern = [node, clip, *([expand] if expand is not None else []), div]
        if not self.is_safe_to_fuse_nodes(pattern, [div.output[0]], input_name_to_nodes,
                                          output_name_to_node):
            return
        self.nodes_to_remove.extend(pattern)
        self.nodes_to_add.append(helper.make_node(
            "LpNormalization", [x], [div.output[0]], name=self.create_unique_node_name(),
            axis=axes[0], p=2))

    def _clips_at_epsilon(self, clip: onnx.NodeProto) -> bool:
        """Whether ``clip`` only raises its input to a small constant minimum."""
        if len(clip.input) > 2 and clip.input[2] or self.get_node_attribute(clip, "max"):
            return False
        low = self.get_node_attribute(clip, "min")
        if low is None and len(clip.input) > 1 and clip.input[1]:
            value = self.model.get_constant_value(clip.input[1])
            low = None if value is None or value.size != 1 else float(value.reshape(()))
        return low is not None and 0.0 <= low <= _MAX_EPSILON
