"""onnxruntime's ``matmul_bnb4_quantizer``: MatMul nodes with a constant 2-D float weight become
``com.microsoft.MatMulBnb4`` (FP4 or NF4 weights, see :mod:`onnxquant.weight_only.bnb4`).

``MatMulBnb4Quantizer(model, quant_type, block_size, nodes_to_exclude).process()``, then
``quantizer.model.save_model_to_file(path, use_external_data_format)``. If/Loop/Scan bodies are
processed too (a weight of an outer graph stays there). The weight ``W`` is replaced by
``W_Bnb4`` (packed codes) and ``W_absmax``; a weight no other node reads is removed. Unlike
onnxruntime, the model given is not modified (the quantizer works on a copy), and a block size
the kernels cannot take raises at once.

Command line: ``python -m onnxquant.ort.matmul_bnb4_quantizer --input_model IN --output_model
OUT [--quant_type 0|1] [--block_size 64] [--nodes_to_exclude NAME ...]``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Collection, Sequence

import onnx
from onnx import helper, numpy_helper

from onnxquant.ort._quant_utils_extra import ms_domain
from onnxquant.ort.onnx_model import ONNXModel
from onnxquant.weight_only.bnb4 import FP4, NF4, check_block_size, quantize_bnb4

__all__ = ["MatMulBnb4Quantizer", "main"]

logger = logging.getLogger(__name__)

_SUBGRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _find_initializer(name: str, stack: list[onnx.GraphProto]
                      ) -> tuple[onnx.TensorProto | None, onnx.GraphProto | None]:
    """The initializer ``name`` seen from the innermost graph of ``stack``, and its graph."""
    for graph in reversed(stack):
        for tensor in graph.initializer:
            if tensor.name == name:
                return tensor, graph
    return None, None


class MatMulBnb4Quantizer:
    """MatMul -> MatMulBnb4 with block-wise FP4/NF4 weights, with onnxruntime's constructor.

    Args:
        model: The float ``onnx.ModelProto`` (copied, not modified).
        quant_type: :attr:`FP4` (0) or :attr:`NF4` (1).
        block_size: Weight values per absmax block (a power of two >= 16).
        nodes_to_exclude: Names of MatMul nodes to keep float.

    Raises:
        ValueError: A bad quant type or block size.
    """

    FP4 = FP4
    NF4 = NF4

    def __init__(self, model: onnx.ModelProto, quant_type: int, block_size: int,
                 nodes_to_exclude: Collection[str] | None = None) -> None:
        if quant_type not in (FP4, NF4):
            raise ValueError(f"quant_type must be 0 (FP4) or 1 (NF4), got {quant_type!r}")
        check_block_size(int(block_size))
        copied = onnx.ModelProto()
        copied.CopyFrom(model)
        self.model = ONNXModel(copied)
        self.quant_type = int(quant_type)
        self.block_size = int(block_size)
        self.nodes_to_exclude = set(nodes_to_exclude or [])

    def process(self) -> None:
        """Replace every eligible MatMul (subgraphs included) in ``self.model``."""
        model = self.model.model
        if not any(o.domain == ms_domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(ms_domain, 1))
        self._process_graph([model.graph])
        self.model.clean_initializers()

    def _process_graph(self, stack: list[onnx.GraphProto]) -> None:
        graph = stack[-1]
        replaced = []
        for node in graph.node:
            for attr in node.attribute:
                if attr.type in _SUBGRAPH_ATTRS:
                    for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                        self._process_graph([*stack, body])
            replaced.append(self._bnb4_node(node, stack))
        del graph.node[:]
        graph.node.extend(replaced)

    def _bnb4_node(self, node: onnx.NodeProto, stack: list[onnx.GraphProto]) -> onnx.NodeProto:
        """The MatMulBnb4 node for ``node``, or ``node`` itself when it stays float."""
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return node
        if node.name in self.nodes_to_exclude:
            logger.debug("MatMul '%s' is excluded", node.name)
            return node
        weight, owner = _find_initializer(node.input[1], stack)
        if weight is None or owner is None or len(weight.dims) != 2 or weight.data_type not in (
                onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            logger.debug("MatMul '%s' has no constant 2-D float weight; kept", node.name)
            return node
        packed_name, absmax_name = self._add_weights(weight, owner)
        k, n = weight.dims
        return helper.make_node(
            "MatMulBnb4", [node.input[0], packed_name, absmax_name], list(node.output),
            name=f"{node.name}_Bnb4" if node.name else "", domain=ms_domain,
            K=int(k), N=int(n), block_size=self.block_size, quant_type=self.quant_type)

    def _add_weights(self, weight: onnx.TensorProto, owner: onnx.GraphProto) -> tuple[str, str]:
        """Add (once per weight) the packed codes and absmax next to ``weight``."""
        packed_name, absmax_name = f"{weight.name}_Bnb4", f"{weight.name}_absmax"
        if any(t.name == packed_name for t in owner.initializer):
            return packed_name, absmax_name
        packed, absmax = quantize_bnb4(numpy_helper.to_array(weight), self.quant_type,
                                       self.block_size)
        owner.initializer.extend([numpy_helper.from_array(packed, packed_name),
                                  numpy_helper.from_array(absmax, absmax_name)])
        for graph_input in owner.input:
            if graph_input.name == weight.name:
                owner.input.remove(graph_input)
                break
        return packed_name, absmax_name


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MatMul -> MatMulBnb4 (FP4/NF4 weights)")
    parser.add_argument("--input_model", required=True, help="float model")
    parser.add_argument("--output_model", required=True, help="where to write the result")
    parser.add_argument("--quant_type", type=int, default=NF4, choices=(FP4, NF4),
                        help="0: FP4, 1: NF4 (default)")
    parser.add_argument("--block_size", type=int, default=64, help="values per absmax block")
    parser.add_argument("--nodes_to_exclude", nargs="+", default=[], help="nodes kept float")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each node")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (refuses to overwrite the output)."""
    args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    if os.path.exists(args.output_model):
        logger.error("%s exists already; choose another output path", args.output_model)
        return 1
    model = onnx.load(args.input_model)
    quantizer = MatMulBnb4Quantizer(model, args.quant_type, args.block_size,
                                    args.nodes_to_exclude)
    quantizer.process()
    quantizer.model.save_model_to_file(args.output_model, True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
