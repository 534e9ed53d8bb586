"""The op rule table: how each operator type takes part in static quantization.

A rule only marks intent — which inputs are activations, weights (with their default channel
axis) or a bias, and how the outputs get their quantization parameters. The planner reads the
rules; emitters build nodes. Op types without a rule stay float.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import onnx_ir as ir

from onnxquant.core.external_data import read_array
from onnxquant.core.qtypes import QuantFormat

__all__ = [
    "OutputMode", "OpRule", "RULES", "QOPERATOR_RULES", "rule_for", "weight_axis",
    "DEFAULT_OP_TYPES", "FLOAT_INPUT_OPS", "float_input_ops", "SOFTMAX_MAX_INPUT_WIDTH",
    "SINGULAR_INPUTS", "singular_input", "GENERIC_RULE", "GENERIC", "mark_generic",
]


class OutputMode(enum.Enum):
    """How the float outputs of a quantized node get their parameters."""

    OWN = "own"  # from the output's calibrated range
    SHARED = "shared"  # the same scale/zero point as input 0 (data movement ops)
    FIXED = "fixed"  # a fixed range known from the op's math (Softmax, Sigmoid)
    NONE = "none"  # outputs stay float (ArgMax's int64, ...)


ALL = -1  # marker: every float input is an activation


@dataclasses.dataclass(frozen=True)
class OpRule:
    """How one op type is quantized.

    Attributes:
        activations: Input indices quantized as activations, or ``(ALL,)`` for every input.
            A constant input in an activation position is quantized per tensor.
        weights: Input index -> default channel axis for per-channel quantization
            (``None`` means per-tensor only). Used only when that input is constant.
        bias: Index of an int32 bias input (scale = input scale × weight scale), if any.
        output: How outputs are parameterised.
        fixed_range: The output range for ``OutputMode.FIXED``.
        removable: Relu/Clip: dropped when the producer's quantized range already clips.
        anchor: Quantized on its own (ops with weights and integer kernels). Every other op is
            quantized only next to a quantized node, so that elementwise math outside the
            compute path (decomposed LayerNorm variance, masks, ...) stays float.
        max_inputs: Only the first ``max_inputs`` inputs are considered (Resize's scales, ...).
        weight_only: Only the constant weights are stored quantized (behind a DequantizeLinear);
            activations stay float (recurrent ops without integer kernels in this format).
    """

    activations: tuple[int, ...] = (0,)
    weights: Mapping[int, int | None] = dataclasses.field(default_factory=dict)
    bias: int | None = None
    output: OutputMode = OutputMode.OWN
    fixed_range: tuple[float, float] | None = None
    removable: bool = False
    anchor: bool = False
    max_inputs: int | None = None
    weight_only: bool = False
    note: str = ""

    def is_activation_input(self, index: int) -> bool:
        """Whether input ``index`` is quantized as an activation."""
        if self.max_inputs is not None and index >= self.max_inputs:
            return False
        return ALL in self.activations or index in self.activations

    def is_quantized_input(self, index: int) -> bool:
        """Whether input ``index`` is quantized at all (as an activation or a weight)."""
        return index in self.weights or self.is_activation_input(index)


_SHARED = OpRule(output=OutputMode.SHARED, max_inputs=1)

RULES: dict[str, OpRule] = {
    "Conv": OpRule(weights={1: 0}, bias=2, anchor=True),
    "ConvTranspose": OpRule(weights={1: 1}, bias=2, anchor=True),
    "Gemm": OpRule(activations=(0, 1), weights={1: 1}, bias=2, anchor=True),
    "MatMul": OpRule(activations=(0, 1), weights={1: -1}, anchor=True),
    "Add": OpRule(activations=(ALL,)),
    "Mul": OpRule(activations=(ALL,)),
    "Concat": OpRule(activations=(ALL,)),
    "LSTM": OpRule(activations=(), weights={1: 1, 2: 1}, anchor=True, weight_only=True),
    "GRU": OpRule(activations=(), weights={1: 1, 2: 1}, anchor=True, weight_only=True),
    "RNN": OpRule(activations=(), weights={1: 1, 2: 1}, anchor=True, weight_only=True),
    "Relu": OpRule(removable=True),
    "Clip": OpRule(removable=True, max_inputs=1),
    "MaxPool": OpRule(output=OutputMode.SHARED, max_inputs=1),
    "AveragePool": OpRule(),
    "GlobalAveragePool": OpRule(),
    "Reshape": _SHARED,
    "Transpose": _SHARED,
    "Squeeze": _SHARED,
    "Unsqueeze": _SHARED,
    "Flatten": _SHARED,
    "Resize": _SHARED,
    "Split": _SHARED,
    "Slice": _SHARED,
    "Pad": _SHARED,
    "Gather": OpRule(output=OutputMode.SHARED, max_inputs=1),
    "GatherElements": OpRule(output=OutputMode.SHARED, max_inputs=1),
    "TopK": OpRule(output=OutputMode.SHARED, max_inputs=1),
    # Softmax inputs stay float: attention masks put -1e4..-3e38 into them, which no 8-bit
    # grid survives; the output has the fixed range [0, 1].
    "Softmax": OpRule(activations=(), output=OutputMode.FIXED, fixed_range=(0.0, 1.0)),
    # Sigmoid outputs take their calibrated range (as onnxruntime does): inside (0, 1), and
    # finer than the fixed [0, 1] grid when the inputs never saturate.
    "Sigmoid": OpRule(),
    # The residual stream entering a LayerNorm carries outlier features (|x| 100x the median in
    # BERT-like models): an 8-bit grid over it costs far more than it saves (all-MiniLM-L6 mean
    # embedding cosine 0.84 -> 0.94). Inputs stay float; consumers quantize the output.
    "LayerNormalization": OpRule(activations=(), note="inputs stay float (outlier features)"),
    "InstanceNormalization": OpRule(max_inputs=1),
    "Where": OpRule(activations=(1, 2)),
    "ArgMax": OpRule(output=OutputMode.NONE),
}

# QOperator format: rules that differ from the QDQ table. LeakyRelu has an integer kernel
# (QLinearLeakyRelu) only there, and Div by a constant runs as QLinearMul by its reciprocal;
# Softmax reads a quantized input (QLinearSoftmax) — unless the planner finds the input range
# wider than SOFTMAX_MAX_INPUT_WIDTH (attention masks).
QOPERATOR_RULES: dict[str, OpRule] = {
    "LeakyRelu": OpRule(),
    "Div": OpRule(),
    "Softmax": OpRule(output=OutputMode.FIXED, fixed_range=(0.0, 1.0)),
}

# Widest calibrated input range (max - min) for which QLinearSoftmax is used: an 8-bit step of
# width/255 = 0.125 shifts a logit by at most 0.0625, i.e. a probability by at most ~6.5%.
SOFTMAX_MAX_INPUT_WIDTH = 32.0

DEFAULT_OP_TYPES: frozenset[str] = frozenset(RULES)

# Tensors read only by these ops are not quantized as outputs of their producer.
FLOAT_INPUT_OPS: frozenset[str] = frozenset({"Softmax", "LayerNormalization"})


# Inputs where the op's float math has a singular point: log and reciprocal of 0, square roots
# of negatives, negative powers of 0, a zero divisor. A grid puts values there that the float
# data never reaches (Clip(min=1e-10) -> Log reads 0 from a grid starting at 0; a small
# denominator rounds to 0), so these inputs stay float: their producer's output gets no
# QuantizeLinear/DequantizeLinear pair (other readers still quantize it for themselves), and
# a Relu/Clip whose guard they need is kept.
SINGULAR_INPUTS: Mapping[str, tuple[int, str]] = {
    "Log": (0, "log(0) = -inf"),
    "Reciprocal": (0, "1/0 = inf"),
    "Sqrt": (0, "the square root of a negative is NaN, and its result often divides"),
    "Pow": (0, "a negative power of 0 is inf"),
    "Div": (1, "division by 0"),
    "Mod": (1, "modulo 0"),
}


def singular_input(node: ir.Node, index: int) -> str | None:
    """Why input ``index`` of ``node`` must stay float (None when it need not): it is the
    singular-domain input of Log, Reciprocal, Sqrt, Div/Mod (the divisor) or Pow (unless the
    exponent is a constant ``>= 0``)."""
    entry = SINGULAR_INPUTS.get(node.op_type)
    if node.domain not in ("", "ai.onnx") or entry is None or entry[0] != index:
        return None
    if node.op_type == "Pow":
        exponent = node.inputs[1] if len(node.inputs) > 1 else None
        if exponent is not None and exponent.const_value is not None:
            values = read_array(exponent.const_value)
            if values.size and bool((values >= 0).all()):
                return None
    return f"input {index} of {node.op_type} '{node.name}' stays float ({entry[1]})"


def float_input_ops(qformat: QuantFormat = QuantFormat.QDQ) -> frozenset[str]:
    """:data:`FLOAT_INPUT_OPS` for ``qformat`` (QOperator quantizes Softmax inputs)."""
    if qformat is QuantFormat.QOPERATOR:
        return FLOAT_INPUT_OPS - {"Softmax"}
    return FLOAT_INPUT_OPS


# QDQ format: an op type without a rule that the user names explicitly
# (``StaticQuantConfig.force_op_types``, onnxruntime's ``op_types_to_quantize``) reads every
# float input through a Q/DQ pair and its float outputs get their own, as onnxruntime's default
# QDQ handler does; :func:`mark_generic` flags such nodes in ``node.meta[GENERIC]``.
GENERIC_RULE = OpRule(activations=(ALL,))
GENERIC = "onnxquant.generic_rule"


def mark_generic(node: ir.Node, qformat: QuantFormat) -> bool:
    """Flag ``node`` (an ONNX op without a rule, named by the user) for :data:`GENERIC_RULE`
    in the QDQ format; returns whether it now has a rule."""
    if (qformat is QuantFormat.QDQ and node.domain in ("", "ai.onnx")
            and node.op_type not in RULES):
        node.meta[GENERIC] = True
    return rule_for(node, qformat) is not None


def rule_for(node: ir.Node, qformat: QuantFormat = QuantFormat.QDQ) -> OpRule | None:
    """The rule for ``node`` in ``qformat``, or None for op types that stay float (and
    non-ONNX domains)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if qformat is QuantFormat.QOPERATOR and node.op_type in QOPERATOR_RULES:
        return QOPERATOR_RULES[node.op_type]
    rule = RULES.get(node.op_type)
    if rule is None and qformat is QuantFormat.QDQ and node.meta.get(GENERIC):
        return GENERIC_RULE
    return rule


def weight_axis(node: ir.Node, index: int, rank: int) -> int | None:
    """The per-channel axis of weight input ``index`` of ``node`` (non-negative), or None.

    Gemm's weight axis depends on ``transB``; MatMul's is the last axis of B (output columns).
    """
    rule = rule_for(node)
    if rule is None or index not in rule.weights:
        return None
    axis = rule.weights[index]
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        axis = 0 if trans_b is not None and trans_b.as_int() else 1
    if axis is None:
        return None
    return axis % rank if rank > 0 else None
