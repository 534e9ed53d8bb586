"""When a Relu/Clip can be folded into the quantized grid of its producer's output."""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.core.external_data import read_array
from onnxquant.core.plan import TensorQuant

__all__ = ["clip_bounds", "within_half_step"]


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """``(low, high)`` of a Relu or Clip (None when a bound is not constant)."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    low, high = -float("inf"), float("inf")
    for key, index in (("min", 1), ("max", 2)):
        attr = node.attributes.get(key)  # opset < 11
        if attr is not None:
            bound = attr.as_float()
        elif len(node.inputs) > index and node.inputs[index] is not None:
            value = node.inputs[index]
            if value.const_value is None:  # type: ignore[union-attr]
                return None
            bound = float(read_array(value.const_value).reshape(-1)[0])  # type: ignore[union-attr]
        else:
            continue
        low, high = (bound, high) if key == "min" else (low, bound)
    return low, high


def within_half_step(params: TensorQuant, low: float, high: float) -> bool:
    """Whether every value of the grid of ``params`` lies in ``[low, high]`` up to half a step
    — so that the grid reproduces a Clip to those bounds within its own rounding error (an
    int8 grid over a Clip's [-1, 1] reaches -1 - step/2). A Clip whose bounds keep values off 0
    (Clip(min=1e-10), a guard for a Log or a divisor) is never reproduced by a grid holding 0."""
    qtype = params.quant_type
    if qtype.is_float:
        return False  # float8 grids are symmetric around 0: they never clip like a Relu/Clip
    scale, zp = params.scale[0], params.zero_point[0]
    rep_low, rep_high = scale * (qtype.qmin - zp), scale * (qtype.qmax - zp)
    if (low > 0 >= rep_low) or (high < 0 <= rep_high):
        return False  # a Clip that keeps values off 0 is never reproduced by a grid holding 0
    slack = 0.5 * scale  # plus float32 rounding of the scale, relative to each bound:
    return (rep_low >= low - slack - _BOUND_SLACK * abs(rep_low)
            and rep_high <= high + slack + _BOUND_SLACK * abs(rep_high))


_BOUND_SLACK = 1e-6
