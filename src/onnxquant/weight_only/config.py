"""Typed configuration of block-wise weight-only quantization."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping
from typing import Any

from onnxquant.calibration.ray_cluster import backend_problem
from onnxquant.core.errors import QuantizationError
from onnxquant.core.qtypes import QuantFormat

__all__ = [
    "WeightOnlyAlgorithm",
    "WeightOnlyConfig",
    "GPTQSettings",
    "NodeSettings",
    "WeightOnlyConfigError",
    "SUPPORTED_OP_TYPES",
    "OVERRIDE_KEYS",
]

SUPPORTED_OP_TYPES = ("MatMul", "Gather")
OVERRIDE_KEYS = ("bits", "block_size", "symmetric", "algorithm", "accuracy_level")


class WeightOnlyConfigError(QuantizationError, ValueError):
    """A weight-only setting is invalid (bad bits, block size, op type, override, ...)."""


class WeightOnlyAlgorithm(enum.Enum):
    """How block parameters are found."""

    RTN = "rtn"  # round to nearest on the block's range
    HQQ = "hqq"  # half-quadratic optimisation of the zero points (no data needed)
    GPTQ = "gptq"  # error-compensating rounding with calibration data (MatMul only)


@dataclasses.dataclass(frozen=True)
class GPTQSettings:
    """Settings of the GPTQ algorithm.

    Attributes:
        percdamp: Dampening added to the Hessian diagonal, as a fraction of its mean.
        act_order: Quantize columns in order of decreasing Hessian diagonal.
        max_calibration_samples: Use at most this many calibration feeds (None: all).
        providers: onnxruntime execution providers of the calibration session.
    """

    percdamp: float = 0.01
    act_order: bool = False
    max_calibration_samples: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    """The resolved settings of one node (the config's, with its per-node override applied)."""

    bits: int
    block_size: int | None
    symmetric: bool
    algorithm: WeightOnlyAlgorithm
    accuracy_level: int | None


@dataclasses.dataclass
class WeightOnlyConfig:
    """Settings of :func:`onnxquant.weight_only.quantize_weights`.

    Attributes:
        bits: Bits per weight: 2, 4 or 8 (QDQ stores 4 or 8).
        block_size: Weights per block along the reduction axis (K for MatMul): a power of two
            of at least 16. None quantizes channel-wise (one block per output column).
        symmetric: Symmetric blocks (no stored zero points; implied zero point
            ``2**(bits-1)``); otherwise each block has its own zero point.
        algorithm: RTN, HQQ (asymmetric only) or GPTQ (needs calibration data; Gather tables
            are quantized with RTN since they see no activations).
        format: QOPERATOR: ``com.microsoft`` MatMulNBits / GatherBlockQuantized. QDQ: a
            blocked ``DequantizeLinear`` (opset 21, int4/uint4 or int8/uint8) feeding the
            original MatMul; Gather nodes always use GatherBlockQuantized.
        accuracy_level: MatMulNBits ``accuracy_level`` (0-4; 4 = int8 compute of A on CPU);
            None leaves the attribute unset.
        op_types: Op types to quantize (``MatMul``, ``Gather``).
        quant_axes: Quantize axis per op type; ``{"Gather": 1}`` blocks embedding rows along
            the hidden dimension (MatMul weights are always blocked along K, axis 0).
        nodes_to_include: If given, only these node names are quantized.
        nodes_to_exclude: Node names never quantized.
        overrides: Per node name, a dict with any of ``bits``, ``block_size``, ``symmetric``,
            ``algorithm`` and ``accuracy_level``, e.g. ``{"lm_head": {"bits": 8}}``.
        gptq: GPTQ settings.
        hqq_iterations: Optimisation steps of HQQ.
        subgraphs: Quantize inside If/Loop/Scan bodies too.
        external_data: Save tensors to ``<output>.data``; None decides by size (> 2 GB).
        upgrade_opset: Convert models below opset 10 instead of refusing them.
        evaluate: After writing, measure how close the quantized outputs stay to the float
            ones (``WeightOnlyResult.fidelity``): GPTQ holds every 10th calibration feed (at
            most 16) back for it; without data, 4 random feeds when every model input is a
            float tensor. Explicit ``eval_data`` is measured either way.
        progress: Show progress bars.
        reshape_unit_dims: A MatMul weight with unit leading dims (``[1, ..., K, N]``) is
            stored 2-D in both formats, and MatMul's output shape is restored by a chain of
            shape ops ending in a ``Reshape`` (onnxruntime's graph; A may be 1-D then). False:
            an ``Unsqueeze``/``Add`` after MatMulNBits, an N-D ``DequantizeLinear`` in QDQ.
        calibration_backend: Where GPTQ's Hessians are accumulated: ``"local"`` (this
            process) or ``"ray"`` (``calibration_workers`` actors of a Ray cluster, one CPU
            each, every one running the whole float model over shards of the feeds; ``pip
            install onnxquant[ray]``; models over 2 GB are refused, as for static). The
            driver adds the workers' float64 sums in shard order, so the Hessians agree with
            one process to float64 rounding (not bitwise) and the quantized weights match but
            for rare rounding ties.
        ray_address: With ``calibration_backend="ray"``: the ``host:port`` of a running
            cluster (``ray start --head``; ``"auto"``, ``ray://host:port``); None starts a local
            cluster bound to 127.0.0.1, or uses a Ray already initialised in this process.
        calibration_workers: Ray workers sharing GPTQ's calibration inference (more than one
            needs ``calibration_backend="ray"``).
    """

    bits: int = 4
    block_size: int | None = 128
    symmetric: bool = False
    algorithm: WeightOnlyAlgorithm = WeightOnlyAlgorithm.RTN
    format: QuantFormat = QuantFormat.QOPERATOR
    accuracy_level: int | None = None
    op_types: Collection[str] = ("MatMul",)
    quant_axes: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"Gather": 1})
    nodes_to_include: Collection[str] | None = None
    nodes_to_exclude: Collection[str] = ()
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    gptq: GPTQSettings = dataclasses.field(default_factory=GPTQSettings)
    hqq_iterations: int = 20
    subgraphs: bool = True
    external_data: bool | None = None
    upgrade_opset: bool = False
    evaluate: bool = True
    progress: bool = False
    reshape_unit_dims: bool = False
    calibration_backend: str = "local"
    ray_address: str | None = None
    calibration_workers: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.algorithm, str):
            self.algorithm = _algorithm(self.algorithm, "algorithm")
        self.validate()

    def validate(self) -> None:
        """Check every field; raises :class:`WeightOnlyConfigError` naming the bad one."""
        if not isinstance(self.format, QuantFormat):
            raise WeightOnlyConfigError(
                f"format must be a QuantFormat (QOPERATOR or QDQ), got {self.format!r}")
        unknown = set(self.op_types) - set(SUPPORTED_OP_TYPES)
        if unknown:
            raise WeightOnlyConfigError(
                f"op_types {sorted(unknown)} are not supported by weight-only quantization; "
                f"use {list(SUPPORTED_OP_TYPES)}")
        for op, axis in self.quant_axes.items():
            if op == "MatMul" and axis != 0:
                raise WeightOnlyConfigError(
                    f"quant_axes['MatMul'] = {axis}: MatMul weights are blocked along K "
                    "(axis 0) only")
            if op not in SUPPORTED_OP_TYPES or not isinstance(axis, int):
                raise WeightOnlyConfigError(
                    f"quant_axes has {op!r}: {axis!r}; give {{'Gather': <int axis>}}")
        if self.hqq_iterations < 1:
            raise WeightOnlyConfigError("hqq_iterations must be at least 1")
        if not 0 <= self.gptq.percdamp:
            raise WeightOnlyConfigError(f"gptq.percdamp must be >= 0, got {self.gptq.percdamp}")
        problem = backend_problem(self.calibration_backend, self.ray_address,
                                  self.calibration_workers)
        if problem is None and self.calibration_workers > 1 and self.calibration_backend != "ray":
            problem = ("calibration_workers > 1 needs calibration_backend='ray' (GPTQ's local "
                       "Hessian collection runs in this process)")
        if problem is not None:
            raise WeightOnlyConfigError(problem)
        self.settings_for("")
        for name, override in self.overrides.items():
            bad = set(override) - set(OVERRIDE_KEYS)
            if bad:
                raise WeightOnlyConfigError(
                    f"override for node '{name}' has unknown keys {sorted(bad)}; allowed: "
                    f"{list(OVERRIDE_KEYS)}")
            self.settings_for(name)

    def settings_for(self, node_name: str) -> NodeSettings:
        """The settings of the node called ``node_name`` (its override applied, validated)."""
        override = dict(self.overrides.get(node_name, {}))
        where = f"override for node '{node_name}'" if override else "config"
        algorithm = override.get("algorithm", self.algorithm)
        if isinstance(algorithm, str):
            algorithm = _algorithm(algorithm, where)
        settings = NodeSettings(
            bits=override.get("bits", self.bits),
            block_size=override.get("block_size", self.block_size),
            symmetric=override.get("symmetric", self.symmetric),
            algorithm=algorithm,
            accuracy_level=override.get("accuracy_level", self.accuracy_level),
        )
        _check_settings(settings, self.format, where)
        return settings


