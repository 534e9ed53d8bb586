"""What pre-processing did: the steps, nodes per op type before and after, the shapes known
before and after, where inference stopped, and the files written."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

from onnxquant.core.summary_text import files_lines, size_line
from onnxquant.preprocess.report import ShapeCensus, StepReport, UnknownShapes

__all__ = ["PreprocessResult"]

_MAX_ROOTS = 8
_MAX_OPS = 12


@dataclasses.dataclass
class PreprocessResult:
    """The outcome of :func:`onnxquant.preprocess`.

    Attributes:
        source: How the input is named in messages (``model file 'a.onnx'``).
        output: The written model.
        files: Every file written (the model, then its external data, if any).
        steps: What each step did, in order (steps turned off are not listed).
        ops_before: Nodes per op type of the input (subgraphs included).
        ops_after: Nodes per op type of the output.
        shapes_before: How many node outputs had a known shape in the input.
        shapes_after: The same for the output.
        unknown: Node outputs still without a shape, grouped by where inference stops.
        size_before: Bytes of the input (its files, or its tensors when given in memory).
        size_after: Bytes of the files written.
        seconds: Wall time.
    """

    source: str
    output: Path
    files: list[Path]
    steps: list[StepReport]
    ops_before: collections.Counter[str]
    ops_after: collections.Counter[str]
    shapes_before: ShapeCensus
    shapes_after: ShapeCensus
    unknown: list[UnknownShapes]
    size_before: int
    size_after: int
    seconds: float

    @property
    def removed(self) -> dict[str, int]:
        """Nodes per op type that are gone (folded, fused into another node, or removed)."""
        return {op: n - self.ops_after[op] for op, n in self.ops_before.items()
                if n > self.ops_after[op]}

    @property
    def added(self) -> dict[str, int]:
        """Nodes per op type that are new (e.g. Gemm from MatMul + Add)."""
        return {op: n - self.ops_before[op] for op, n in self.ops_after.items()
                if n > self.ops_before[op]}

    def warnings(self) -> list[str]:
        """The problems steps absorbed (a step that did less than asked)."""
        return [f"{step.step}: {step.problem}" for step in self.steps if step.problem]

    def summary(self) -> str:
        """The text ``onnxquant preprocess`` prints."""
        lines = [f"preprocessed: {self.source}"]
        lines.append("steps:" if self.steps else "steps:        none (every step turned off)")
        for step in self.steps:
            lines.extend(_step_lines(step))
        lines.append(f"nodes:        {sum(self.ops_before.values())} -> "
                     f"{sum(self.ops_after.values())}")
        changes = sorted({*self.removed, *self.added},
                         key=lambda op: (-abs(self.ops_after[op] - self.ops_before[op]), op))
        width = max((len(op) for op in changes[:_MAX_OPS]), default=0) + 2
        for op in changes[:_MAX_OPS]:
            lines.append(f"  {op:<{width}}{self.ops_before[op]:>6} -> {self.ops_after[op]}")
        if len(changes) > _MAX_OPS:
            lines.append(f"  ... {len(changes) - _MAX_OPS} more op types changed")
        lines.append(f"value shapes: before: {self.shapes_before.describe()}")
        lines.append(f"              after:  {self.shapes_after.describe()}")
        if self.unknown:
            lines.append("still unknown, by the node where shape inference stops:")
            for group in self.unknown[:_MAX_ROOTS]:
                lines.append(f"  node '{group.node}' ({group.op_type}): {group.reason} "
                             f"({group.values} value{'s' if group.values != 1 else ''})")
            if len(self.unknown) > _MAX_ROOTS:
                rest = sum(g.values for g in self.unknown[_MAX_ROOTS:])
                lines.append(f"  ... {len(self.unknown) - _MAX_ROOTS} more nodes "
                             f"({rest} values)")
        lines.append(size_line(self.size_before, self.size_after))
        lines.extend(files_lines(self.files))
        lines.append(f"time:         {self.seconds:.1f} s")
        return "\n".join(lines)


def _step_lines(step: StepReport) -> list[str]:
    texts = [*step.details, *([f"problem: {step.problem}"] if step.problem else [])]
    if not texts:
        texts = ["no change"]
    return [f"  {step.step if i == 0 else '':<18}{text}" for i, text in enumerate(texts)]
