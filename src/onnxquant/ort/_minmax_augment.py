"""onnxruntime's MinMax augmentation: ``<t>_ReduceMin`` / ``<t>_ReduceMax`` graph outputs.

For every calibrated tensor ``t`` the augmented model gets two small chains appended to the
main graph, named as onnxruntime names them (code and tests look them up by these names):

* node ``t_ReduceMin`` (ReduceMin, ``keepdims=1``) writing ``t_ReduceMin_Reshape``, then node
  ``t_ReduceMin_Reshape`` (Reshape to ``[-1]``) writing the graph output ``t_ReduceMin``;
* the same with ReduceMax.

Per channel, the reduction keeps axis 1 (it runs over axes ``0, 2, ..., rank - 1``; the axes are
an attribute below opset 18 and an input from 18 on), so each output holds one value per
channel; otherwise each output holds one value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["REDUCE_OPS", "add_reduce_outputs"]

REDUCE_OPS = ("ReduceMin", "ReduceMax")


class _Names:
    """Fresh tensor names that clash with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {name for node in graph.node for name in (*node.input, *node.output)}
        self.used.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
        self.used.update(t.name for t in graph.initializer)

    def fresh(self, stem: str) -> str:
        name, index = stem, 0
        while name in self.used:
            index += 1
            name = f"{stem}_{index}"
        self.used.add(name)
        return name


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _rank(info: onnx.ValueInfoProto | None) -> int | None:
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return len(info.type.tensor_type.shape.dim)


class _Augmenter:
    """Appends the reduce chains to ``model``'s main graph."""

    def __init__(self, model: onnx.ModelProto, per_channel: bool) -> None:
        self.graph = model.graph
        self.per_channel = per_channel
        self.axes_as_input = _opset(model) >= 18
        self.names = _Names(model.graph)
        self.flat = self._constant("flat_shape", np.array([-1], np.int64))
        self.axes: dict[int, str] = {}

    def _constant(self, stem: str, array: np.ndarray) -> str:
        name = self.names.fresh(stem)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def _reduce_axes(self, rank: int | None) -> list[int] | None:
        """Axes to reduce over (None: all of them)."""
        if not self.per_channel or rank is None or rank < 2:
            return None
        return [0, *range(2, rank)]

    def add(self, tensor: str, info: onnx.ValueInfoProto | None) -> tuple[str, str]:
        """The chains of one tensor; returns the names of its (min, max) outputs."""
        axes = self._reduce_axes(_rank(info))
        elem_type = info.type.tensor_type.elem_type if info is not None else onnx.TensorProto.FLOAT
        outputs = []
        for op in REDUCE_OPS:
            output = f"{tensor}_{op}"
            reduced = f"{output}_Reshape"
            inputs, attrs = [tensor], dict[str, Any](keepdims=1)
            if axes is not None and self.axes_as_input:
                inputs.append(self._axes_input(axes))
            elif axes is not None:
                attrs["axes"] = axes
            self.graph.node.append(helper.make_node(op, inputs, [reduced], name=output, **attrs))
            self.graph.node.append(helper.make_node(
                "Reshape", [reduced, self.flat], [output], name=reduced))
            self.graph.output.append(helper.make_tensor_value_info(output, elem_type, None))
            outputs.append(output)
        return outputs[0], outputs[1]

    def _axes_input(self, axes: list[int]) -> str:
        rank = len(axes) + 1
        if rank not in self.axes:
            self.axes[rank] = self._constant(f"reduce_axes_rank{rank}", np.array(axes, np.int64))
        return self.axes[rank]


def add_reduce_outputs(model: onnx.ModelProto, tensors: Iterable[str],
                       value_infos: Mapping[str, onnx.ValueInfoProto], *,
                       per_channel: bool = False) -> dict[str, tuple[str, str]]:
    """Add onnxruntime's ReduceMin/ReduceMax outputs for ``tensors`` to ``model`` (in place).

    Args:
        model: The model to augment (its main graph gets the new nodes and outputs).
        tensors: Names of main-graph tensors to reduce.
        value_infos: Type information by tensor name (element type; rank for per channel).
        per_channel: Keep axis 1 (one range per channel).

    Returns:
        For every tensor, the names of its ``(min, max)`` graph outputs.
    """
    augmenter = _Augmenter(model, per_channel)
    return {name: augmenter.add(name, value_infos.get(name)) for name in tensors}
