"""Self-attention blocks fused into onnxruntime's ``Attention`` kernel (CPU FP32 bundles).

A ViT block's attention exports as 13 ONNX nodes: ``MatMul(x, W_qkv) -> Add(b) -> Reshape [B, N,
3, H, D] -> Transpose -> 3 x Gather (q, k, v) -> Mul(q, scale) / Transpose(k) -> MatMul ->
Softmax -> MatMul(v) -> Transpose -> Reshape [B, N, C]``. onnxruntime's session optimizer does
not fuse that pattern (its own attention fusions look for BERT's separate q/k/v projections), so
each is a kernel call, with a Transpose copy of the whole qkv tensor. Its contrib operator
``com.microsoft.Attention`` computes the same thing from ``x``, ``W_qkv [C, 3C]`` and ``b [3C]``
(columns in the same q | k | v, head-major order as ``reshape(B, N, 3, H, D)``) in one kernel.

``fuse_attention`` rewrites every block that matches exactly (single consumers, constant weights
and shapes, ``H * D == C``), then checks the fused graph against the exported one in onnxruntime
at two batch sizes (max abs difference <= 1e-4 x max(1, max |output|); a wrong rewrite differs by
O(1)), or keeps the exported one. Used only where onnxruntime runs the FP32 graphs (the ``cpu``
targets without INT8): TensorRT parses standard ONNX, and the INT8 quantizer works on the
standard ops. Torch-free (onnx + numpy + onnxruntime). Measured in docs/runtime.md ("Attention").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from jei_edge.compile.shapes import (compare_outputs, drop_dead, graph_feeds, node_attr, tensor_shapes, topological,
                                     unsupported)

DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class FusionResult:
    """What ``fuse_attention`` did to one graph."""

    fused: int  # attention blocks now one Attention node
    kept_original: str = ""  # why the exported graph was kept ("" when the fused one is used)


def _rows_and_tokens(target, tokens) -> bool:
    """A reshape target's first two entries keep ``[B, N]`` (batch as 0 or -1, tokens as 0 or N),
    with at most one -1 in the target: not a reshape into windows or another token grouping."""
    t = [int(v) for v in target.ravel()]
    return t[0] in (0, -1) and (t[1] == 0 or t[1] == tokens) and t.count(-1) <= 1


def _match(softmax, prod, uses, const, shapes, outputs, opset: int = 17):
    """The nodes of one attention block around ``softmax`` and the Attention node's parameters, or None.
    ``const(name)``: the array of an initializer or Constant node, else None."""

    def single(name: str) -> bool:  # an internal tensor: read by exactly one node, not a graph output
        return len(uses.get(name, [])) == 1 and name not in outputs

    def node(name: str, op: str):
        n = prod.get(name)
        return n if n is not None and n.op_type == op else None

    def scalar(name: str) -> Optional[float]:
        c = const(name)
        return float(c.reshape(())) if c is not None and c.size == 1 and c.dtype.kind == "f" else None

    axis = node_attr(softmax, "axis", None)
    if (axis is None and opset < 13) or (axis if axis is not None else -1) not in (-1, 3):
        return None
    nodes = [softmax]
    scale = 1.0
    scores = prod.get(softmax.input[0])
    if scores is not None and scores.op_type in ("Mul", "Div") and single(scores.output[0]):
        c = scalar(scores.input[1])
        if c is None or c == 0:
            return None
        scale = c if scores.op_type == "Mul" else 1.0 / c
        nodes.append(scores)
        scores = prod.get(scores.input[0])
    if scores is None or scores.op_type != "MatMul" or not single(scores.output[0]):
        return None
    nodes.append(scores)
    q, kt = scores.input
    qm = node(q, "Mul")
    if qm is not None and single(q):
        c = scalar(qm.input[1])
        if c is None or c == 0:
            return None
        scale *= c
        nodes.append(qm)
        q = qm.input[0]
    kt_node = node(kt, "Transpose")
    if kt_node is None or list(node_attr(kt_node, "perm", [])) != [0, 1, 3, 2] or not single(kt):
        return None
    nodes.append(kt_node)
    k = kt_node.input[0]
    # the consumer: MatMul(softmax, v) -> Transpose [0, 2, 1, 3] -> Reshape [B, N, C]
    if not single(softmax.output[0]):
        return None
    av = uses[softmax.output[0]][0]
    if av.op_type != "MatMul" or av.input[0] != softmax.output[0] or not single(av.output[0]):
        return None
    out_t = uses[av.output[0]][0]
    if out_t.op_type != "Transpose" or list(node_attr(out_t, "perm", [])) != [0, 2, 1, 3] or not single(out_t.output[0]):
        return None
    out_r = uses[out_t.output[0]][0]
    if out_r.op_type != "Reshape":
        return None
    nodes += [av, out_t, out_r]
    v = av.input[1]
    gathers = [node(t, "Gather") for t in (q, k, v)]
    if any(g is None or not single(g.output[0]) or node_attr(g, "axis", 0) != 0 for g in gathers):
        return None
    idx = [const(g.input[1]) for g in gathers]
    if any(i is None or i.size != 1 for i in idx) or [int(i.reshape(())) for i in idx] != [0, 1, 2]:
        return None
    source = {g.input[0] for g in gathers}
    if len(source) != 1:
        return None
    split = node(source.pop(), "Transpose")
    if split is None or list(node_attr(split, "perm", [])) != [2, 0, 3, 1, 4] or len(uses[split.output[0]]) != 3 \
            or split.output[0] in outputs:
        return None
    heads = node(split.input[0], "Reshape")
    if heads is None or not single(split.input[0]) or not single(heads.output[0]):
        return None
    target = const(heads.input[1])
    add = node(heads.input[0], "Add")
    if target is None or target.size != 5 or add is None or not single(add.output[0]):
        return None
    nodes += gathers + [split, heads, add]
    mm = next((prod[i] for i in add.input if i in prod and prod[i].op_type == "MatMul"), None)
    if mm is None or not single(mm.output[0]):
        return None
    bias = next((i for i in add.input if i != mm.output[0]), None)
    w, b = const(mm.input[1]), const(bias) if bias else None
    x = mm.input[0]
    dims = shapes.get(x)
    if w is None or b is None or w.ndim != 2 or b.ndim != 1 or dims is None or len(dims) != 3 or \
            w.dtype != np.float32 or b.dtype != np.float32:
        return None
    c = w.shape[0]
    n_heads, head = int(target[3]), int(target[4])
    if w.shape[1] != 3 * c or b.shape[0] != 3 * c or int(target[2]) != 3 or n_heads * head != c or dims[2] != c \
            or not isinstance(dims[1], int) or not _rows_and_tokens(target, dims[1]) or scale == 0:
        return None
    out_target = const(out_r.input[1])
    if out_target is None or out_target.size != 3 or int(out_target[2]) not in (c, -1) \
            or not _rows_and_tokens(out_target, dims[1]):
        return None
    nodes.append(mm)
    return nodes, dict(x=x, w=mm.input[1], b=bias, heads=n_heads, scale=scale, out=out_r.output[0])


def _fuse_once(model) -> List[str]:
    """Fuse every matching block in place; returns the fused blocks' output names."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    # weights are converted when a match reads them, not all up front (a ViT-S/16 graph holds ~88 MB)
    tensors = {t.name: t for t in g.initializer if t.data_type in (1, 6, 7)}
    tensors.update({n.output[0]: node_attr(n, "value") for n in g.node
                    if n.op_type == "Constant" and node_attr(n, "value") is not None})

    def const(name: str) -> Optional[np.ndarray]:
        t = tensors.get(name)
        return numpy_helper.to_array(t) if t is not None else None
    prod = {o: n for n in g.node for o in n.output}
    uses: Dict[str, List] = {}
    for n in g.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    shapes = tensor_shapes(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    drop, new = set(), []
    for n in list(g.node):
        if n.op_type != "Softmax" or id(n) in drop:
            continue
        m = _match(n, prod, uses, const, shapes, outputs, opset)
        if m is None:
            continue
        nodes, p = m
        drop.update(id(x) for x in nodes)
        new.append(helper.make_node("Attention", [p["x"], p["w"], p["b"]], [p["out"]], domain=DOMAIN,
                                    num_heads=p["heads"], scale=float(p["scale"]),
                                    name=f"jei_attention_{len(new)}"))
    if not new:
        return []
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(topological(kept + new))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    drop_dead(g)
    onnx.checker.check_model(model)
    return [n.output[0] for n in new]


def fuse_attention(model, check_batches=(1, 3)):
    """Fuse ``model``'s self-attention blocks (module docstring).

    Args:
        model: an ``onnx.ModelProto`` (FP32, inline weights, inputs static apart from the batch).
        check_batches: batch sizes at which the fused graph is compared with the exported one.

    Returns:
        ``(model, FusionResult)``: the fused model when it checked out, else ``model`` unchanged.
    """
    import onnx
    from onnx import TensorProto, helper

    why = unsupported(model)
    if why:
        return model, FusionResult(0, why)
    feeds = graph_feeds(model, check_batches)
    if feeds is None:
        return model, FusionResult(0, "inputs not static apart from the batch")
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    try:
        blocks = _fuse_once(fused)
    except Exception as exc:  # noqa: BLE001 - an optimization: keep the exported graph
        return model, FusionResult(0, f"fusion failed ({type(exc).__name__}: {exc})"[:200])
    if not blocks:
        return model, FusionResult(0, "nothing to fuse")
    # each block is checked at its own output too, not only where the graph's outputs are: a block
    # whose output is scaled down before a residual add could otherwise hide a wrong rewrite
    probes = []
    for m in (model, fused):
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        probe.graph.output.extend(helper.make_tensor_value_info(b, TensorProto.FLOAT, None) for b in blocks)
        probes.append(probe)
    why = compare_outputs(probes[0], probes[1], feeds, rel_tol=1e-4)
    if why:
        return model, FusionResult(0, why)
    return fused, FusionResult(len(blocks))
