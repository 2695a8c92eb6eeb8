"""``Runtime``: load a bundle (verified), pick the backend, run batches through the conditional loop.

Example::

    from jei_edge.runtime import Runtime
    with Runtime.load("model.jei") as rt:           # parses the manifest, checks sha256 and paths;
        res = rt.run(x)                             # the bundle's target picks the backend
        res.pred, res.exit_index, res.confidence    # per sample, in input order
        sets = rt.conformal_sets(res, alpha=0.05)   # [B, C] bool (None if not calibrated)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from jei_edge.bundle import Bundle
from jei_edge.bundle.manifest import Manifest
from jei_edge.errors import BundleError, InputError, JeiEdgeError
from jei_edge.runtime.loop import MODES, Capability, Results, StageExecutor, Workspace, run_conditional
from jei_edge.runtime.validate import GuardTripped, check_batch, check_mode, check_offsets, nonfinite_error


class Runtime:
    """A loaded bundle with its executor and workspace. Use ``Runtime.load``."""

    def __init__(self, bundle: Bundle, executor: StageExecutor, workspace: Workspace, max_batch: int, device: str,
                 backend: str = "", settings=None):
        self.bundle = bundle
        self.settings = settings  # the backend's frozen settings dataclass
        self.executor = executor
        self.workspace = workspace
        self.max_batch = int(max_batch)
        self.device = device
        self.backend = backend
        self._input_shape = tuple(bundle.input_shape)
        self._offsets_seen: tuple = (None, None)  # (tuple passed last, its per-stage offsets)
        self._stage_gates = bundle.manifest.stage_gates
        # NaN/inf: checked by stage 0's verified in-graph guard, else by numpy before the run
        self._check_finite = not workspace.input_guard
        self._closed = False
        # the deploy profile (`jei-edge tune`): its offsets are the default; use_deploy(False) drops it
        self.deploy = bundle.manifest.deploy
        if executor.num_stages != bundle.num_stages:
            raise BundleError(f"backend built {executor.num_stages} stages, the manifest has {bundle.num_stages}")
        merged = [s.index for s in bundle.manifest.stages if s.merged]
        missing = [type(o).__name__ for o in (executor, workspace) if Capability.MERGED_STAGES not in o.capabilities]
        if merged and missing:
            raise BundleError(f"stage(s) {merged} merge several exits, which the {backend or device} backend "
                              f"({', '.join(missing)}) does not run yet",
                              hint="rebuild the bundle with `jei-edge build --plan every`, or run it with --device cpu")

    @classmethod
    def load(cls, bundle: Union[str, Path, Bundle], device: Optional[str] = None, max_batch: Optional[int] = None,
             verify: bool = True, backend: Optional[str] = None, public_key=None, **backend_options) -> "Runtime":
        """Open and verify ``bundle`` (manifest, sha256, paths) and set up its backend.

        Args:
            bundle: the ``NAME.jei`` directory or an opened ``Bundle``.
            device: ``cpu`` or ``cuda``; default: the device of the bundle's target. A bundle always
                holds its stage graphs, so ``cpu`` runs any bundle (onnxruntime) and ``cuda`` any
                bundle carrying its model.pt (torch-cuda) or engines its backend can execute.
            max_batch: rows the buffers are preallocated for (default: the target's); larger
                batches run in chunks.
            verify: check sha256 of every file (leave on; off only for trusted, already-verified copies).
            backend: a backend name (``jei_edge.backends.REGISTRY``) instead of the device's choice.
            public_key: a public key file (``jei-edge keygen``): refuse the bundle unless it is signed
                by that key and every file matches (``jei_edge.bundle.signing``; the integrity check is
                then always on). The CLIs default it to ``$JEI_EDGE_PUBLIC_KEY``.
            backend_options: that backend's settings (e.g. ``OrtSettings`` fields), over the target's.

        Raises:
            BundleError: a malformed, altered or incompatible bundle; InputError: bad options;
            DependencyError / CudaUnavailableError: the backend's library or device is missing.
        """
        from jei_edge import backends

        b = Bundle.open(bundle.path if isinstance(bundle, Bundle) else bundle, verify=verify and not public_key)
        if public_key:
            from jei_edge.bundle.signing import verify_signature

            # the signature first (it covers the manifest, whose sha256 entries cover every file):
            # an edited, re-hashed bundle is refused as unsigned work before any of its graphs is parsed
            verify_signature(b, public_key)
            b.check_integrity()
        name = backends.choose(b.manifest, device, backend)
        be = backends.get_backend(name)
        if max_batch is None:
            max_batch = b.manifest.target.max_batch
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise JeiEdgeError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        settings = be.settings(b, backend_options)
        executor, ws = be.create(b, int(max_batch), settings)  # prepared for each other
        try:
            return cls(b, executor, ws, int(max_batch), backends.device_of(name), name, settings)
        except BaseException:
            _release(executor, ws)
            raise

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the backend's sessions, streams and buffers (the runtime is unusable afterwards)."""
        if not self._closed:
            self._closed = True
            _release(self.executor, self.workspace)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata --------------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def input_shape(self) -> List[int]:
        return self.bundle.input_shape

    @property
    def num_gates(self) -> int:
        return self.manifest.num_gates

    @property
    def num_exits(self) -> int:
        return self.num_gates + 1

    def use_deploy(self, on: bool = True) -> "Runtime":
        """Use the bundle's deploy profile (offsets and conformal table; the default) or not (offsets 0)."""
        self.deploy = self.manifest.deploy if on else None
        return self

    @property
    def default_offsets(self) -> Optional[tuple]:
        """The offsets ``run`` uses when given none: the deploy profile's, or None (0 for every gate)."""
        return tuple(self.deploy.offsets) if self.deploy is not None else None

    def offsets_label(self, offsets=None) -> str:
        """Which offsets a run with ``offsets`` uses, in words (the CLIs print it)."""
        if offsets is not None:
            return "given offsets " + ", ".join(f"{float(o):+g}" for o in offsets)
        if self.deploy is not None:
            return (f"deploy profile ({self.deploy.budget or 'tuned'}): "
                    + ", ".join(f"{o:+.3g}" for o in self.deploy.offsets))
        return "offsets 0 (no deploy profile)"

    @property
    def class_names(self) -> List[str]:
        return list(self.manifest.class_names)

    @property
    def preprocessing(self) -> Dict[str, Any]:
        """``{"input_shape", "mean", "std"}`` (``jei_edge.data.transforms.raw_to_model``)."""
        return self.manifest.preprocessing.to_dict()

    # -- inference -------------------------------------------------------------------------------
    def run(self, x, mode: str = "exit", offsets: Optional[Sequence[float]] = None) -> Results:
        """Run a batch of model inputs; see ``jei_edge.runtime.validate`` for the input policy.

        Args:
            x: float ``[B, C, H, W]`` (already preprocessed).
            mode: ``exit`` (per-sample early termination) or ``full`` (every stage, final head).
            offsets: per-gate threshold offsets ``delta_l`` (``num_gates`` values; default: the deploy
                profile's, else 0).

        Returns:
            ``Results`` in input order (``reach`` summed over chunks).
        """
        if self._closed:
            raise JeiEdgeError("this Runtime was closed", hint="load the bundle again")
        if mode not in MODES:
            check_mode(mode)
        if offsets is None:
            offsets = self.default_offsets
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
            return Results(probs=np.zeros((0, self.manifest.num_classes), np.float32),
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
    def _table(self):
        if self.deploy is not None and self.deploy.qhat:
            return list(self.deploy.alphas), self.deploy.qhat  # recomputed for the deploy offsets
        return list(self.manifest.exits.alphas), self.manifest.exits.qhat

    @property
    def alphas(self) -> List[float]:
        return self._table()[0]

    def qhat(self, alpha: float) -> Optional[List[float]]:
        """Per-exit qhat for ``alpha`` (None if the model was not calibrated): the deploy profile's
        table when it is in use, else the training calibration's (for offsets 0)."""
        alphas, table = self._table()  # validated: one row per exit, one value per alpha
        if not alphas or not table:
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
        return f"Runtime({self.bundle!r}, backend={self.backend!r}, max_batch={self.max_batch})"


def _release(executor: StageExecutor, workspace: Workspace) -> None:
    executor.release(workspace)
    workspace.close()
    executor.close()
