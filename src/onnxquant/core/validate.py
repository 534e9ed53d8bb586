"""Checks of a model's structure before any work starts, on the protobuf without its weights.

onnx's own tools answer what they can: strict shape inference finds wrong-rank weights, shape and
type mismatches; onnxruntime's operator registry says which ops exist, and onnxruntime itself says
whether it accepts the model's IR and opset versions. What they cannot see, or see only with a
misleading message, is checked here:

- ``onnx.checker`` wants nodes topologically sorted, which onnxruntime does not; a node that reads
  an undefined name and a cycle get the same "not topologically sorted" error there. We tell
  them apart (and name the node and the tensor) with a scope-aware walk of our own.
- ``onnx.checker`` also refuses graph outputs without a shape, which onnxruntime accepts: it is
  not run whole, only shape inference is.
- initializer data that does not match its dims, and sparse initializers (densified here:
  ``onnx_ir`` drops them silently), are found before a tensor is ever read.

Every refusal is an :class:`~onnxquant.core.errors.UnsupportedModelError` or
:class:`~onnxquant.core.errors.ModelLoadError` naming the node, tensor or graph.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from onnxquant.core.errors import ModelLoadError, UnsupportedModelError

__all__ = ["runtime_reason", "validate_structure", "densify_sparse_initializers",
           "check_initializer_sizes", "check_versions", "KNOWN_DOMAINS"]

KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                           "com.ms.internal.nhwc", "ai.onnx.preview.training"})
_DEFAULT = ("", "ai.onnx")
_FIX = "fix the model (re-export it, or repair it with onnx.helper) and try again"


def runtime_reason(err: BaseException) -> str:
    """onnxruntime's own message in one of its exceptions, without the ``[ONNXRuntimeError] :
    1 : FAIL :`` prefix."""
    return str(err).split(" : ", 3)[-1].strip()


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from iter_graphs(sub)


def _node_label(node: onnx.NodeProto, index: int) -> str:
    name = f"'{node.name}'" if node.name else f"#{index} (unnamed)"
    domain = f"{node.domain}::" if node.domain not in _DEFAULT else ""
    return f"node {name} ({domain}{node.op_type})"


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads that it does not define itself (its implicit inputs)."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            reads |= _outer_reads(sub)
        defined.update(n for n in node.output if n)
    reads.update(o.name for o in graph.output)
    return reads - defined


def _check_graph(graph: onnx.GraphProto, outer: frozenset[str], where: str) -> None:
    """Every read is defined, every name assigned once, no cycle; then the subgraphs."""
    own = [v.name for v in graph.input]
    own += [t.name for t in graph.initializer if t.name not in set(own)]
    own += [t.values.name for t in graph.sparse_initializer]
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in own:
                raise UnsupportedModelError(
                    f"{where}: tensor '{name}' is assigned twice (by "
                    f"{_node_label(node, index)} and earlier); ONNX needs every name assigned "
                    f"once; {_FIX}")
            producer[name] = index
    scope = outer | set(own) | set(producer)
    deps: list[set[int]] = []
    for index, node in enumerate(graph.node):
        reads = {n for n in node.input if n}
        for sub in _subgraphs(node):
            reads |= _outer_reads(sub)
        missing = sorted(reads - scope)
        if missing:
            raise UnsupportedModelError(
                f"{where}: {_node_label(node, index)} reads '{missing[0]}', which no graph "
                "input, initializer or node output defines (nor an enclosing graph); "
                f"{_FIX}")
        deps.append({producer[n] for n in reads if n in producer})
    for output in graph.output:
        if output.name not in scope:
            raise UnsupportedModelError(
                f"{where}: graph output '{output.name}' is not defined by any node, input or "
                f"initializer; {_FIX}")
    _check_acyclic(graph, deps, where)
    inner = frozenset(scope)
    for index, node in enumerate(graph.node):
        for sub in _subgraphs(node):
            _check_graph(sub, inner, f"{where} > subgraph '{sub.name}' of "
                                     f"{_node_label(node, index)}")


def _check_acyclic(graph: onnx.GraphProto, deps: list[set[int]], where: str) -> None:
    waiting = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in deps]
    for index, dep in enumerate(deps):
        for d in dep:
            users[d].append(index)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if done < len(deps):
        stuck = next(i for i, n in enumerate(waiting) if n > 0)
        raise UnsupportedModelError(
            f"{where}: the graph contains a cycle through {_node_label(graph.node[stuck], stuck)}"
            f"; an ONNX graph must be acyclic; {_FIX}")


def _tensor_label(tensor: TensorProto) -> str:
    return f"initializer '{tensor.name}'"


def _elem_count(tensor: TensorProto) -> int:
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"{_tensor_label(tensor)} has negative dims {dims}; {_FIX}")
    return math.prod(dims)


_PACKED_4BIT = {TensorProto.INT4, TensorProto.UINT4}
if hasattr(TensorProto, "FLOAT4E2M1"):
    _PACKED_4BIT.add(TensorProto.FLOAT4E2M1)


def _typed_field(data_type: int) -> str | None:
    try:
        return onnx.helper.tensor_dtype_to_field(data_type)
    except (KeyError, ValueError):
        return None


def _itemsize(data_type: int) -> int | None:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def expected_bytes(data_type: int, count: int) -> int | None:
    """Bytes of ``count`` elements of ``data_type`` stored raw (None for strings/unknown)."""
    if data_type in _PACKED_4BIT:
        return (count + 1) // 2
    if data_type == TensorProto.STRING:
        return None
    size = _itemsize(data_type)
    return None if size is None else size * count


def check_initializer_sizes(graph: onnx.GraphProto) -> None:
    """In-file initializers (all graphs) hold exactly as many values as their dims say."""
    for g in iter_graphs(graph):
        for tensor in g.initializer:
            _check_tensor_size(tensor)


def _check_tensor_size(tensor: TensorProto) -> None:
    if tensor.data_location == TensorProto.EXTERNAL:
        _elem_count(tensor)
        return  # checked against its file by the external-data containment
    count = _elem_count(tensor)
    if tensor.data_type == TensorProto.UNDEFINED:
        raise ModelLoadError(f"{_tensor_label(tensor)} has no element type; {_FIX}")
    if tensor.HasField("raw_data"):
        want = expected_bytes(tensor.data_type, count)
        have = len(tensor.raw_data)
        if want is not None and have != want:
            raise ModelLoadError(
                f"{_tensor_label(tensor)} declares dims {list(tensor.dims)} "
                f"({count} values, {want} bytes) but holds {have} bytes of data; {_FIX}")
        return
    field = _typed_field(tensor.data_type)
    if field is None:
        return
    have = len(getattr(tensor, field))
    want_values = count
    if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        want_values = 2 * count
    elif tensor.data_type in _PACKED_4BIT:
        want_values = (count + 1) // 2
    if have != want_values and not (have == 0 and count == 0):
        raise ModelLoadError(
            f"{_tensor_label(tensor)} declares dims {list(tensor.dims)} ({count} values) but "
            f"holds {have} values in {field}; {_FIX}")


def densify_sparse_initializers(graph: onnx.GraphProto) -> int:
    """Turn every sparse initializer (all graphs) into a dense one; returns how many.

    ``onnx_ir`` does not read sparse initializers (they would silently vanish), and onnxruntime's
    quantized kernels need dense weights anyway.
    """
    count = 0
    for g in iter_graphs(graph):
        for sparse in list(g.sparse_initializer):
            g.initializer.append(_densify(sparse))
            count += 1
        del g.sparse_initializer[:]
    return count


def _densify(sparse: onnx.SparseTensorProto) -> TensorProto:
    name = sparse.values.name
    dims = list(sparse.dims)
    try:
        values = onnx.numpy_helper.to_array(sparse.values).ravel()
        indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
        dense = np.zeros(math.prod(dims), dtype=values.dtype)
        if indices.ndim == 2:  # [NNZ, rank] coordinates
            indices = np.ravel_multi_index(tuple(indices.T), dims)
        dense[indices.ravel()] = values
    except (ValueError, IndexError, TypeError) as err:
        raise ModelLoadError(
            f"sparse initializer '{name}' (dims {dims}) is inconsistent: {err}; {_FIX}") from err
    return onnx.numpy_helper.from_array(dense.reshape(dims), name)


@functools.cache
def _runtime_ops() -> dict[tuple[str, str], int]:
    """(domain, op type) -> the oldest version onnxruntime registers it in."""
    from onnxruntime.capi import _pybind_state

    ops: dict[tuple[str, str], int] = {}
    for schema in _pybind_state.get_all_operator_schema():
        key = (schema.domain, schema.name)
        ops[key] = min(ops.get(key, schema.since_version), schema.since_version)
    return ops


def check_ops(model: onnx.ModelProto, where: str) -> None:
    """Every node's op exists in onnxruntime for the model's opset of its domain (or is a
    model-local function)."""
    imports = {("" if i.domain == "ai.onnx" else i.domain): i.version for i in model.opset_import}
    functions = {(f.domain, f.name) for f in model.functions}
    known = _runtime_ops()
    graphs = list(iter_graphs(model.graph))
    for g in graphs:
        for index, node in enumerate(g.node):
            domain = "" if node.domain == "ai.onnx" else node.domain
            if (node.domain, node.op_type) in functions:
                continue
            label = f"{where}: {_node_label(node, index)}"
            if domain not in imports:
                raise UnsupportedModelError(
                    f"{label} uses domain '{domain or 'ai.onnx'}', which the model does not "
                    f"import (no opset_import entry); {_FIX}")
            if domain not in KNOWN_DOMAINS:
                raise UnsupportedModelError(
                    f"{label} uses the custom domain '{domain}', which onnxruntime does not know "
                    "(custom-op libraries are not supported); remove or replace the node")
            since = known.get((domain, node.op_type))
            if since is None or since > imports[domain]:
                version = f" in opset {imports[domain]}" if since is not None else ""
                raise UnsupportedModelError(
                    f"{label}: onnxruntime has no operator '{node.op_type}' in domain "
                    f"'{domain or 'ai.onnx'}'{version}; check the op type (spelling, domain) "
                    "or the model's opset")


def check_versions(model: onnx.ModelProto, where: str) -> None:
    """The IR version and the opsets are ones the installed onnx and onnxruntime support.

    onnxruntime is asked directly: an empty model with the same versions is loaded, so the
    answer is onnxruntime's own (it refuses IR and opset versions newer than it knows).
    """
    if model.ir_version > onnx.IR_VERSION:
        raise UnsupportedModelError(
            f"{where} has IR version {model.ir_version}, newer than the installed onnx "
            f"supports ({onnx.IR_VERSION}); upgrade onnx and onnxruntime, or re-export the "
            "model with an older IR version")
    if model.ir_version < 3:
        raise UnsupportedModelError(
            f"{where} has IR version {model.ir_version}; opsets need IR version 3 or newer; "
            "re-export the model")
    probe = onnx.ModelProto(ir_version=model.ir_version)
    probe.opset_import.extend(model.opset_import)
    probe.graph.name = "version_probe"
    value = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    probe.graph.input.append(value)
    probe.graph.output.append(value)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(probe.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        message = runtime_reason(err)
        versions = ", ".join(f"{i.domain or 'ai.onnx'} {i.version}" for i in model.opset_import)
        raise UnsupportedModelError(
            f"onnxruntime refuses the versions of {where} (IR {model.ir_version}; opsets "
            f"{versions}): {message}. Convert the model to an opset this onnxruntime supports "
            "(onnx.version_converter) or upgrade onnxruntime") from err


def check_shapes(skeleton: onnx.ModelProto, where: str) -> set[str]:
    """onnx's strict shape and type inference over the structure (weights' dims only).

    Declared intermediate and output shapes are set aside first (element types stay): stale
    shape annotations that exporters leave behind are not errors onnxruntime refuses a model
    for (it merges them leniently). Where onnx's inference fails, onnxruntime has the last word
    (onnx's strict mode also fails inside some of its own function bodies): the model is refused
    only when onnxruntime refuses it too.

    Returns:
        The names of values whose declared shape contradicts the inferred one (to be dropped:
        they would mislead every pass that trusts annotations).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(skeleton)
    declared: dict[str, list[int | str]] = {}
    for g in iter_graphs(copy.graph):
        fixed = {v.name for v in g.input} | {t.name for t in g.initializer}
        for value in [*g.value_info, *g.output]:
            tensor_type = value.type.tensor_type if value.type.HasField("tensor_type") else None
            if value.name in fixed:
                continue  # inputs and weights: their shapes are facts, not annotations
            if tensor_type is not None and tensor_type.HasField("shape"):
                declared[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param
                                        for d in tensor_type.shape.dim]
                tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
        refusal = _runtime_refusal(copy)
        if refusal is not None:
            raise UnsupportedModelError(
                f"{where} is inconsistent: {str(err).strip()} (onnxruntime: {refusal}); "
                f"{_FIX}") from err
        return set()
    return {name for name, dims in _inferred_dims(inferred).items()
            if name in declared and _contradicts(declared[name], dims)}


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    dims: dict[str, list[int | str]] = {}
    for g in iter_graphs(model.graph):
        for value in [*g.value_info, *g.output]:
            t = value.type.tensor_type if value.type.HasField("tensor_type") else None
            if t is not None and t.HasField("shape"):
                dims[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param
                                    for d in t.shape.dim]
    return dims


def _contradicts(declared: list[int | str], inferred: list[int | str]) -> bool:
    if len(declared) != len(inferred):
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b
               or isinstance(a, int) and a < 0 for a, b in zip(declared, inferred, strict=True))


def _runtime_refusal(skeleton: onnx.ModelProto) -> str | None:
    """onnxruntime's reason for refusing the structure, or None when it loads it.

    Weights stored outside the protobuf (placeholders or external files) become graph inputs of
    the same type and shape, so nothing is read."""
    import onnxruntime as ort

    graph = skeleton.graph
    inputs = {v.name for v in graph.input}
    kept = []
    for tensor in graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            kept.append(tensor)
        elif tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    if len(kept) != len(graph.initializer):
        kept = [TensorProto.FromString(t.SerializeToString()) for t in kept]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(skeleton.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        return runtime_reason(err)
    return None


def validate_structure(skeleton: onnx.ModelProto, where: str) -> None:
    """Versions, graph soundness and ops (see the module docstring); shapes are
    :func:`check_shapes`, on a weight-less copy."""
    check_versions(skeleton, where)
    _check_graph(skeleton.graph, frozenset(), where)
    check_ops(skeleton, where)
