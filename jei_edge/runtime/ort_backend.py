"""The onnxruntime backend: session settings, session creation and the CPU stage executor.

Several sessions share one CPU (one per stage, plus the plain backbone when benchmarking). Each
session's intra-op pool spin-waits after a run by default, stealing the cores from the session
that runs next; ``OrtSettings`` therefore turns spinning off (see ../shared/PLATFORM.md and
``benchmarks/realized_speedup.py``, which measures the choice at batch 1 and 64).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from jei_edge._deps import require
from jei_edge.errors import BundleError, JeiEdgeError
from jei_edge.runtime.loop import StageExecutor

_OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtSettings:
    """onnxruntime session settings shared by every stage session (defaults live here only).

    Attributes:
        intra_op_threads: threads per session; 0 = onnxruntime's default (one per core).
        inter_op_threads: threads for parallel graph branches (sequential execution uses 1).
        allow_spinning: let idle pool threads spin-wait after a run (steals cores from the next
            stage's session when several sessions share the CPU; off by default).
        global_thread_pool: all sessions share one process-wide pool (set once per process,
            before the first session; later settings cannot change it).
        graph_optimization: ``disable`` | ``basic`` | ``extended`` | ``all``.
        io_binding: run through IOBinding on the workspace's preallocated buffers (no output
            allocation per stage); False uses ``session.run`` and copies outputs.
        small_batch_rows: when > 0, every stage gets a second session with
            ``small_batch_threads`` intra-op threads, used whenever at most this many rows are
            live (batch-1 streaming, the tail of a batch after most rows exited). Splitting one
            row's work over a pool costs a thread wake-up and a barrier per stage, more than it
            saves on small stages. Costs a second copy of each stage's weights in memory.
        small_batch_threads: intra-op threads of the small-batch sessions.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    global_thread_pool: bool = False
    graph_optimization: str = "all"
    io_binding: bool = True
    small_batch_rows: int = 0
    small_batch_threads: int = 1

    @property
    def small_batch(self) -> Optional["OrtSettings"]:
        """Settings of the small-batch sessions (None when they are off or would equal the main ones)."""
        if self.small_batch_rows <= 0 or self.small_batch_threads == self.intra_op_threads \
                or self.global_thread_pool:
            return None
        return dataclasses.replace(self, intra_op_threads=self.small_batch_threads, small_batch_rows=0)

    @classmethod
    def from_options(cls, options: Optional[Dict[str, Any]] = None, base: Optional["OrtSettings"] = None) -> "OrtSettings":
        """Settings from a dict (a target's ``[onnxruntime]`` table or ``Runtime.load`` keywords)."""
        base = base or cls()
        options = dict(options or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise JeiEdgeError(f"unknown onnxruntime option(s) {unknown}", hint=f"valid options: {sorted(names)}")
        values = {}
        for key, value in options.items():
            default = getattr(cls(), key)
            if isinstance(default, bool):
                if not isinstance(value, (bool, np.bool_)):
                    raise JeiEdgeError(f"onnxruntime option {key} must be true/false, got {value!r}")
                value = bool(value)
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                    raise JeiEdgeError(f"onnxruntime option {key} must be an integer >= 0, got {value!r}")
                value = int(value)
            elif key == "graph_optimization" and value not in _OPT_LEVELS:
                raise JeiEdgeError(f"onnxruntime option graph_optimization must be one of {_OPT_LEVELS}, got {value!r}")
            values[key] = value
        return dataclasses.replace(base, **values)


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
        so.intra_op_num_threads = settings.intra_op_threads
        so.inter_op_num_threads = settings.inter_op_threads
    spin = "1" if settings.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


def create_session(path, settings: OrtSettings, what: str, built_with: Optional[Dict[str, Any]] = None):
    """An InferenceSession on the CPU provider; load failures become a BundleError naming the file."""
    ort = import_ort()
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(settings),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...)
        from jei_edge.runtime.onnx_scan import scan_onnx_file

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        try:
            info = scan_onnx_file(path)
            graph = f"the file declares IR version {info.ir_version}, opset {info.opset}"
        except Exception:  # the scan is only for the message
            graph = "the file could not be scanned either"
        tc = built_with or {}
        raise BundleError(
            f"{what} ('{path}') cannot be loaded by onnxruntime {ort.__version__}: {first}; {graph}; "
            f"built with onnxruntime {tc.get('onnxruntime', '?')}, onnx {tc.get('onnx', '?')}",
            hint="install an onnxruntime that supports that opset/IR version, or rebuild the bundle with the "
                 "toolchain installed here (`jei-edge build ... --force`)") from exc


class OrtStageExecutor(StageExecutor):
    """Runs stage ``k`` on the first ``n`` rows of a ``NumpyWorkspace``'s buffers.

    ``small_sessions`` (optional, one per stage, same graphs): used instead of ``sessions`` when
    ``n <= settings.small_batch_rows`` (see ``OrtSettings.small_batch_rows``).
    """

    def __init__(self, sessions: List[Any], settings: OrtSettings, small_sessions: Optional[List[Any]] = None):
        self.sessions = list(sessions)
        self.num_stages = len(self.sessions)
        self.settings = settings
        if small_sessions is not None and len(small_sessions) != self.num_stages:
            raise ValueError("small_sessions must have one session per stage")
        self.small_sessions = list(small_sessions) if small_sessions else None
        self._small_rows = settings.small_batch_rows if self.small_sessions else 0
        self._in_names = [s.get_inputs()[0].name for s in self.sessions]
        # one run path per session set: [0] main sessions, [1] small-batch sessions
        self._paths = [self._path(self.sessions)] + ([self._path(self.small_sessions)] if self.small_sessions else [])

    def _path(self, sessions: List[Any]) -> Dict[str, Any]:
        # bindings persist across runs; what each one points at is remembered so unchanged ones are kept
        return {"sessions": sessions,
                "bindings": [s.io_binding() for s in sessions] if self.settings.io_binding else None,
                "bound_in": [None] * self.num_stages, "bound_out": [None] * self.num_stages}

    def execute(self, k: int, n: int, ws) -> None:
        x = ws.stage_input(k)
        outs = ws.stage_outputs(k)
        path = self._paths[1 if n <= self._small_rows else 0]
        bindings = path["bindings"]
        if bindings is not None:
            b = bindings[k]
            # A binding is redone only when the array object or the row count changed; holding the
            # bound object (not its address) makes the identity test safe against address reuse
            # (for stage 0 that is the caller's last batch, kept alive until the next run).
            bound = path["bound_in"][k]
            if bound is None or bound[0] is not x or bound[1] != n:
                b.bind_input(self._in_names[k], "cpu", 0, x.dtype, (n,) + x.shape[1:], x.ctypes.data)
                path["bound_in"][k] = (x, n)
            bound = path["bound_out"][k]
            if bound is None or bound[0] is not outs or bound[1] != n:
                for name, buf in outs:
                    b.bind_output(name, "cpu", 0, buf.dtype, (n,) + buf.shape[1:], buf.ctypes.data)
                path["bound_out"][k] = (outs, n)
            path["sessions"][k].run_with_iobinding(b)
        else:
            res = path["sessions"][k].run([name for name, _ in outs], {self._in_names[k]: x[:n]})
            for (name, buf), r in zip(outs, res):
                buf[:n] = r
