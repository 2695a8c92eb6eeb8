"""Fold the shape arithmetic of an exported graph whose only dynamic dimension is the batch.

The TorchScript exporter writes ``x.reshape(B, N, 3, H, D)`` and ``cls.expand(B, -1, -1)`` as
chains of ``Shape -> Gather -> Unsqueeze -> Concat (-> Div, Equal, Where)`` feeding a Reshape or
an Expand. onnxruntime folds such a chain only where it knows every dimension it reads; after the
first Reshape whose target shape is computed it knows none, so a ViT's stage 0 kept 30 of its 74
optimized nodes and the plain graph about 110 of 267 as tiny kernels run on every call (about half
a microsecond to a microsecond each at batch 1; docs/runtime.md, "Static shapes").

Every graph of a bundle has fixed per-row shapes (the manifest's ``[batch, ...]`` specs), so each
such value is known up to the batch size. ``fold_static_shapes`` evaluates the shape arithmetic
symbolically (integers and the symbol ``batch``), writes each Reshape's target as a constant
(``0`` copies the input's batch dimension, or ``-1``), each other consumer's shape input as a
constant or as ``Concat(Shape(input)[0:1], constants)``, and drops what is then unused. The
folded graph must give bitwise the same outputs as the exported one in onnxruntime at two batch
sizes, or the exported graph is kept. Torch-free (onnx + numpy + onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

B = "batch"  # the symbolic batch size in a value
_MAX_VALUE = 64  # longest integer tensor evaluated (shape vectors are short)
_ROUNDS = 8  # inference + folding rounds (each round can make more shapes known)


@dataclass(frozen=True)
class FoldResult:
    """What ``fold_static_shapes`` did to one graph."""

    nodes_before: int
    nodes_after: int
    kept_original: str = ""  # why the exported graph was kept ("" when the folded one is used)

    @property
    def removed(self) -> int:
        return self.nodes_before - self.nodes_after


class _Value:
    """A small integer (or bool) tensor whose elements are ints, bools or ``B``, and its dtype."""

    __slots__ = ("shape", "items", "dtype")

    def __init__(self, shape: Tuple[int, ...], items: Sequence, dtype=np.int64):
        self.shape, self.items, self.dtype = tuple(shape), list(items), np.dtype(dtype)

    @property
    def known(self) -> bool:
        return B not in self.items

    def array(self) -> np.ndarray:
        return np.array(self.items, dtype=self.dtype).reshape(self.shape)


def _const_value(arr: np.ndarray) -> Optional[_Value]:
    if arr.dtype.kind not in "iub" or arr.size > _MAX_VALUE or arr.ndim > 1:
        return None
    items = [bool(v) for v in arr.ravel()] if arr.dtype.kind == "b" else [int(v) for v in arr.ravel()]
    return _Value(arr.shape, items, arr.dtype)


def node_attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def tensor_shapes(model) -> Dict[str, List]:
    """Tensor name -> dims (int, ``B`` for the batch symbol, None when unknown)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    out: Dict[str, List] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else (B if d.dim_param == B else None)
                        for d in t.shape.dim]
    return out


