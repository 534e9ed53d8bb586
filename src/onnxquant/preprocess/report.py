"""What a pre-processing pass did, and what is known about a model's shapes.

:func:`shape_census` counts the values produced by nodes (subgraphs included) whose shape is
known (element type and every dimension a number or a name), partial (rank known, some
dimension anonymous) or unknown. :func:`explain_unknown` groups the unknown ones by the node
where knowledge stops, with the reason: an op with no shape rule, a shape that depends on the
data, an input that is itself unknown, ...
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from onnxquant.preprocess._value_info import is_anonymous, node_values

__all__ = ["StepReport", "ShapeCensus", "UnknownShapes", "shape_census", "explain_unknown",
           "op_counts"]

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_DATA_DEPENDENT = frozenset({
    "NonZero", "Unique", "NonMaxSuppression", "Compress", "StringSplit", "RegexFullMatch",
})
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one pass did.

    Attributes:
        step: The pass (``"symbolic shapes"``, ``"optimize"``, ``"onnx shapes"``).
        changed: Whether the pass changed the model.
        details: Lines saying what it did (for the summary).
        problem: Why it did less than it could (a failure it absorbed), or None.
        node: The node the problem is at, when there is one.
    """

    step: str
    changed: bool
    details: tuple[str, ...] = ()
    problem: str | None = None
    node: str | None = None


@dataclasses.dataclass(frozen=True)
class ShapeCensus:
    """How much is known about the shapes of the values nodes produce.

    Attributes:
        known: Element type and every dimension (a number or a symbolic name) known.
        partial: Element type and rank known, at least one dimension anonymous.
        unknown: No shape (or no element type).
    """

    known: int
    partial: int
    unknown: int

    @property
    def total(self) -> int:
        return self.known + self.partial + self.unknown

    def describe(self) -> str:
        """``"530 known, 2 partial, 0 unknown (of 532)"``."""
        return (f"{self.known} known, {self.partial} partial, {self.unknown} unknown "
                f"(of {self.total})")


@dataclasses.dataclass(frozen=True)
class UnknownShapes:
    """Values whose shapes stayed unknown because inference stopped at one node.

    Attributes:
        node: The node where knowledge stops.
        op_type: Its op type (with the domain when not ONNX's).
        reason: Why its outputs have no shape.
        values: How many values have no shape because of it (its own outputs and those of
            the nodes downstream that only lack a shape because of it).
    """

    node: str
    op_type: str
    reason: str
    values: int


def _state(value: ir.Value) -> str:
    if value.type is None:
        return "unknown"
    if not isinstance(value.type, ir.TensorType):
        return "known"  # sequences, optionals, maps: their type is what can be known
    if value.shape is None or value.dtype in (None, ir.DataType.UNDEFINED):
        return "unknown"
    return "partial" if any(is_anonymous(d) for d in value.shape) else "known"


def shape_census(model: ir.Model) -> ShapeCensus:
    """Count the node outputs of ``model`` (subgraphs too) by how much of their shape is
    known."""
    counts = collections.Counter(_state(v) for v in node_values(model))
    return ShapeCensus(counts["known"], counts["partial"], counts["unknown"])


def op_counts(model: ir.Model) -> collections.Counter[str]:
    """Nodes per op type (``domain::op`` outside ONNX's domains), subgraphs included."""
    return collections.Counter(_op_name(node)
                               for node in ir.traversal.RecursiveGraphIterator(model.graph))


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


def _reason(node: ir.Node, notes: dict[str, str]) -> str:
    if node.name in notes:
        return notes[node.name]
    if node.domain not in _STANDARD_DOMAINS and node.domain != "com.microsoft":
        return f"no shape rule is known for domain '{node.domain}'"
    if node.op_type in _DATA_DEPENDENT:
        return "its output shape depends on the input data"
    if node.op_type in _CONTROL_FLOW:
        return "its subgraph outputs have no common shape"
    return "shape inference could not compute it from what is known before running the model"


def explain_unknown(model: ir.Model, notes: dict[str, str] | None = None
                    ) -> list[UnknownShapes]:
    """Group the node outputs without a shape by the node where knowledge stops.

    A node whose outputs lack a shape although every input has one is a root; values that
    lack a shape only because an input does are counted under the root they descend from.
    ``notes`` gives reasons known from elsewhere, by node name (e.g. where symbolic inference
    stopped). Largest groups first.
    """
    notes = notes or {}
    root_of: dict[int, ir.Node] = {}  # id(value) -> the root node it descends from
    groups: collections.Counter[int] = collections.Counter()
    nodes: dict[int, ir.Node] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        missing = [v for v in node.outputs if v.name and _state(v) == "unknown"]
        if not missing:
            continue
        upstream = [root_of[id(v)] for v in node.inputs if v is not None and id(v) in root_of]
        root = upstream[0] if upstream else node
        nodes[id(root)] = root
        for value in missing:
            root_of[id(value)] = root
            groups[id(root)] += 1
    result = []
    for key, count in groups.most_common():
        root = nodes[key]
        result.append(UnknownShapes(root.name or "", _op_name(root), _reason(root, notes), count))
    return result
