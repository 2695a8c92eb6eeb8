"""The onnxruntime backend (CPU, the embedded default): one session per stage graph, numpy
decisions and compaction (``jei_edge.runtime.workspace.NumpyWorkspace``).

- ``settings.py``: ``OrtSettings`` (the target's ``[onnxruntime]`` table; unknown keys refused);
- ``executor.py``: session creation (clear errors naming the file and toolchain) and
  ``OrtStageExecutor`` (IOBinding on the workspace's preallocated buffers).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from jei_edge._io import shorten
from jei_edge.backends.base import Backend
from jei_edge.backends.onnxruntime.settings import OrtSettings
from jei_edge.errors import BundleError


def verify_input_guard(bundle, session) -> bool:
    """True when stage 0 declares the input guard and its graph really has it.

    Runs stage 0 once on probe rows holding a NaN, a +inf, a -inf (at different positions): each
    gate must be NaN. A manifest claiming a guard its graph lacks (an altered bundle) is refused,
    since the runtime would otherwise skip the input check; bundles without the guard keep the
    numpy check before the run.
    """
    st = bundle.manifest.stages[0]
    if not st.input_guard or not st.gates:
        return False
    probe = np.zeros((3, st.input.row_elements), dtype=np.float32)
    probe[0, -1], probe[1, 0], probe[2, probe.shape[1] // 2] = np.nan, np.inf, -np.inf
    try:
        (gate,) = session.run(["gate"], {st.input.name: probe.reshape((3,) + st.input.shape)})
    except Exception as exc:  # onnxruntime's own error types
        raise BundleError(f"stage 0 graph '{st.file}' fails on the input-guard probe: {shorten(exc, 300)}",
                          hint="rebuild the bundle with `jei-edge build ... --force`") from exc
    gate = np.asarray(gate)
    if gate.ndim == 2:  # a merged stage: the guard sits on its first gate
        gate = gate[:, 0]
    if not np.isnan(gate).all():
        raise BundleError(f"stage 0 graph '{st.file}' declares an input guard, but its gate is "
                          f"{gate.tolist()} (not NaN) on non-finite probe rows: the bundle was altered",
                          hint="rebuild the bundle with `jei-edge build ... --force`")
    return True


class OnnxruntimeBackend(Backend):
    name = "onnxruntime"
    settings_class = OrtSettings

    def unsupported(self, bundle):
        bad = [f"stage {s.index} {t.name} ({t.dtype})" for s in bundle.manifest.stages
               for t in s.inputs + s.outputs if t.dtype == "bfloat16"]
        return f"numpy has no bfloat16 buffers for {', '.join(bad)}" if bad else None

    def create(self, bundle, max_batch: int, settings: OrtSettings) -> Tuple:
        from jei_edge.backends.onnxruntime.executor import OrtStageExecutor, create_session
        from jei_edge.runtime.workspace import NumpyWorkspace

        self.check(bundle)
        m = bundle.manifest
        tc = m.toolchain
        sessions = []
        for st in m.stages:
            sess = create_session(bundle.file(st.file), settings, f"stage {st.index}", built_with=tc)
            names_in = [i.name for i in sess.get_inputs()]
            names_out = [o.name for o in sess.get_outputs()]
            want_in, want_out = [t.name for t in st.inputs], [t.name for t in st.outputs]
            if names_in != want_in or sorted(names_out) != sorted(want_out):
                raise BundleError(f"stage {st.index} graph '{st.file}' has inputs {names_in} / outputs "
                                  f"{sorted(names_out)}, manifest says {want_in} / {sorted(want_out)}",
                                  hint="rebuild the bundle")
            _check_types(sess, st)
            sessions.append(sess)
        small = None
        if settings.small_batch is not None:  # graphs already checked above: same files
            small = [create_session(bundle.file(st.file), settings.small_batch, f"stage {st.index}", built_with=tc)
                     for st in m.stages]
        guard = verify_input_guard(bundle, sessions[0])
        ws = NumpyWorkspace(m.stages, m.num_classes, max_batch, input_guard=guard)
        return OrtStageExecutor(sessions, settings, small), ws


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64"}


def _check_types(sess, st) -> None:
    """Every input and output of stage ``st``'s graph has the manifest's element type and static
    per-row dims (a graph swapped for another one fails here, not inside onnxruntime's run)."""
    specs = {t.name: t for t in st.inputs + st.outputs}
    for arg in list(sess.get_inputs()) + list(sess.get_outputs()):
        t = specs[arg.name]
        dtype = _ORT_TYPES.get(arg.type, arg.type)
        row = list(arg.shape[1:]) if arg.shape else []
        static_ok = len(row) == len(t.shape) and all(not isinstance(d, int) or d == w for d, w in zip(row, t.shape))
        if dtype != t.dtype or not static_ok:
            raise BundleError(f"stage {st.index} graph '{st.file}' tensor '{arg.name}' is {dtype}{list(arg.shape)}, "
                              f"the manifest says {t.dtype}[batch, {', '.join(map(str, t.shape))}]",
                              hint="the graph is not this bundle's: rebuild the bundle or copy it again")


BACKEND = OnnxruntimeBackend()
__all__ = ["BACKEND", "OrtSettings", "verify_input_guard"]
