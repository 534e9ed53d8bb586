"""What the accuracy-target search reports: every evaluated candidate (:class:`Step`) and the
outcome (:class:`TargetResult`), printed in the quantization summary."""

from __future__ import annotations

import dataclasses

from onnxquant.core.summary_text import format_size

__all__ = ["Step", "TargetResult"]


@dataclasses.dataclass
class Step:
    """One evaluated candidate.

    Attributes:
        move: What was tried (``defaults``, ``calibration mse``, ``uint16 tensor h``, ...).
        score: Its score on the evaluation samples (-inf when it could not be built or run).
        bytes: Its serialized size.
        latency: Its latency relative to the float model (median run time over the evaluation
            samples, measured in the search's own sessions: an estimate), None when unmeasured.
        kept: Whether the search kept it.
    """

    move: str
    score: float
    bytes: int
    kept: bool
    latency: float | None = None


@dataclasses.dataclass
class TargetResult:
    """The outcome of the search.

    Attributes:
        target: The target, described (``cosine >= 0.99``).
        met: Whether the written model meets it.
        score: The written model's score on the evaluation samples.
        kept_float: Nodes the search kept float, with the reason.
        wide_tensors: Activations the search gave 16 bits, with the reason.
        changes: The whole-model changes kept (calibration method, per-channel weights,
            corrections such as SmoothQuant), in order.
        steps: Every evaluated candidate, in order (the size/accuracy trajectory).
        evaluation_samples: Samples each candidate was scored on.
        reason: Why the search stopped without meeting the target ('' when it met it).
    """

    target: str
    met: bool
    score: float
    kept_float: dict[str, str]
    steps: list[Step]
    evaluation_samples: int
    wide_tensors: dict[str, str] = dataclasses.field(default_factory=dict)
    changes: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""

    def frontier(self) -> list[Step]:
        """The evaluated candidates no other candidate beats on both score and size
        (smallest first): the size/accuracy trade-offs the search saw."""
        steps = sorted((s for s in self.steps if s.bytes > 0), key=lambda s: (s.bytes, -s.score))
        frontier: list[Step] = []
        for step in steps:
            if not frontier or step.score > frontier[-1].score:
                frontier.append(step)
        return frontier

    def lines(self) -> list[str]:
        """The summary lines: verdict, every step, the frontier, what stays at higher
        precision and why."""
        verdict = "met" if self.met else f"NOT met (the best model found was written: " \
                                          f"{self.reason})"
        lines = [f"target:       {self.target} {verdict}: {self.score:.4f} on "
                 f"{self.evaluation_samples} samples after {len(self.steps)} evaluations"]
        lines.append(f"  {'move':<52} {'score':>10} {'size':>10} {'latency':>8}")
        for step in self.steps:
            lines.append(_step_line(step, "kept" if step.kept else "dropped"))
        lines.append("  size/accuracy frontier:")
        lines += [_step_line(step, "") for step in self.frontier()]
        if self.changes:
            lines.append(f"  whole model: {', '.join(self.changes)}")
        by_reason: dict[str, list[str]] = {}
        for tensor, why in self.wide_tensors.items():
            by_reason.setdefault(why, []).append(tensor)
        for why, tensors in by_reason.items():
            shown = ", ".join(tensors[:12]) + (f", ... ({len(tensors)} in all)"
                                               if len(tensors) > 12 else "")
            lines.append(f"  16-bit: {shown} ({why})")
        lines += [f"  float: {n} ({why})" for n, why in self.kept_float.items()]
        return lines


def _step_line(step: Step, mark: str) -> str:
    latency = f"{step.latency:7.2f}x" if step.latency is not None else f"{'-':>8}"
    return (f"  {step.move[:52]:<52} {step.score:10.4f} {format_size(step.bytes):>10} "
            f"{latency}  {mark}").rstrip()
