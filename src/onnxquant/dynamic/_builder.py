"""Building blocks shared by the dynamic rewrites: unique names, initializers, nodes.

Every new node, value and initializer gets a name that is unique across the whole model (main
graph, every If/Loop/Scan body and every model-local function), so a rewrite inside a subgraph
can never shadow a name of an enclosing graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.core.graph import add_initializer
from onnxquant.core.names import UniqueNames as Names

__all__ = ["Names", "Builder"]


class Builder:
    """Creates nodes and initializers in one graph, inserted before an anchor node.

    Nodes are inserted before ``anchor`` in the order they are made, so the graph stays
    topologically sorted as long as every input already exists at the anchor.
    """

    def __init__(self, graph: ir.Graph, anchor: ir.Node, names: Names) -> None:
        self.graph = graph
        self.anchor = anchor
        self.names = names
        self.nodes: list[ir.Node] = []

    def initializer(self, stem: str, array: np.ndarray | np.generic,
                    graph: ir.Graph | None = None) -> ir.Value:
        """A new initializer named after ``stem`` (in ``graph``, default: the builder's)."""
        return new_initializer(graph or self.graph, self.names(stem), array)

    def op(
        self,
        op_type: str,
        inputs: list[ir.Value | None],
        stem: str,
        *,
        attributes: dict | None = None,
        num_outputs: int = 1,
        domain: str = "",
        dtypes: tuple[ir.DataType | None, ...] = (),
    ) -> list[ir.Value]:
        """Insert one node; returns its outputs, named ``<stem>``, ``<stem>_1``, ...

        ``dtypes`` gives the element type of each output (None: unknown).
        """
        node = ir.node(op_type, inputs, attributes=attributes, domain=domain,
                       num_outputs=num_outputs, name=self.names(f"{stem}_{op_type}"))
        for i, out in enumerate(node.outputs):
            out.name = self.names(stem if num_outputs == 1 else f"{stem}_{i}")
            dtype = dtypes[i] if i < len(dtypes) else None
            if dtype is not None:
                out.type = ir.TensorType(dtype)
        self.graph.insert_before(self.anchor, node)
        self.nodes.append(node)
        return list(node.outputs)

    def replace(self, old: ir.Value, new: ir.Value) -> None:
        """Make every reader of ``old`` (graph outputs included) read ``new``, which takes
        ``old``'s name, type and shape."""
        new.type = old.type if old.type is not None else new.type
        new.shape = old.shape if old.shape is not None else new.shape
        name = old.name
        old.name = self.names(f"{name}_replaced")
        new.name = name
        old.replace_all_uses_with(new, replace_graph_outputs=True)


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray | np.generic) -> ir.Value:
    """Register ``array`` as initializer ``name`` of ``graph``."""
    return add_initializer(graph, name, np.asarray(array))


def remove_unused_initializers(model: ir.Model) -> None:
    """Drop initializers nobody reads any more (original float weights of rewritten nodes)."""
    for graph in (model.graph, *model.graph.subgraphs()):
        outputs = {id(v) for v in graph.outputs}
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_input() and id(value) not in outputs:
                del graph.initializers[name]
