"""``Runtime``: load a bundle (verified), pick the backend, run batches through the conditional loop.

Example::

    from jei_edge.runtime import Runtime
    rt = Runtime.load("model.jei")                  # checks schema, sha256, paths; onnxruntime on CPU
    res = rt.run(x)                                 # x: float32 [B, C, H, W] model input
    res.pred, res.exit_index, res.confidence        # per sample, in input order
    sets = rt.conformal_sets(res, alpha=0.05)       # [B, C] bool (None if not calibrated)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from jei_edge.errors import BundleError, DependencyError, InputError, JeiEdgeError
from jei_edge.runtime.bundle import Bundle
from jei_edge.runtime.loop import MODES, Results, StageExecutor, Workspace, run_conditional
from jei_edge.runtime.validate import GuardTripped, check_batch, check_mode, check_offsets, nonfinite_error

DEVICES = ("cpu", "cuda")


def _cpu_backend(bundle: Bundle, max_batch: int, options: Dict[str, Any]):
    from jei_edge.runtime.ort_backend import OrtSettings, OrtStageExecutor, create_session
    from jei_edge.runtime.workspace import NumpyWorkspace, StageSpec

    target = bundle.manifest.get("target", {})
    base = OrtSettings.from_options(target.get("backend_options", {})) if target.get("backend") == "onnxruntime" \
        else OrtSettings()
    settings = OrtSettings.from_options(options, base=base)
    tc = bundle.manifest.get("toolchain", {})
    sessions = []
    for st in bundle.stages:
        sess = create_session(bundle.file(st["file"]), settings, f"stage {st['index']}", built_with=tc)
        names_in = [i.name for i in sess.get_inputs()]
        names_out = {o.name for o in sess.get_outputs()}
        want_in = [i["name"] for i in st["inputs"]]
        want_out = {o["name"] for o in st["outputs"]}
        if names_in != want_in or names_out != want_out:
            raise BundleError(f"stage {st['index']} graph '{st['file']}' has inputs {names_in} / outputs "
                              f"{sorted(names_out)}, manifest says {want_in} / {sorted(want_out)}",
                              hint="rebuild the bundle")
        sessions.append(sess)
    small = None
    if settings.small_batch is not None:  # graphs already checked above: same files
        small = [create_session(bundle.file(st["file"]), settings.small_batch, f"stage {st['index']}", built_with=tc)
                 for st in bundle.stages]
    specs = [StageSpec.from_manifest(st) for st in bundle.stages]
    guard = _verify_input_guard(bundle, sessions[0])
    ws = NumpyWorkspace(specs, int(bundle.manifest["num_classes"]), max_batch, input_guard=guard)
    return OrtStageExecutor(sessions, settings, small), ws


def stage_gates(bundle: Bundle) -> List[tuple]:
    """The gate indices each stage evaluates (manifest ``gates``; one per non-final stage in
    bundles built before merged stages existed). They must cover gates 0..G-1 once, in order."""
    stages = bundle.stages
    out = []
    for k, st in enumerate(stages):
        if "gates" in st:
            try:
                out.append(tuple(int(g) for g in st["gates"]))
            except (TypeError, ValueError) as exc:
                raise BundleError(f"stage {k}: invalid gate list {st['gates']!r} in the manifest",
                                  hint="rebuild the bundle") from exc
        else:
            out.append((int(st.get("exit", k)),) if k < len(stages) - 1 else ())
    flat = [g for gs in out for g in gs]
    n_gates = len(bundle.manifest["exits"]["positions"])
    if flat != list(range(n_gates)):
        raise BundleError(f"the manifest's stages evaluate gates {flat}, expected 0..{n_gates - 1} once each, in order",
                          hint="the manifest was altered; rebuild the bundle")
    return out


def _verify_input_guard(bundle: Bundle, session) -> bool:
    """True when stage 0 declares the input guard and its graph really has it.

    Runs stage 0 once on probe rows holding a NaN, a +inf, a -inf (at different positions): each
    gate must be NaN. A manifest claiming a guard its graph lacks (an altered bundle) is refused,
    since the runtime would otherwise skip the input check; bundles built before the guard existed
    (no ``input_guard`` key) keep the numpy check before the run.
    """
    st = bundle.stages[0]
    if not st.get("input_guard") or not (st.get("gates") or st.get("gated", bundle.num_stages > 1)):
        return False
    shape = [int(d) for d in st["inputs"][0]["shape"][1:]]
    probe = np.zeros([3] + shape, dtype=np.float32).reshape(3, -1)
    probe[0, -1], probe[1, 0], probe[2, probe.shape[1] // 2] = np.nan, np.inf, -np.inf
    name = st["inputs"][0]["name"]
    try:
        (gate,) = session.run(["gate"], {name: probe.reshape([3] + shape)})
    except Exception as exc:  # onnxruntime's own error types
        raise BundleError(f"stage 0 graph '{st['file']}' fails on the input-guard probe: {str(exc)[:300]}",
                          hint="rebuild the bundle with `jei-edge build ... --force`") from exc
    gate = np.asarray(gate)
    if gate.ndim == 2:  # a merged stage: the guard sits on its first gate
        gate = gate[:, 0]
    if not np.isnan(gate).all():
        raise BundleError(f"stage 0 graph '{st['file']}' declares an input guard, but its gate is "
                          f"{gate.tolist()} (not NaN) on non-finite probe rows: the bundle was altered",
                          hint="rebuild the bundle with `jei-edge build ... --force`")
    return True


def _cuda_backend(bundle: Bundle, max_batch: int, options: Dict[str, Any]):
    try:
        from jei_edge.runtime.cuda import make_backend
    except ImportError as exc:
        raise DependencyError(f"the CUDA backend is not available ({exc})",
                              hint="install jei-edge[cuda] (and torch for the torch-cuda executor) or use --device cpu") from exc
    return make_backend(bundle, max_batch=max_batch, **options)


class Runtime:
    """A loaded bundle with its executor and workspace. Use ``Runtime.load``."""

    def __init__(self, bundle: Bundle, executor: StageExecutor, workspace: Workspace, max_batch: int, device: str):
        self.bundle = bundle
        self.executor = executor
        self.workspace = workspace
        self.max_batch = int(max_batch)
        self.device = device
        self._input_shape = tuple(bundle.input_shape)
        self._offsets_seen: tuple = (None, None)  # (tuple passed last, its per-stage offsets)
        self._stage_gates = stage_gates(bundle)
        # NaN/inf: checked by stage 0's verified in-graph guard, else by numpy before the run
        self._check_finite = not getattr(workspace, "input_guard", False)
        if executor.num_stages != bundle.num_stages:
            raise BundleError(f"backend built {executor.num_stages} stages, the manifest has {bundle.num_stages}")

    @classmethod
    def load(cls, bundle: Union[str, Path, Bundle], device: str = "cpu", max_batch: Optional[int] = None,
             verify: bool = True, **backend_options) -> "Runtime":
        """Open and verify ``bundle`` (schema, sha256, paths) and set up the backend.

        Args:
            bundle: the ``NAME.jei`` directory or an opened ``Bundle``.
            device: ``cpu`` (onnxruntime) or ``cuda`` (``jei_edge.runtime.cuda.make_backend``).
            max_batch: rows the buffers are preallocated for (default: the target's); larger
                batches run in chunks.
            verify: check sha256 of every file (leave on; off only for trusted, already-verified copies).
            backend_options: backend settings, e.g. ``OrtSettings`` fields for the CPU.
        """
        if device not in DEVICES:
            raise JeiEdgeError(f"device must be one of {list(DEVICES)}, got {device!r}")
        b = Bundle.open(bundle.path if isinstance(bundle, Bundle) else bundle, verify=verify)
        if max_batch is None:
            max_batch = int(b.manifest.get("target", {}).get("max_batch", 256))
        if int(max_batch) < 1:
            raise JeiEdgeError(f"max_batch must be >= 1, got {max_batch}")
        make = _cpu_backend if device == "cpu" else _cuda_backend
        executor, ws = make(b, int(max_batch), backend_options)
        return cls(b, executor, ws, int(max_batch), device)

    # -- metadata --------------------------------------------------------------------------------
    @property
    def manifest(self) -> Dict[str, Any]:
        return self.bundle.manifest

    @property
    def input_shape(self) -> List[int]:
        return self.bundle.input_shape

    @property
    def num_gates(self) -> int:
        return len(self.manifest["exits"]["positions"])

    @property
    def num_exits(self) -> int:
        return self.num_gates + 1

    @property
    def class_names(self) -> List[str]:
        return list(self.manifest.get("class_names") or [str(i) for i in range(self.manifest["num_classes"])])

    @property
    def preprocessing(self) -> Dict[str, Any]:
        return dict(self.manifest.get("preprocessing") or {})

    # -- inference -------------------------------------------------------------------------------
    def run(self, x, mode: str = "exit", offsets: Optional[Sequence[float]] = None) -> Results:
        """Run a batch of model inputs; see ``jei_edge.runtime.validate`` for the input policy.

        Args:
            x: float ``[B, C, H, W]`` (already preprocessed).
            mode: ``exit`` (per-sample early termination) or ``full`` (every stage, final head).
            offsets: per-gate threshold offsets ``delta_l`` (``num_gates`` values; default 0).

        Returns:
            ``Results`` in input order (``reach`` summed over chunks).
        """
        if mode not in MODES:
            check_mode(mode)
        if offsets is None:
            offs = None
        elif offsets is self._offsets_seen[0]:  # the same (unchanged) object as last call: already checked
            offs = self._offsets_seen[1]
        else:
            per_gate = check_offsets(offsets, self.num_gates)
            # per stage, as the loop takes them: a float per one-gate stage, a tuple per merged stage
            offs = [(float(per_gate[g[0]]) if len(g) == 1 else tuple(float(per_gate[i]) for i in g)) if g else 0.0
                    for g in self._stage_gates]
            self._offsets_seen = (offsets if isinstance(offsets, tuple) else None, offs)
        x = check_batch(x, self._input_shape, finite=self._check_finite)
        b = x.shape[0]
        if b == 0:
            return Results(probs=np.zeros((0, self.manifest["num_classes"]), np.float32),
                           exit_index=np.zeros(0, np.int64), reach=[])
        start = 0
        try:
            if b <= self.max_batch:
                return run_conditional(self.executor, self.workspace, x, mode, offs)
            parts = []
            for start in range(0, b, self.max_batch):
                parts.append(run_conditional(self.executor, self.workspace, x[start:start + self.max_batch], mode, offs))
        except GuardTripped as tripped:  # stage 0's guard: name the bad rows of the whole input
            raise nonfinite_error(x, [start + r for r in tripped.rows]) from None
        return Results.concat(parts)

    # -- conformal sets --------------------------------------------------------------------------
    @property
    def alphas(self) -> List[float]:
        return [float(a) for a in self.manifest["exits"].get("alphas") or []]

    def qhat(self, alpha: float) -> Optional[List[float]]:
        """Per-exit qhat for ``alpha`` from the bundle's table (None if the model was not calibrated)."""
        alphas = self.alphas
        table = self.manifest["exits"].get("qhat") or []
        if not alphas or not table or not all(len(row) == len(alphas) for row in table):
            return None
        for j, a in enumerate(alphas):
            if abs(a - float(alpha)) < 1e-9:
                return [float(row[j]) for row in table]
        raise InputError(f"alpha {alpha} is not in the bundle's conformal table",
                         hint="choose one of " + ", ".join(f"{a:g}" for a in alphas))

    def conformal_sets(self, results: Results, alpha: float) -> Optional[np.ndarray]:
        """``[B, C]`` bool conformal-set membership for ``alpha`` (None without a calibrated table)."""
        return results.conformal_sets(self.qhat(alpha))

    def __repr__(self) -> str:
        return f"Runtime({self.bundle!r}, device={self.device!r}, max_batch={self.max_batch})"
