"""A measured cost model of this onnxruntime on this CPU: is a node faster as integer or float?

Static and dynamic quantization ask it, per Conv/MatMul/Gemm, for the time of the node's
float kernel, its integer kernel (QLinearConv/QLinearMatMul, or the ConvInteger/MatMulInteger
form of dynamic quantization) and the QuantizeLinear/DequantizeLinear transitions of entering
or leaving an integer region. :class:`MeasuredCosts` answers by timing one small model per
kernel and shape (:mod:`onnxquant.core._cost_bench`: 1 intra-op thread, medians within a
time budget) and caches the answers on disk per CPU model and onnxruntime version, in
``~/.cache/onnxquant/costs.json`` (``ONNXQUANT_COST_CACHE`` relocates it). Measuring is off
when ``ONNXQUANT_MEASURE_COSTS=0`` (CI) or the config says ``measure_costs=False``: the
callers then use their fixed rules, so results are deterministic. Any object with the
:class:`CostModel` methods can stand in (tests inject a table).

What is being optimised, and how a cost decides for it, is :mod:`onnxquant.core.objective`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Protocol

import onnx_ir as ir

from onnxquant.core.graph import is_constant
from onnxquant.core.objective import MEASURE_ENV

__all__ = ["ConvSpec", "MatMulSpec", "NodeSpec", "node_spec", "CostModel", "MeasuredCosts",
           "measuring_enabled", "cost_cache_path", "default_cost_model", "SYMBOLIC_DIM"]

logger = logging.getLogger(__name__)

CACHE_ENV = "ONNXQUANT_COST_CACHE"
SYMBOLIC_DIM = 32
"""What a symbolic dimension (other than a leading batch dimension, taken as 1) is measured
as: integer/float ratios hardly depend on it, absolute times do."""


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A Conv's shapes and attributes, as measured (symbolic dimensions resolved)."""

    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    attrs: tuple[tuple[str, object], ...] = ()

    def key(self) -> str:
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs)
        return f"conv x{list(self.x_shape)} w{list(self.w_shape)} {attrs}".replace(" ", "")

    @property
    def input_elements(self) -> int:
        return math.prod(self.x_shape)

    @property
    def output_elements(self) -> int:
        attrs = dict(self.attrs)
        spatial = self.x_shape[2:]
        kernel = self.w_shape[2:]
        strides = list(attrs.get("strides", [1] * len(spatial)))  # type: ignore[call-overload]
        dilations = list(attrs.get("dilations", [1] * len(spatial)))  # type: ignore[call-overload]
        pads = list(attrs.get("pads", [0] * 2 * len(spatial)))  # type: ignore[call-overload]
        same = str(attrs.get("auto_pad", "NOTSET")).startswith("SAME")
        out = []
        for i, size in enumerate(spatial):
            if same:
                out.append(-(-size // strides[i]))
                continue
            span = dilations[i] * (kernel[i] - 1) + 1
            out.append(max(1, (size + pads[i] + pads[i + len(spatial)] - span) // strides[i] + 1))
        return self.x_shape[0] * self.w_shape[0] * math.prod(out)

    @property
    def weight_elements(self) -> int:
        return math.prod(self.w_shape)


@dataclasses.dataclass(frozen=True)
class MatMulSpec:
    """A MatMul/Gemm with a constant weight, as ``[m, k] @ [k, n]`` (batch folded into m)."""

    m: int
    k: int
    n: int

    def key(self) -> str:
        return f"matmul m{self.m}k{self.k}n{self.n}"

    @property
    def input_elements(self) -> int:
        return self.m * self.k

    @property
    def output_elements(self) -> int:
        return self.m * self.n

    @property
    def weight_elements(self) -> int:
        return self.k * self.n


NodeSpec = ConvSpec | MatMulSpec


def _dims(shape: ir.Shape | None, batch_first: bool = True) -> list[int] | None:
    if shape is None:
        return None
    dims = []
    for index, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        else:
            dims.append(1 if index == 0 and batch_first else SYMBOLIC_DIM)
    return dims


_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def node_spec(node: ir.Node) -> NodeSpec | None:
    """The measurable spec of a Conv, MatMul or Gemm with a constant float weight (None for
    other nodes, non-constant weights or unknown ranks)."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None or not is_constant(w) or w.const_value is None:
        return None
    w_shape = [int(d) for d in w.const_value.shape.numpy()]
    x_dims = _dims(x.shape)
    if node.op_type == "Conv":
        if x_dims is None or len(x_dims) != len(w_shape) or len(w_shape) < 3:
            return None
        attrs = tuple((k, _attr_value(node.attributes[k])) for k in _CONV_ATTRS
                      if k in node.attributes)
        dilations = dict(attrs).get("dilations") or (1,) * (len(w_shape) - 2)
        assert x.shape is not None
        for i, kernel in enumerate(w_shape[2:]):  # a symbolic extent must fit the kernel
            if not isinstance(x.shape[2 + i], int):
                span = int(dilations[i]) * (kernel - 1) + 1  # type: ignore[index]
                x_dims[2 + i] = max(SYMBOLIC_DIM, 2 * span)
        return ConvSpec(tuple(x_dims), tuple(w_shape), attrs)
    if node.op_type in ("MatMul", "Gemm") and len(w_shape) == 2:
        k, n = w_shape
        if node.op_type == "Gemm":
            trans_b = node.attributes.get("transB")
            if trans_b is not None and trans_b.as_int():
                k, n = n, k
        m = math.prod(x_dims[:-1]) if x_dims and len(x_dims) >= 2 else 1
        return MatMulSpec(max(1, m), k, n)
    return None


def _attr_value(attr: ir.Attr) -> object:
    value = attr.value
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return value


class CostModel(Protocol):
    """Times in milliseconds on this runtime; None when a form cannot be measured."""

    def node_ms(self, spec: NodeSpec, form: str) -> float | None:
        """Time of one node in ``form``: ``"float"``, ``"integer"`` (QLinearConv/
        QLinearMatMul) or ``"dynamic"`` (DynamicQuantizeLinear + ConvInteger/MatMulInteger);
        for Convs also ``"float@float"`` and ``"dynamic@float"``: the node between two float
        depthwise 1x1 Convs (what it costs its float neighbours included). A model that
        cannot answer a form returns None."""
        ...

    def transition_ms(self, direction: str, elements: int) -> float | None:
        """Time of a QuantizeLinear (``"quantize"``) or DequantizeLinear (``"dequantize"``)
        of ``elements`` values."""
        ...


def measuring_enabled(flag: bool | None = None) -> bool:
    """Whether costs are measured: ``flag`` when given, else unless the environment says
    ``ONNXQUANT_MEASURE_COSTS=0`` (or ``false``/``off``/``no``)."""
    if flag is not None:
        return flag
    return os.environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def cost_cache_path() -> Path:
    """Where measured costs are cached: ``$ONNXQUANT_COST_CACHE``, else
    ``$XDG_CACHE_HOME/onnxquant/costs.json`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxquant" / "costs.json"


def _machine_key() -> str:
    """CPU model + features + onnxruntime version: measurements are valid only there."""
    import onnxruntime

    from onnxquant.core.speed import cpu_info

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "CPU part")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {cpu_info().describe()} | onnxruntime {onnxruntime.__version__}"


def _bucket(elements: int) -> int:
    """Transition sizes are measured at powers of two (at least 1024) and scaled linearly."""
    return max(1024, 1 << max(0, math.ceil(math.log2(max(1, elements)))))


class MeasuredCosts:
    """Costs measured with onnxruntime on this machine, cached on disk.

    Args:
        path: The cache file (default :func:`cost_cache_path`).
        budget_s: Time spent timing one kernel and shape (after a warm-up run).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, budget_s: float = 0.03):
        self.path = Path(path) if path is not None else cost_cache_path()
        self.budget_s = budget_s
        self.machine = _machine_key()
        self._table: dict[str, float | None] = dict(self._read().get(self.machine, {}))
        self._new: dict[str, float | None] = {}

    def _read(self) -> dict[str, dict[str, float | None]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            logger.warning("cost cache '%s' is unreadable (%s); measuring again", self.path, err)
            return {}
        return data if isinstance(data, dict) else {}

    def _measure(self, key: str, build) -> float | None:
        if key in self._table:
            return self._table[key]
        from onnxquant.core import _cost_bench

        try:
            model, feed = build()
            value: float | None = _cost_bench.time_model(model, feed, self.budget_s)
        except Exception as err:  # noqa: BLE001 - a kernel this runtime lacks: no answer
            logger.debug("cost of %s not measurable: %s", key, err)
            value = None
        self._table[key] = self._new[key] = value
        return value

    def node_ms(self, spec: NodeSpec, form: str) -> float | None:
        """See :meth:`CostModel.node_ms`."""
        from onnxquant.core import _cost_bench

        if isinstance(spec, ConvSpec):
            attrs = dict(spec.attrs)
            return self._measure(f"{form} {spec.key()}", lambda: _cost_bench.conv_model(
                form, list(spec.x_shape), list(spec.w_shape), attrs))
        return self._measure(f"{form} {spec.key()}", lambda: _cost_bench.matmul_model(
            form, spec.m, spec.k, spec.n))

    def transition_ms(self, direction: str, elements: int) -> float | None:
        """See :meth:`CostModel.transition_ms`."""
        from onnxquant.core import _cost_bench

        size = _bucket(elements)
        value = self._measure(f"{direction} n{size}",
                              lambda: _cost_bench.transition_model(direction, size))
        return None if value is None else value * elements / size

    def save(self) -> None:
        """Merge the new measurements into the cache file (atomically; failures are logged)."""
        if not self._new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read()
            data.setdefault(self.machine, {}).update(self._new)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".costs-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
            self._new.clear()
        except OSError as err:
            logger.warning("could not write the cost cache '%s': %s", self.path, err)


_SHARED: dict[Path, MeasuredCosts] = {}


def default_cost_model(measure: bool | None = None) -> MeasuredCosts | None:
    """This machine's measured costs (one instance per cache file and process), or None when
    measuring is off (see :func:`measuring_enabled`)."""
    if not measuring_enabled(measure):
        return None
    path = cost_cache_path()
    if path not in _SHARED:
        _SHARED[path] = MeasuredCosts(path)
    return _SHARED[path]