def _binary(op: str, a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return None
    if a == B or b == B:
        if op == "Mul" and (a == 1 or b == 1):
            return B
        if op in ("Add", "Sub") and b == 0:
            return a
        if op == "Add" and a == 0:
            return b
        if op == "Div" and b == 1:
            return a
        if op == "Equal":
            other = b if a == B else a
            if other == B:
                return True
            return False if other < 0 else None  # a batch size is never negative
        return None
    if op == "Div":
        return None if b == 0 else int(np.trunc(a / b)) if (a < 0) != (b < 0) else a // b
    return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Equal": a == b}[op]


def _broadcast(a: _Value, b: _Value, fn, dtype) -> Optional[_Value]:
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return None
    n = int(np.prod(shape))
    if len(a.items) not in (1, n) or len(b.items) not in (1, n):
        return None
    pairs = [(a.items[0] if len(a.items) == 1 else a.items[i], b.items[0] if len(b.items) == 1 else b.items[i])
             for i in range(n)]
    items = [fn(x, y) for x, y in pairs]
    return None if any(v is None for v in items) else _Value(shape, items, dtype)


def _evaluate(node, vals: Dict[str, _Value], shapes: Dict[str, List]):
    """The symbolic value of ``node``'s first output, or None."""

    def const(name: str) -> Optional[np.ndarray]:  # a fully known input as an array
        v = vals.get(name)
        return v.array() if v is not None and v.known else None

    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    ins = [vals.get(n) if n else None for n in node.input]
    if op == "Shape":
        dims = shapes.get(node.input[0])
        if dims is None or any(d is None for d in dims):
            return None
        start, end = node_attr(node, "start", 0), node_attr(node, "end", None)
        dims = dims[slice(start, end)]
        return _Value((len(dims),), dims)
    if op == "Constant":
        import onnx

        t = node_attr(node, "value")
        return _const_value(onnx.numpy_helper.to_array(t)) if t is not None else None
    if not ins or ins[0] is None:
        return None
    a = ins[0]
    if op in ("Identity", "Cast"):
        if op == "Cast":
            to = {6: np.int32, 7: np.int64}.get(node_attr(node, "to"))
            if to is None or a.dtype == np.bool_:
                return None
            return _Value(a.shape, a.items, to)
        return a
    if op == "Gather":
        idx = const(node.input[1])
        if node_attr(node, "axis", 0) != 0 or len(a.shape) != 1 or idx is None or idx.ndim > 1:
            return None
        n = len(a.items)
        picked = [a.items[int(i) + n if int(i) < 0 else int(i)] for i in np.ravel(idx)]
        return _Value(idx.shape, picked, a.dtype)
    if op == "Unsqueeze":
        axes = const(node.input[1]) if len(node.input) > 1 else None
        if len(a.shape) != 0 or axes is None or [int(v) for v in np.ravel(axes)] not in ([0], [-1]):
            return None
        return _Value((1,), a.items, a.dtype)
    if op == "Reshape":  # of a shape vector, to one dimension
        to = const(node.input[1])
        if len(a.shape) > 1 or to is None or [int(v) for v in np.ravel(to)] not in ([-1], [len(a.items)]):
            return None
        return _Value((len(a.items),), a.items, a.dtype)
    if op == "Squeeze":
        return _Value((), a.items, a.dtype) if a.shape == (1,) else None
    if op == "Concat":
        if any(v is None or len(v.shape) != 1 for v in ins):
            return None
        if len({v.dtype for v in ins}) != 1:
            return None
        return _Value((sum(len(v.items) for v in ins),), [x for v in ins for x in v.items], a.dtype)
    if op == "Slice":
        s = [const(n) for n in node.input[1:]]
        if len(a.shape) != 1 or any(v is None for v in s[:2]):
            return None
        if len(s) > 2 and s[2] is not None and [int(v) for v in np.ravel(s[2])] != [0]:
            return None
        step = int(np.ravel(s[3])[0]) if len(s) > 3 and s[3] is not None else 1
        return _sliced(a, int(np.ravel(s[0])[0]), int(np.ravel(s[1])[0]), step)
    if op in ("Add", "Sub", "Mul", "Div", "Equal"):
        if len(ins) != 2 or ins[1] is None:
            return None
        return _broadcast(a, ins[1], lambda x, y: _binary(op, x, y), np.bool_ if op == "Equal" else a.dtype)
    if op == "Where":
        if len(ins) != 3 or any(v is None for v in ins):
            return None
        c, x, y = ins
        if not (c.shape == x.shape == y.shape) or x.dtype != y.dtype:
            return None
        return _Value(c.shape, [xi if ci else yi for ci, xi, yi in zip(c.items, x.items, y.items)], x.dtype)
    if op == "ConstantOfShape":
        import onnx

        if not a.known or len(a.shape) != 1 or int(np.prod(a.items)) > _MAX_VALUE:
            return None
        fill = node_attr(node, "value")
        fill = onnx.numpy_helper.to_array(fill).ravel() if fill is not None else np.zeros(1, np.float32)
        if fill.dtype.kind not in "iub":
            return None
        return _const_value(np.full(a.items, fill[0], dtype=fill.dtype))
    return None


def _sliced(a: _Value, start: int, end: int, step: int) -> Optional[_Value]:
    """ONNX Slice on one axis: negative indices count from the end, then clamp ([0, n] for a
    positive step, [0, n - 1] / [-1, n - 1] for a negative one; Python's slicing differs there)."""
    if step == 0:
        return None
    n = len(a.items)
    start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    idx = range(start, end, step)
    return _Value((len(idx),), [a.items[i] for i in idx], a.dtype)


def _fold_round(model) -> bool:
    """One round: evaluate, rewire consumers, drop dead nodes. True when anything changed."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    shapes = tensor_shapes(model)
    vals: Dict[str, _Value] = {}
    for t in g.initializer:
        if t.data_type in (6, 7, 9) and int(np.prod(t.dims)) <= _MAX_VALUE:
            v = _const_value(numpy_helper.to_array(t))
            if v is not None:
                vals[t.name] = v
    produced_by: Dict[str, object] = {}
    for node in g.node:
        for o in node.output:
            produced_by[o] = node
        v = _evaluate(node, vals, shapes)
        if v is not None and len(node.output) == 1:
            vals[node.output[0]] = v

    graph_input = g.input[0].name
    batch_dims = shapes.get(graph_input)
    new_inits: Dict[Tuple, str] = {}
    new_nodes: List = []
    batch_name: List[str] = []
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}

    def fresh(stem: str) -> str:
        k = 0
        while f"{stem}_{k}" in taken:
            k += 1
        taken.add(f"{stem}_{k}")
        return f"{stem}_{k}"

    def constant(arr: np.ndarray) -> str:
        key = (arr.shape, tuple(arr.ravel().tolist()), arr.dtype.str)
        if key not in new_inits:
            name = fresh("jei_shape_const")
            g.initializer.append(numpy_helper.from_array(arr, name))
            new_inits[key] = name
        return new_inits[key]

    def batch_vector() -> Optional[str]:
        if not batch_dims or batch_dims[0] != B:
            return None
        if not batch_name:
            existing = [n.output[0] for n in g.node if n.op_type == "Shape" and n.input[0] == graph_input
                        and node_attr(n, "start", 0) == 0 and node_attr(n, "end", None) == 1]
            if existing:
                batch_name.append(existing[0])
            else:
                batch_name.append(fresh("jei_shape_batch"))
                new_nodes.append(helper.make_node("Shape", [graph_input], [batch_name[0]], start=0, end=1,
                                                  name=batch_name[0]))
        return batch_name[0]

    changed = False
    for node in g.node:
        if node.output and node.output[0] in vals:
            continue  # part of the arithmetic itself: unused once its consumers are rewired
        for i, name in enumerate(node.input):
            v = vals.get(name)
            if v is None or produced_by.get(name) is None:
                continue  # not computed, or already an initializer
            if produced_by.get(name) is not None and produced_by[name].op_type == "Constant" \
                    or name.startswith("jei_shape_vec"):
                continue  # already as short as it gets
            if v.known:
                node.input[i] = constant(v.array())
                changed = True
            elif len(v.shape) == 1 and v.items.count(B) == 1:
                k = v.items.index(B)
                data = shapes.get(node.input[0]) if node.op_type == "Reshape" else None
                if node.op_type == "Reshape" and i == 1 and not node_attr(node, "allowzero", 0) and data \
                        and k < len(data) and data[k] == B and all(x != 0 for x in v.items if x != B):
                    node.input[i] = constant(np.array([0 if x == B else x for x in v.items], np.int64))
                elif node.op_type == "Reshape" and i == 1 and -1 not in v.items:
                    node.input[i] = constant(np.array([-1 if x == B else x for x in v.items], np.int64))
                else:
                    if produced_by[name].op_type == "Shape" or v.dtype != np.int64:
                        continue  # already one node, or not a shape vector
                    bv = batch_vector()
                    if bv is None:
                        continue
                    parts = []
                    if k:
                        parts.append(constant(np.array(v.items[:k], np.int64)))
                    parts.append(bv)
                    if k + 1 < len(v.items):
                        parts.append(constant(np.array(v.items[k + 1:], np.int64)))
                    out = fresh("jei_shape_vec")
                    new_nodes.append(helper.make_node("Concat", parts, [out], axis=0, name=out))
                    node.input[i] = out
                changed = True
    if new_nodes:
        nodes = topological(list(new_nodes) + list(g.node))
        del g.node[:]
        g.node.extend(nodes)
    removed = drop_dead(g)
    onnx.checker.check_model(model)
    return changed or removed > 0


def topological(nodes: List) -> List:
    """``nodes`` reordered so that each comes after the producers of its inputs (stable otherwise)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    order, state = [], [0] * len(nodes)  # 0 new, 1 on the path, 2 placed

    def place(i: int) -> None:
        stack = [(i, iter(nodes[i].input))]
        state[i] = 1
        while stack:
            j, it = stack[-1]
            for name in it:
                k = producer.get(name)
                if k is not None and state[k] == 0:
                    state[k] = 1
                    stack.append((k, iter(nodes[k].input)))
                    break
                if k is not None and state[k] == 1 and k != j:
                    raise ValueError("the graph has a cycle")
            else:
                stack.pop()
                state[j] = 2
                order.append(nodes[j])

    for i in range(len(nodes)):
        if state[i] == 0:
            place(i)
    return order


def drop_dead(g) -> int:
    """Remove nodes none of whose outputs is used, then unused initializers. Returns nodes removed.
    For graphs without subgraphs (``unsupported`` keeps the passes off the others)."""
    keep = {o.name for o in g.output}
    removed = 0
    while True:
        used = keep | {n for node in g.node for n in node.input if n}
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    used = {n for node in g.node for n in node.input} | {i.name for i in g.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return removed


def compare_outputs(a, b, feeds_per_batch: Sequence[Dict[str, np.ndarray]], rel_tol: float = 0.0) -> str:
    """"" when model ``b`` gives onnxruntime the outputs of model ``a`` on every feed (bitwise with
    ``rel_tol`` 0, else within ``rel_tol`` x max(1, max |output|)), else the reason."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sa = ort.InferenceSession(a.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - an exported graph onnxruntime cannot run here: nothing to compare with
        return "onnxruntime cannot run the exported graph here"
    try:
        sb = ort.InferenceSession(b.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for feeds in feeds_per_batch:
            for x, y in zip(sa.run(None, feeds), sb.run(None, feeds)):
                if x.shape != y.shape or x.dtype != y.dtype:
                    return "the rewritten graph's outputs differed"
                if rel_tol == 0.0:
                    same = np.array_equal(x, y, equal_nan=True)
                else:
                    bound = rel_tol * max(1.0, float(np.nanmax(np.abs(x), initial=0.0)))
                    same = bool(np.array_equal(np.isnan(x), np.isnan(y))) and \
                        float(np.nanmax(np.abs(x - y), initial=0.0)) <= bound
                if not same:
                    return "the rewritten graph's outputs differed"
    except Exception as exc:  # noqa: BLE001 - any failure keeps the exported graph
        return f"onnxruntime refused the rewritten graph ({type(exc).__name__})"
    return ""


_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}


def graph_feeds(model, batches: Sequence[int]) -> Optional[List[Dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    inits = {t.name for t in model.graph.initializer}
    out = []
    for b in batches:
        feeds = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            t = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (b if d.dim_param == B else None)
                    for d in t.shape.dim]
            if any(d is None for d in dims) or t.elem_type not in _DTYPES:
                return None
            feeds[vi.name] = rng.standard_normal(dims).astype(_DTYPES[t.elem_type])
        out.append(feeds)
    return out


def unsupported(model) -> str:
    """Why the graph passes leave ``model`` alone ("" when they may rewrite it): the batch symbol
    stands for one tensor's batch, dead-node removal does not look into subgraphs, and a graph
    with external data (loaded without it) is not rewritten inline."""
    import onnx

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return "weights in external data"
    inits = {t.name for t in model.graph.initializer}
    if len([i for i in model.graph.input if i.name not in inits]) != 1:
        return "not a single-input graph"
    if any(a.type in (5, 10) for n in model.graph.node for a in n.attribute):  # GRAPH, GRAPHS
        return "the graph has subgraphs (If / Loop / Scan)"
    return ""


def fold_static_shapes(model, check_batches: Sequence[int] = (1, 3)):
    """Fold ``model``'s batch-only shape arithmetic (see the module docstring).

    Args:
        model: an ``onnx.ModelProto`` with inline weights whose inputs are static except a leading
            ``batch`` dimension.
        check_batches: batch sizes at which the folded graph must equal the exported one.

    Returns:
        ``(model, FoldResult)``: the folded model when it checked out, else ``model`` unchanged.
    """
    import onnx

    before = len(model.graph.node)
    why = unsupported(model)
    if why:
        return model, FoldResult(before, before, why)
    feeds = graph_feeds(model, check_batches)
    if feeds is None:
        return model, FoldResult(before, before, "inputs not static apart from the batch")
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    try:
        for _ in range(_ROUNDS):
            if not _fold_round(folded):
                break
    except Exception as exc:  # noqa: BLE001 - the pass is an optimization: keep the exported graph
        return model, FoldResult(before, before, f"folding failed ({type(exc).__name__}: {exc})"[:200])
    if len(folded.graph.node) == before:
        return model, FoldResult(before, before, "nothing to fold")
    why = compare_outputs(model, folded, feeds)
    if why:
        return model, FoldResult(before, before, why)
    return folded, FoldResult(before, len(folded.graph.node))
