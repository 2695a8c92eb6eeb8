"""onnxruntime session creation and the CPU stage executor (``OrtStageExecutor``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

from jei_edge._deps import require
from jei_edge._io import shorten
from jei_edge.backends.onnxruntime.settings import OrtSettings
from jei_edge.errors import BundleError
from jei_edge.runtime.loop import Capability, StageExecutor


def import_ort():
    return require("onnxruntime", purpose="running a bundle on the CPU")


_GLOBAL_POOL: Optional[tuple] = None


def session_options(settings: OrtSettings):
    """A fresh ``onnxruntime.SessionOptions`` for ``settings``."""
    global _GLOBAL_POOL
    ort = import_ort()
    if settings.global_thread_pool:
        sizes = (settings.intra_op_threads, settings.inter_op_threads)
        if _GLOBAL_POOL is None:
            from onnxruntime.capi import _pybind_state

            _pybind_state.set_global_thread_pool_sizes(*sizes)
            _GLOBAL_POOL = sizes
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[settings.graph_optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if settings.global_thread_pool:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = settings.session_threads
        so.inter_op_num_threads = settings.inter_op_threads
    spin = "1" if settings.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    # spinning stops when a run returns unless asked to go on (OrtSettings.spin_after_run)
    stop = settings.allow_spinning and not settings.spin_after_run
    so.add_session_config_entry("session.force_spinning_stop", "1" if stop else "0")
    return so


QDQ_PROPAGATION = "QDQPropagationTransformer"


def float_pool_feeds_quantize(nodes) -> bool:
    """True when a MaxPool reading FP32 values (not a DequantizeLinear's output) feeds a
    QuantizeLinear: onnxruntime's QDQ propagation would move the QuantizeLinear above the pool and
    run the pool on uint8 (``OrtSettings.qdq_propagation``). ``nodes``: ``OnnxNode``s of the graph."""
    producer = {o: n.op_type for n in nodes for o in n.outputs}
    quantized = {n.inputs[0] for n in nodes if n.op_type == "QuantizeLinear" and n.inputs}
    return any(n.op_type == "MaxPool" and n.inputs and producer.get(n.inputs[0]) != "DequantizeLinear"
               and any(o in quantized for o in n.outputs) for n in nodes)


def disabled_optimizers(path, settings: OrtSettings) -> List[str]:
    """onnxruntime graph transformers to turn off for the graph at ``path`` under ``settings``."""
    mode = settings.qdq_propagation
    if mode == "auto":
        from jei_edge.bundle.onnx_scan import OnnxScanError, scan_onnx_file

        try:
            nodes = scan_onnx_file(path).nodes
        except (OnnxScanError, OSError):  # onnxruntime's own load then says what is wrong with the file
            return []
        mode = "off" if float_pool_feeds_quantize(nodes) else "on"
    return [QDQ_PROPAGATION] if mode == "off" else []


def session_kwargs(path, settings: OrtSettings) -> Dict[str, Any]:
    """Keyword arguments of ``onnxruntime.InferenceSession`` for the graph at ``path``: the session
    options, the CPU provider and the graph transformers ``settings`` turn off for that graph."""
    kwargs: Dict[str, Any] = {"sess_options": session_options(settings), "providers": ["CPUExecutionProvider"]}
    off = disabled_optimizers(path, settings)
    if off:
        kwargs["disabled_optimizers"] = off
    return kwargs


def create_session(path, settings: OrtSettings, what: str, built_with: Optional[Dict[str, Any]] = None):
    """An InferenceSession on the CPU provider; load failures become a BundleError naming the file."""
    ort = import_ort()
    try:
        return ort.InferenceSession(str(path), **session_kwargs(path, settings))
    except Exception as exc:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...)
        from jei_edge.bundle.onnx_scan import scan_onnx_file

        first = shorten((str(exc).strip().splitlines() or [type(exc).__name__])[0], 400)
        try:
            info = scan_onnx_file(path)
            graph = f"the file declares IR version {info.ir_version}, opset {info.opset}"
        except Exception:  # the scan is only for the message
            graph = "the file could not be scanned either"
        tc = built_with or {}
        hint = ("install an onnxruntime that supports that opset/IR version, or rebuild the bundle with the "
                "toolchain installed here (`jei-edge build ... --force`)")
        if "com.microsoft" in str(exc) or "Attention" in first:
            # FP32 CPU bundles run self-attention on onnxruntime's contrib Attention kernel (docs/runtime.md)
            hint = ("this graph uses onnxruntime's contrib kernel com.microsoft.Attention: install a standard "
                    "onnxruntime build (minimal / --disable_contrib_ops builds lack it), or rebuild the bundle "
                    "with the toolchain installed here (`jei-edge build ... --force`)")
        raise BundleError(
            f"{what} ('{path}') cannot be loaded by onnxruntime {ort.__version__}: {first}; {graph}; "
            f"built with onnxruntime {tc.get('onnxruntime', '?')}, onnx {tc.get('onnx', '?')}", hint=hint) from exc


class RowWorkers:
    """Runs a stage call's rows as chunks on several threads at once (``OrtSettings.row_workers``).

    onnxruntime releases the GIL inside a run and a session may be run from several threads at
    once, so each chunk runs through the same session, on the thread that submits it: the caller's
    thread takes the first chunk, ``workers - 1`` pool threads the others.
    """

    def __init__(self, workers: int, min_rows: int = 1):
        if workers < 2:
            raise ValueError("RowWorkers needs at least 2 workers")
        self.workers, self.min_rows = int(workers), max(1, int(min_rows))
        self._pool = ThreadPoolExecutor(max_workers=self.workers - 1, thread_name_prefix="jei-edge-rows")
        self._parts: Dict[int, List[Tuple[int, int]]] = {}

    def parts(self, n: int) -> List[Tuple[int, int]]:
        """``[(start, rows)]``: ``n`` rows in at most ``workers`` chunks of at least ``min_rows``
        rows, sizes differing by at most one (one chunk when ``n < 2 * min_rows``)."""
        got = self._parts.get(n)
        if got is None:
            c = max(1, min(self.workers, n // self.min_rows))
            q, r = divmod(n, c)
            sizes = [q + (i < r) for i in range(c)]
            starts = [sum(sizes[:i]) for i in range(c)]
            got = list(zip(starts, sizes))
            if len(self._parts) < MAX_BINDINGS:
                self._parts[n] = got
        return got

    def map(self, fn: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        """``[fn(item)]`` with the items run at the same time (the first on the calling thread).
        Every item has finished when it returns or raises (the first error is raised)."""
        futures = [self._pool.submit(fn, it) for it in items[1:]]
        first, error = None, None
        try:
            first = fn(items[0])
        except BaseException as exc:  # still wait for the chunks writing into the same buffers
            error = exc
        rest = []
        for f in futures:
            try:
                rest.append(f.result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return [first] + rest

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def row_split(run: Callable[[Any], Any], workers: Optional[RowWorkers]) -> Callable[[Any], Any]:
    """``run(batch) -> [outputs]`` (one session call) as a call that splits the batch's rows over
    ``workers`` and concatenates each output (``run`` itself when ``workers`` is None); what the
    plain backbone gets when it is timed on the runtime's settings."""
    if workers is None:
        return run
    import numpy as np

    def split(b):
        parts = workers.parts(len(b))
        if len(parts) == 1:
            return run(b)
        outs = workers.map(lambda p: run(b[p[0]:p[0] + p[1]]), parts)
        return [np.concatenate(cols) for cols in zip(*outs)]

    return split


MAX_BINDINGS = 8192  # cached (stage, row count) bindings per session set (max_batch x stages is the most used)


class OrtStageExecutor(StageExecutor):
    """Runs stage ``k`` on the first ``n`` rows of a ``NumpyWorkspace``'s buffers.

    ``small_sessions`` (optional, one per stage, same graphs): used instead of ``sessions`` when
    ``n <= settings.small_batch_rows`` (see ``OrtSettings.small_batch_rows``). With
    ``settings.row_workers > 1`` a call's rows run as chunks on ``RowWorkers`` (``rows``), each
    chunk with its own IOBinding on its slice of the workspace buffers.
    """

    capabilities = frozenset({Capability.MERGED_STAGES})

    def __init__(self, sessions: List[Any], settings: OrtSettings, small_sessions: Optional[List[Any]] = None):
        self.sessions = list(sessions)
        self.num_stages = len(self.sessions)
        self.settings = settings
        if small_sessions is not None and len(small_sessions) != self.num_stages:
            raise ValueError("small_sessions must have one session per stage")
        self.small_sessions = list(small_sessions) if small_sessions else None
        self._small_rows = settings.small_batch_rows if self.small_sessions else 0
        self.rows = RowWorkers(settings.row_workers, settings.row_min_rows) if settings.row_workers > 1 else None
        self._in_names = [s.get_inputs()[0].name for s in self.sessions]
        # one run path per session set: [0] main sessions, [1] small-batch sessions
        self._paths = [self._path(self.sessions)] + ([self._path(self.small_sessions)] if self.small_sessions else [])

    def _path(self, sessions: List[Any]) -> Dict[str, Any]:
        # one IOBinding per (stage, live-row count), made on first use and kept: rows leave at every
        # boundary, so the row count changes from call to call, and rebinding an input and three
        # outputs (each a pybind call making an OrtDevice) cost more than the numpy work of a
        # boundary at batch 8 (profiled on the quickstart model)
        return {"sessions": sessions, "bindings": {} if self.settings.io_binding else None}

    def execute(self, k: int, n: int, ws) -> None:
        x = ws.stage_input(k)
        outs = ws.stage_outputs(k)  # name -> array, in manifest order
        small = n <= self._small_rows
        path = self._paths[1 if small else 0]
        sess = path["sessions"][k]
        parts = self.rows.parts(n) if self.rows is not None and not small else ((0, n),)
        bindings = path["bindings"]
        if bindings is None:
            name = self._in_names[k]

            def run(part):
                s, c = part
                for buf, r in zip(outs.values(), sess.run(list(outs), {name: x[s:s + c]})):
                    buf[s:s + c] = r

            self._run_each(run, parts)
            return
        entry = bindings.get((k, n))
        if entry is None:
            if len(bindings) >= MAX_BINDINGS:
                bindings.clear()
            entry = bindings[(k, n)] = [[sess.io_binding() for _ in parts], None, None]
        bs = entry[0]
        # Holding the bound objects (not their addresses) makes the identity tests safe against
        # address reuse. Where stage 0 reads the caller's array (a large batch, not copied; a new
        # array almost every call) it is bound on every call and not held: a binding per batch
        # size would keep old batches alive. Rebinding an input costs the next run more than the
        # call itself (measured), hence the workspace copies small batches into its own buffer.
        # A chunk's tensors start at its first row: the buffers are C-contiguous, row-major.
        if entry[1] is not x:
            for b, (s, c) in zip(bs, parts):
                b.bind_input(self._in_names[k], "cpu", 0, x.dtype, (c,) + x.shape[1:], x.ctypes.data + s * x.strides[0])
            entry[1] = x if k or ws.input_owned else None
        if entry[2] is not outs:
            for b, (s, c) in zip(bs, parts):
                for name, buf in outs.items():
                    b.bind_output(name, "cpu", 0, buf.dtype, (c,) + buf.shape[1:], buf.ctypes.data + s * buf.strides[0])
            entry[2] = outs
        self._run_each(sess.run_with_iobinding, bs)

    def _run_each(self, fn, items) -> None:
        """``fn`` on every chunk: on the calling thread when there is one, else on the row workers."""
        if len(items) == 1:
            fn(items[0])
        else:
            self.rows.map(fn, items)

    def close(self) -> None:
        if self.rows is not None:
            self.rows.close()
        self.sessions, self.small_sessions, self._paths, self.rows = [], None, [], None