def _algorithm(text: str, where: str) -> WeightOnlyAlgorithm:
    try:
        return WeightOnlyAlgorithm(text.lower())
    except ValueError:
        choices = [a.value for a in WeightOnlyAlgorithm]
        raise WeightOnlyConfigError(
            f"{where}: unknown algorithm {text!r}; use one of {choices}") from None


def _check_settings(s: NodeSettings, fmt: QuantFormat, where: str) -> None:
    if s.bits not in (2, 4, 8) or isinstance(s.bits, bool):
        raise WeightOnlyConfigError(f"{where}: bits must be 2, 4 or 8, got {s.bits!r}")
    if fmt is QuantFormat.QDQ and s.bits == 2:
        raise WeightOnlyConfigError(
            f"{where}: QDQ format stores 4 or 8 bits (DequantizeLinear has no 2-bit type "
            "that onnxruntime runs); use format=QOPERATOR (MatMulNBits) for 2 bits")
    bs = s.block_size
    if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 16
                           or bs & (bs - 1)):
        raise WeightOnlyConfigError(
            f"{where}: block_size must be a power of two >= 16 (16, 32, 64, 128, ...) or None "
            f"for channel-wise blocks, got {bs!r}")
    if s.accuracy_level is not None and s.accuracy_level not in (0, 1, 2, 3, 4):
        raise WeightOnlyConfigError(
            f"{where}: accuracy_level must be 0-4 or None, got {s.accuracy_level!r}")
    if not isinstance(s.symmetric, bool):
        raise WeightOnlyConfigError(f"{where}: symmetric must be True or False")
    if s.algorithm is WeightOnlyAlgorithm.HQQ and s.symmetric:
        raise WeightOnlyConfigError(
            f"{where}: HQQ optimises zero points and is asymmetric only; set symmetric=False "
            "or use RTN/GPTQ")
