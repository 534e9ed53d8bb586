"""Symbolic shape inference that never aborts: infer what can be inferred, report the rest.

Contract: :func:`infer_symbolic_shapes` changes only the types and shapes of node outputs
(no node, initializer or graph input/output is touched), never raises for what inference
cannot do, and returns a :class:`~onnxquant.preprocess.report.StepReport` saying how many values
gained a shape and, when inference stopped early, at which node and why.

Why onnxruntime's ``SymbolicShapeInference`` (``onnxruntime.tools.symbolic_shape_infer``, not
part of ``onnxruntime.quantization``): it computes dimensions as sympy expressions through
Reshape/Slice/Concat chains, names them consistently (``batch``, ``2*seq``) and knows the
com.microsoft ops (Attention, SkipLayerNormalization, ...) that ONNX's own inference cannot
see through. Used as onnxruntime's ``quant_pre_process`` uses it, it is all or nothing: on the
seven models of our corpus it raised on 6 (``AssertionError`` in its Concat and If rules for
rapidocr_cls_v2 and silero_vad, "Incomplete symbolic shape inference" for minilm_l6,
magika_v3_3, rapidocr_det_v4 and rapidocr_rec_v4 without ``auto_merge``) and wrote
``sym_shape_infer_temp.onnx`` (and a uuid-named ``.data`` file) into the working directory on
the way out. Here the same engine is
driven step by step: whatever it inferred before it stopped is kept (except the outputs of the
node it stopped at), nothing is written anywhere, and ONNX shape inference with data
propagation (:mod:`onnxquant.preprocess.onnx_shapes`) fills in after it in the pipeline.

``auto_merge`` stays off by default, as in onnxruntime: it resolves a conflict by assuming two
dimensions equal, and when one of them is a number that number is written into the shapes of
values whose real size may differ (a batch of 1 assumed where 4 may come), which onnxruntime's
optimizer may then fold as a constant. Turned on, it completes more shapes on our corpus
(after the whole pipeline, minilm_l6: 296 of 296 complete instead of 74 of 302, and 6 nodes
fewer; rapidocr_det_v4: 328 instead of 284 of 328) with the same outputs on our inputs.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from onnxquant.core import model_io
from onnxquant.preprocess._value_info import (
    apply_value_infos,
    node_values,
    proto_value_infos,
    structure_for_inference,
)
from onnxquant.preprocess.report import StepReport

__all__ = ["infer_symbolic_shapes", "STEP"]

logger = logging.getLogger(__name__)

STEP = "symbolic shapes"
_MIN_OPSET = 7  # onnxruntime's symbolic inference refuses older models


def infer_symbolic_shapes(
    model: ir.Model,
    *,
    auto_merge: bool = False,
    int_max: int = 2**31 - 1,
    guess_output_rank: bool = False,
    verbose: int = 0,
) -> StepReport:
    """Run onnxruntime's symbolic shape inference on ``model`` in place, keeping whatever it
    inferred even when it stops early.

    Args:
        model: The model; only types and shapes of node outputs change.
        auto_merge: Merge conflicting symbolic dimensions (``a`` vs ``b`` where a
            broadcast needs them equal) instead of stopping there.
        int_max: The integer treated as unbounded in Slice ends and the like.
        guess_output_rank: Give outputs of unknown ops the rank of their first input.
        verbose: onnxruntime's verbosity (0 silent, 1 warnings, 3 detail), logged by its
            logger.

    Returns:
        What happened; ``problem`` names the node inference stopped at, and why.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as err:  # sympy missing
        return StepReport(STEP, False, problem=f"onnxruntime's symbolic shape inference is not "
                          f"available ({err}); install sympy")
    if model_io.default_opset(model) < _MIN_OPSET:
        return StepReport(STEP, False, problem=f"opset {model_io.default_opset(model)} is below "
                          f"{_MIN_OPSET}, which symbolic shape inference needs")
    proto = structure_for_inference(model)
    engine = SymbolicShapeInference(int_max, auto_merge, guess_output_rank, verbose)
    current: list[str] = []  # the main-graph node being inferred
    infer_node = engine._onnx_infer_single_node

    def tracked(node: onnx.NodeProto) -> None:
        current[:] = [node.name]
        infer_node(node)

    engine._onnx_infer_single_node = tracked  # type: ignore[method-assign]
    problem: str | None = None
    skip: frozenset[str] = frozenset()
    stopped: str | None = None
    try:
        engine._preprocess(proto)
        complete = False
        while engine.run_:
            complete = engine._infer_impl()
        if not complete:
            stopped = current[0] if current else None
            where = _describe(stopped, proto)
            problem = (f"stopped at {where}: its output dimensions conflict with symbolic "
                       "dimensions seen before" + ("" if auto_merge else
                                                   " (auto_merge would merge them)"))
    except Exception as err:  # noqa: BLE001 - its rules assert on what they do not support
        stopped = current[0] if current else None
        message = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        problem = f"stopped at {_describe(stopped, proto)} ({message})"
        skip = frozenset(_outputs_of(stopped, proto))  # half-inferred
        logger.debug("symbolic shape inference failed", exc_info=True)
    infos = _inferred(engine)
    gained = apply_value_infos(node_values(model), infos, skip)
    kept = "kept the shapes inferred before it" if problem else ""
    details = (f"{gained} value shapes added or refined" + (f"; {kept}" if kept else ""),)
    return StepReport(STEP, gained > 0, details, problem, stopped if problem else None)


def _inferred(engine: object) -> dict[str, onnx.ValueInfoProto]:
    """The value infos the engine produced so far (main graph and subgraphs)."""
    out = getattr(engine, "out_mp_", None)
    infos = proto_value_infos(out.graph) if out is not None else {}
    known = getattr(engine, "known_vi_", {})
    for name, info in known.items():
        if info.type.WhichOneof("value") is not None:
            infos[name] = info
    return infos


def _describe(node_name: str | None, proto: onnx.ModelProto) -> str:
    for node in proto.graph.node:
        if node.name == node_name:
            return f"node '{node.name}' ({node.op_type})"
    return "the start of the graph"


def _outputs_of(node_name: str | None, proto: onnx.ModelProto) -> list[str]:
    for node in proto.graph.node:
        if node.name == node_name:
            return list(node.output)
    return []
