"""Model-wide unique names for the nodes, values and initializers a rewrite adds."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["UniqueNames"]


class UniqueNames:
    """Allocator of names unused anywhere in a model (all graphs and functions share one
    namespace); ``names.new(stem)`` or ``names(stem)`` gives ``stem``, ``stem_1``, ..."""

    def __init__(self, model: ir.Model) -> None:
        self.used: set[str] = set()
        for graph in (model.graph, *model.graph.subgraphs()):
            self.used.update(v.name or "" for v in graph.inputs)
            self.used.update(v.name or "" for v in graph.outputs)
            self.used.update(graph.initializers)
            self._add_nodes(graph)
        for function in model.functions.values():
            self._add_nodes(function)

    def _add_nodes(self, nodes) -> None:
        for node in nodes:
            self.used.add(node.name or "")
            self.used.update(v.name or "" for v in node.outputs)

    def new(self, stem: str) -> str:
        """A fresh name starting with ``stem`` (reserved from now on)."""
        name, i = stem, 1
        while name in self.used:
            name, i = f"{stem}_{i}", i + 1
        self.used.add(name)
        return name

    __call__ = new
