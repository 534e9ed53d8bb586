"""8-bit MaxPool in channels-last form (``com.microsoft.NhwcMaxPool`` between two Transposes).

onnxruntime's CPU MaxPool on uint8/int8 NCHW tensors is a scalar loop: on a 200×2×96 tensor it
takes ~10× the float MaxPool (which runs in the blocked NCHWc layout). Its NHWC transformer
rewrites an 8-bit MaxPool into the vectorised ``NhwcMaxPool`` only when a Transpose from an
NHWC QLinearConv reaches the MaxPool's input directly, so a MaxPool behind QLinearAdd/QLinearMul
(a HardSwish, a residual add) stays NCHW. Emitting the channels-last form with explicit
Transposes gives the transpose optimizer a pair to cancel against the neighbouring NHWC
QLinearConv/QLinearGlobalAveragePool; where nothing cancels, two 8-bit Transposes still cost far
less than the NCHW kernel.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.core.graph import iter_nodes

__all__ = ["nhwc_max_pool"]

MS_DOMAIN = "com.microsoft"
_EIGHT_BIT = (ir.DataType.UINT8, ir.DataType.INT8)
_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
_NHWC_ATTRS = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")


def _eligible(node: ir.Node) -> bool:
    if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or node.graph is None:
        return False
    x = node.inputs[0]
    if x is None or x.dtype not in _EIGHT_BIT or x.shape is None or len(x.shape) != 4:
        return False
    order = node.attributes.get("storage_order")
    if order is not None and order.as_int() != 0:
        return False
    return len(node.outputs) == 1 or not (node.outputs[1].uses()
                                          or node.outputs[1].is_graph_output())


def _permuted(shape: ir.Shape | None, perm: tuple[int, ...]) -> ir.Shape | None:
    return ir.Shape([shape[i] for i in perm]) if shape is not None else None


def nhwc_max_pool(model: ir.Model) -> bool:
    """Rewrite every 4-D 8-bit MaxPool of ``model`` into Transpose → NhwcMaxPool → Transpose.

    Returns whether the model changed (and then imports the ``com.microsoft`` opset).
    """
    changed = False
    for node in list(iter_nodes(model)):
        if not _eligible(node):
            continue
        graph = node.graph
        assert graph is not None
        x, y = node.inputs[0], node.outputs[0]
        assert x is not None
        name = node.name or "MaxPool"
        node.name = f"{name}_replaced"  # the NhwcMaxPool takes its name
        to_nhwc = ir.node("Transpose", [x], attributes={"perm": list(_TO_NHWC)},
                          name=f"{name}_to_nhwc")
        to_nhwc.outputs[0].name = f"{y.name}_nhwc_input"
        to_nhwc.outputs[0].type, to_nhwc.outputs[0].shape = x.type, _permuted(x.shape, _TO_NHWC)
        attrs = {a.name: a for a in node.attributes.values() if a.name in _NHWC_ATTRS}
        pool = ir.node("NhwcMaxPool", [to_nhwc.outputs[0]], attributes=attrs, domain=MS_DOMAIN,
                       name=name)
        pool.outputs[0].name = f"{y.name}_nhwc"
        pool.outputs[0].type = y.type or x.type
        pool.outputs[0].shape = _permuted(y.shape, _TO_NHWC) if y.shape is not None else None
        to_nchw = ir.node("Transpose", [pool.outputs[0]], attributes={"perm": list(_TO_NCHW)},
                          name=f"{name}_to_nchw")
        graph.insert_after(node, [to_nhwc, pool, to_nchw])
        out = to_nchw.outputs[0]
        out.type, out.shape = y.type or x.type, y.shape
        y_name = y.name
        y.replace_all_uses_with(out, replace_graph_outputs=True)
        y.name = f"{y_name}_replaced"
        out.name = y_name
        graph.remove(node, safe=True)
        changed = True
    if changed:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return changed
