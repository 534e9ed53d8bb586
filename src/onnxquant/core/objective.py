"""What quantization optimises (:class:`Objective`), and how a node's measured cost decides
for it (:class:`NodeCost`, :class:`Budget`, the balanced rule :func:`balanced_accepts`).

The costs come from :mod:`onnxquant.core.costs`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence

from onnxquant.core.errors import QuantizationError

__all__ = ["Objective", "as_objective", "NodeCost", "Budget", "balanced_accepts",
           "BALANCED_MAX_SLOWDOWN", "BALANCED_MIN_SAVED_BYTES", "BALANCED_GAIN_SHARE",
           "estimate_line", "summed", "MEASURE_ENV"]

MEASURE_ENV = "ONNXQUANT_MEASURE_COSTS"


class Objective(str, enum.Enum):
    """What quantization optimises for.

    - ``SPEED``: no node is quantized where its integer form, with the transitions it causes,
      is measured slower than its float form; it stays float, with the reason in the plan.
    - ``BALANCED`` (default): as SPEED, but a slower node is quantized when it saves a lot of
      weight bytes for a small slowdown, within a budget that keeps the model's measured
      nodes, in total, no slower than float (:func:`balanced_accepts`).
    - ``SIZE``: weights quantized wherever they can be, whatever the speed; the summary states
      the latency cost measured.
    """

    SPEED = "speed"
    BALANCED = "balanced"
    SIZE = "size"


def as_objective(value: Objective | str) -> Objective:
    """``value`` as an :class:`Objective` (its value string is accepted too)."""
    try:
        return Objective(value)
    except ValueError:
        choices = ", ".join(repr(o.value) for o in Objective)
        raise QuantizationError(
            f"unknown objective {value!r}; use one of {choices}") from None


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """One node's measured times (ms) in both forms, transitions included, and the weight
    bytes quantizing it saves."""

    float_ms: float
    integer_ms: float
    saved_bytes: int

    @property
    def loss_ms(self) -> float:
        """How much slower the integer form is (negative: faster)."""
        return self.integer_ms - self.float_ms

    def describe(self) -> str:
        return (f"integer {self.integer_ms * 1e3:.0f} µs vs float {self.float_ms * 1e3:.0f} µs "
                "measured, transitions included")


BALANCED_MAX_SLOWDOWN = 0.25
"""Balanced: a slower integer node is acceptable only when it is at most this much slower
than its float form (integer ≤ 1.25 × float, transitions included)."""
BALANCED_MIN_SAVED_BYTES = 64 * 1024
"""Balanced: ... and only when quantizing it saves at least this many weight bytes."""
BALANCED_GAIN_SHARE = 0.5
"""Balanced: the slowdowns accepted add up to at most this share of the time the faster
integer nodes gained, so the measured nodes together stay faster than float."""


def balanced_accepts(cost: NodeCost, gained_ms: float, accepted_loss_ms: float) -> bool:
    """Whether ``objective="balanced"`` quantizes a node whose integer form is slower.

    The rule: the node's integer form (transitions included) is at most
    :data:`BALANCED_MAX_SLOWDOWN` slower than float, quantizing it saves at least
    :data:`BALANCED_MIN_SAVED_BYTES` of weights, and the slowdowns accepted so far plus this
    one stay within :data:`BALANCED_GAIN_SHARE` of ``gained_ms`` (what the faster integer
    nodes decided before it gained).
    """
    return (cost.loss_ms <= BALANCED_MAX_SLOWDOWN * cost.float_ms
            and cost.saved_bytes >= BALANCED_MIN_SAVED_BYTES
            and accepted_loss_ms + cost.loss_ms <= BALANCED_GAIN_SHARE * gained_ms)


@dataclasses.dataclass
class Budget:
    """Decides node after node for an objective, keeping what balanced may still spend.

    Attributes:
        objective: What is optimised.
        gained_ms: Time the faster integer nodes quantized so far gained.
        accepted_ms: Slowdown balanced accepted so far.
    """

    objective: Objective
    gained_ms: float = 0.0
    accepted_ms: float = 0.0

    def decide(self, cost: NodeCost, forced: bool = False) -> tuple[bool, bool]:
        """(quantize the node?, is it a slower node balanced accepted?)."""
        quantize = cost.loss_ms <= 0 or forced or self.objective is Objective.SIZE
        accepted = False
        if not quantize and self.objective is Objective.BALANCED and \
                balanced_accepts(cost, self.gained_ms, self.accepted_ms):
            quantize = accepted = True
            self.accepted_ms += cost.loss_ms
        if quantize and cost.loss_ms < 0:
            self.gained_ms -= cost.loss_ms
        return quantize, accepted


def estimate_line(info: Mapping[str, object]) -> str:
    """The summary's cost-model line from an estimate (``objective``, ``measured``,
    ``float_ms``, ``quantized_ms``, ``nodes``, ``kept_float``, ``accepted_slower``): the
    measured nodes' time in float and as quantized, transitions included."""
    objective = info.get("objective", Objective.BALANCED.value)
    if not info.get("measured", True):
        return (f"cost model:   objective {objective}; kernel costs not measured "
                f"({MEASURE_ENV}=0 or measure_costs=False): fixed rules decided, latency "
                "cost unknown")
    nodes = int(info.get("nodes", 0))  # type: ignore[call-overload]
    float_ms = float(info.get("float_ms", 0.0))  # type: ignore[arg-type]
    quantized_ms = float(info.get("quantized_ms", 0.0))  # type: ignore[arg-type]
    if nodes == 0 or float_ms <= 0:
        return f"cost model:   objective {objective}; no measurable Conv/MatMul/Gemm"
    kept, accepted = info.get("kept_float", 0), info.get("accepted_slower", 0)
    extra = f"; {kept} kept float as slower" if kept else ""
    extra += f"; {accepted} quantized although slower (balanced)" if accepted else ""
    return (f"cost model:   objective {objective}; {nodes} Conv/MatMul/Gemm measured "
            f"(1 thread): float {float_ms:.3f} ms, as quantized {quantized_ms:.3f} ms "
            f"({quantized_ms / float_ms:.2f}× the float time, transitions included){extra}")


def summed(costs: Sequence[tuple[NodeCost, bool]]) -> tuple[float, float]:
    """(float ms, planned ms) over ``(cost, quantized)`` pairs."""
    return (sum(c.float_ms for c, _ in costs),
            sum(c.integer_ms if q else c.float_ms for c, q in costs))
