"""GPTQ calibration of a large model in segments, so that onnxruntime never holds all its weights.

A session over the whole model loads every weight: calibration alone would need the model's
size in memory. Instead, the main-graph nodes that the wanted activations depend on are cut,
in graph (topological) order, into segments of at most ``budget`` initializer bytes. Each
segment becomes a small model — its nodes, its initializers (external data still read in place),
its boundary values as inputs and outputs — with its own session, which runs every calibration
feed before it is dropped. Boundary values are spilled to ``.npy`` files in a private folder, so
memory does not grow with the number of feeds. Graphs with subgraphs (If/Loop/Scan, whose bodies
may read outer values implicitly) or with initializer-backed inputs run whole instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

__all__ = ["Segment", "plan_segments", "run_segments"]

Update = Callable[[str, np.ndarray], None]


@dataclasses.dataclass
class Segment:
    """Nodes run by one session, the values it is fed and the values it must return."""

    nodes: list[ir.Node]
    inputs: list[ir.Value]
    outputs: list[ir.Value]


def plan_segments(model: ir.Model, wanted: Collection[str], budget: int) -> list[Segment]:
    """Segments of at most ``budget`` initializer bytes producing ``wanted``; [] to run whole."""
    nodes = _needed_nodes(model.graph, wanted)
    if nodes is None:
        return []
    groups = _split(nodes, budget)
    if len(groups) < 2:
        return []
    last_use: dict[int, int] = {}
    for i, group in enumerate(groups):
        for node in group:
            last_use.update((id(v), i) for v in node.inputs if v is not None)
    segments = []
    for i, group in enumerate(groups):
        produced = {id(v) for node in group for v in node.outputs}
        inputs = {id(v): v for node in group for v in node.inputs
                  if v is not None and not v.is_initializer() and id(v) not in produced}
        outputs = [v for node in group for v in node.outputs
                   if last_use.get(id(v), -1) > i or v.name in wanted]
        segments.append(Segment(group, list(inputs.values()), outputs))
    return segments


def _needed_nodes(graph: ir.Graph, wanted: Collection[str]) -> list[ir.Node] | None:
    """Main-graph nodes the ``wanted`` values depend on, in graph order (None: don't cut)."""
    if any(v.is_initializer() for v in graph.inputs):
        return None
    for node in graph:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            return None
    stack = [v for node in graph for v in node.outputs if v.name in wanted]
    needed: set[int] = set()
    while stack:
        producer = stack.pop().producer()
        if producer is None or id(producer) in needed:
            continue
        needed.add(id(producer))
        stack.extend(v for v in producer.inputs if v is not None)
    return [node for node in graph if id(node) in needed]


def _split(nodes: list[ir.Node], budget: int) -> list[list[ir.Node]]:
    groups: list[list[ir.Node]] = [[]]
    seen: set[int] = set()
    size = 0
    for node in nodes:
        weights = {id(v): v.const_value.nbytes for v in node.inputs
                   if v is not None and v.is_initializer() and v.const_value is not None}
        extra = sum(b for key, b in weights.items() if key not in seen)
        if groups[-1] and extra and size + extra > budget:
            groups.append([])
            seen, size = set(), 0
            extra = sum(weights.values())
        groups[-1].append(node)
        seen.update(weights)
        size += extra
    return groups


def segment_model(model: ir.Model, segment: Segment, dtypes: dict[str, np.dtype]) -> ir.Model:
    """A standalone model of ``segment`` (tensors shared; boundary input types from ``dtypes``)."""
    mapping: dict[int, ir.Value] = {}
    inputs = []
    for v in segment.inputs:
        vtype = v.type if v.type is not None else ir.TensorType(
            ir.DataType.from_numpy(dtypes[v.name or ""]))
        mapping[id(v)] = ir.Value(name=v.name, type=vtype,
                                  shape=ir.Shape(v.shape) if v.shape is not None else None)
        inputs.append(mapping[id(v)])
    initializers, nodes = [], []
    for node in segment.nodes:
        for value in node.inputs:
            if value is not None and id(value) not in mapping:  # an initializer
                mapping[id(value)] = ir.Value(
                    name=value.name, type=value.type, const_value=value.const_value,
                    shape=ir.Shape(value.shape) if value.shape is not None else None)
                initializers.append(mapping[id(value)])
        outputs = [ir.Value(name=v.name, type=v.type) for v in node.outputs]
        mapping.update((id(v), new) for v, new in zip(node.outputs, outputs, strict=True))
        nodes.append(ir.Node(
            node.domain, node.op_type, [None if v is None else mapping[id(v)] for v in node.inputs],
            [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
            overload=node.overload, outputs=outputs, version=node.version, name=node.name))
    graph = ir.Graph(inputs, [mapping[id(v)] for v in segment.outputs], nodes=nodes,
                     initializers=initializers, opset_imports=dict(model.opset_imports),
                     name=model.graph.name)
    return ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values()))


class _Spill:
    """Boundary values per feed, as .npy files under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[tuple[int, str], Path] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.written = 0

    def put(self, index: int, name: str, array: np.ndarray) -> None:
        path = self.folder / f"value{self.written}.npy"
        self.written += 1
        np.save(path, array)
        self.paths[(index, name)] = path
        self.dtypes[name] = array.dtype

    def get(self, index: int, name: str) -> np.ndarray:
        return np.load(self.paths[(index, name)])

    def drop(self, names: Iterable[str], count: int) -> None:
        for name in names:
            for index in range(count):
                path = self.paths.pop((index, name), None)
                if path is not None:
                    path.unlink(missing_ok=True)


def run_segments(model: ir.Model, segments: list[Segment], feeds: Iterable[dict],
                 update: Update, *, providers: Sequence[str], workdir: Path,
                 progress: bool = False) -> int:
    """Run every feed through every segment, one session at a time; returns the feed count.

    ``update(name, array)`` sees every fed graph input and every segment output. With
    ``progress``, a bar counts the (segment, feed) runs.
    """
    spill = _Spill(workdir)
    fed = {v.name or "" for seg in segments for v in seg.inputs if v.is_graph_input()}
    count = 0
    for index, feed in enumerate(feeds):
        for name in fed:
            update(name, feed[name])
            spill.put(index, name, np.asarray(feed[name]))
        count = index + 1
    with tqdm(total=count * len(segments), desc=f"GPTQ calibration ({len(segments)} segments)",
              unit="run", disable=not progress) as bar:
        _run_each(model, segments, spill, count, update, providers, workdir, bar)
    return count


def _run_each(model: ir.Model, segments: list[Segment], spill: _Spill, count: int,
              update: Update, providers: Sequence[str], workdir: Path, bar: Any) -> None:
    """Every stored feed through each segment in turn."""
    from onnxquant.calibration.session import make_session, run_batch

    for i, segment in enumerate(segments):
        names = [v.name or "" for v in segment.outputs]
        keep = {v.name for later in segments[i + 1:] for v in later.inputs}
        session = make_session(segment_model(model, segment, spill.dtypes), providers, workdir)
        for index in range(count):
            feed = {v.name or "": spill.get(index, v.name or "") for v in segment.inputs}
            for name, array in zip(names, run_batch(session, names, feed, index), strict=True):
                update(name, array)
                if name in keep:
                    spill.put(index, name, array)
            bar.update(1)
        del session
        spill.drop({v.name or "" for v in segment.inputs} - keep, count)
