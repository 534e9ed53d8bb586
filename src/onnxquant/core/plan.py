"""The quantization plan: every decision, as data.

The planner fills a :class:`QuantPlan` from op rules and calibrated ranges; emitters only read
it. The plan is format-independent and round-trips through JSON, so it can be inspected,
overridden per tensor, cached or turned into other formats.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import numpy as np

from onnxquant.core import numerics
from onnxquant.core.blocks import expand_blocks, quantize_blocked
from onnxquant.core.qtypes import QuantType, quant_type_from_name

__all__ = ["TensorQuant", "ConvertQuant", "BiasQuant", "NodeDecision", "QuantPlan"]


@dataclasses.dataclass
class TensorQuant:
    """Quantization parameters of one tensor.

    Attributes:
        name: Tensor name in the (prepared) model.
        role: ``"activation"`` (Q/DQ pair at run time) or ``"weight"`` (constant stored quantized).
        qtype: Element type name (``"int8"``, ...).
        scale: One value per tensor, or one per slice along ``axis``.
        zero_point: Same length as ``scale``.
        axis: Per-axis quantization axis, or None for per tensor.
        source: Where the parameters come from: ``calibrated``, ``fixed``, ``constant``,
            ``shared:<tensor>`` or ``fused:<node>``.
        range: The float range the parameters were computed from, when there is one.
        convert: Activations: a second grid some readers read the tensor in
            (``TensorOverride.convert``: Q1→DQ1→Q2→DQ2); None for most tensors.
        block_size: Block-wise weights: ``block_size`` consecutive elements along ``axis``
            share one scale; ``scale``/``zero_point`` are then the flattened
            ``scale_shape`` array (the weight's shape with ``ceil(K / block_size)`` along
            ``axis``).
        scale_shape: Shape of the block-wise scale array.
    """

    name: str
    role: str
    qtype: str
    scale: list[float]
    zero_point: list[int]
    axis: int | None = None
    source: str = "calibrated"
    range: tuple[float, float] | None = None
    convert: ConvertQuant | None = None
    block_size: int | None = None
    scale_shape: list[int] | None = None

    @property
    def quant_type(self) -> QuantType:
        """The QuantType object of ``qtype``."""
        return quant_type_from_name(self.qtype)

    def scale_array(self) -> np.ndarray:
        """Scale as float32: 0-d per tensor, 1-D per axis."""
        arr = np.asarray(self.scale, dtype=np.float32)
        if self.scale_shape is not None:
            return arr.reshape(self.scale_shape)
        return arr.reshape(()) if self.axis is None else arr

    def zero_point_array(self) -> np.ndarray:
        """Zero point in the storage dtype: 0-d per tensor, 1-D per axis."""
        arr = np.asarray(self.zero_point, dtype=np.int64).astype(self.quant_type.numpy_dtype)
        if self.scale_shape is not None:
            return arr.reshape(self.scale_shape)
        return arr.reshape(()) if self.axis is None else arr

    def quantize(self, data: np.ndarray) -> np.ndarray:
        """``data`` on this grid (per tensor, per axis or per block), as QuantizeLinear."""
        if self.block_size is not None:
            return quantize_blocked(data, self.scale_array(), self.zero_point_array(),
                                    self.quant_type, self.axis or 0, self.block_size)
        return numerics.quantize(data, self.scale_array(), self.zero_point_array(),
                                 self.quant_type, axis=self.axis)

    def dequantize(self, quantized: np.ndarray) -> np.ndarray:
        """Float32 values of ``quantized`` on this grid, as DequantizeLinear."""
        if self.block_size is not None:
            axis, length = self.axis or 0, quantized.shape[self.axis or 0]
            scale = expand_blocks(self.scale_array(), axis, self.block_size, length)
            zero = expand_blocks(self.zero_point_array().astype(np.float32), axis,
                                 self.block_size, length)
            return ((quantized.astype(np.float32) - zero) * scale).astype(np.float32)
        return numerics.dequantize(quantized, self.scale_array(), self.zero_point_array(),
                                   axis=self.axis)

    def same_params(self, other: TensorQuant) -> bool:
        """Whether both have identical type, scales, zero points and axis."""
        return (self.qtype, self.scale, self.zero_point, self.axis, self.block_size) == (
            other.qtype, other.scale, other.zero_point, other.axis, other.block_size)


@dataclasses.dataclass
class ConvertQuant:
    """The second grid of a tensor whose readers read it in another type (mixed precision).

    The producer's Q/DQ pair uses the tensor's own :class:`TensorQuant`; the readers named in
    ``readers`` read it requantized with ``params`` (Q1→DQ1→Q2→DQ2).

    Attributes:
        params: Parameters of the second grid (``name`` is the tensor's, ``source`` says
            ``convert``).
        readers: Names of the nodes that read the second grid, sorted; None: every reader,
            and the graph output when the tensor is one.
    """

    params: TensorQuant
    readers: list[str] | None = None


@dataclasses.dataclass
class BiasQuant:
    """An int32 bias input: scale = input scale × weight scale (per channel when axis is 0).

    ``stored="float"`` (float8 weights, which have no int32 accumulator): the bias keeps its
    float values and is read through a Cast, as onnxruntime writes it; ``scale`` is empty.
    """

    input: int
    tensor: str
    scale: list[float]
    axis: int | None = None
    stored: str = "int32"


@dataclasses.dataclass
class NodeDecision:
    """What happens to one node.

    Attributes:
        name: Node name.
        op_type: Operator type.
        action: ``"quantize"``, ``"weights"`` (weight-only: constant weights stored quantized,
            activations float — ops without calibrated activations or integer kernels),
            ``"remove"`` (Relu/Clip folded into the producer's range) or ``"float"``.
        reason: Why a node stays float or is removed.
        inputs: Input index -> tensor name, for inputs read through a DequantizeLinear.
        outputs: Names of outputs that get a QuantizeLinear/DequantizeLinear pair.
        bias: The int32 bias input, if any.
    """

    name: str
    op_type: str
    action: str
    reason: str = ""
    inputs: dict[int, str] = dataclasses.field(default_factory=dict)
    outputs: list[str] = dataclasses.field(default_factory=list)
    bias: BiasQuant | None = None


@dataclasses.dataclass
class QuantPlan:
    """All tensor parameters and node decisions of one quantization run."""

    tensors: dict[str, TensorQuant] = dataclasses.field(default_factory=dict)
    nodes: dict[str, NodeDecision] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def quantized_nodes(self) -> list[NodeDecision]:
        """Decisions that read quantized inputs (actions ``quantize`` and ``weights``)."""
        return [d for d in self.nodes.values() if d.action in ("quantize", "weights")]

    def counts_by_op_type(self) -> dict[str, collections.Counter]:
        """``{op_type: Counter(action)}`` for the summary."""
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for decision in self.nodes.values():
            counts[decision.op_type][decision.action] += 1
        return dict(counts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict."""
        return {
            "version": 1,
            "settings": self.settings,
            "tensors": {k: dataclasses.asdict(v) for k, v in self.tensors.items()},
            "nodes": {k: dataclasses.asdict(v) for k, v in self.nodes.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        """Inverse of :meth:`to_dict`."""
        tensors = {k: _tensor_from_dict(v) for k, v in data["tensors"].items()}
        nodes = {}
        for k, v in data["nodes"].items():
            bias = BiasQuant(**v["bias"]) if v.get("bias") else None
            inputs = {int(i): t for i, t in v.get("inputs", {}).items()}
            nodes[k] = NodeDecision(**{**v, "bias": bias, "inputs": inputs})
        return cls(tensors=tensors, nodes=nodes, settings=dict(data.get("settings", {})))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to JSON text, also writing it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> QuantPlan:
        """Load a plan from JSON text or a file path."""
        text = os.fspath(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))


def _tensor_from_dict(data: dict[str, Any]) -> TensorQuant:
    """A :class:`TensorQuant` from its :func:`dataclasses.asdict` form."""
    rng = data.get("range")
    convert = data.get("convert")
    if convert is not None:
        convert = ConvertQuant(_tensor_from_dict(convert["params"]), convert.get("readers"))
    return TensorQuant(**{**data, "range": tuple(rng) if rng is not None else None,
                          "convert": convert})
