"""The load-time check of a bundle's engines, before any engine is deserialized (torch-free).

Engines do not cross toolchain versions, GPU generations or toolchains, and deserializing a
mismatched one can crash the process. So every engine is checked against what this machine has,
cheapest first, and any mismatch is one ``BundleError`` naming the engine and the command that
rebuilds it (``jei-edge lower NAME.jei --force``: torch-free, from the bundle's own stage graphs):

1. the bundle has engines for every stage (a Jetson bundle built on a host has only its plan);
2. each engine was built by the target's toolchain (not a ``--toolchain`` stand-in);
3. that toolchain is installed, at exactly the version that built the engines (the manifest
   records it; TensorRT engines are tied to the version);
4. a GPU is present and has the engines' compute capability;
5. TensorRT-RTX: ``IRuntime.get_engine_validity`` (version, compute capability, driver, memory)
   on the engine's bytes, where the toolchain offers it.

Host code embedded in engines is never allowed (``engine_host_code_allowed`` stays off).
"""

from __future__ import annotations

from typing import Dict, Optional

from jei_edge.errors import BundleError


def rebuild_hint(bundle) -> str:
    return (f"rebuild the engines where they run: `jei-edge lower {bundle.path} --force` (needs the toolchain, "
            "not torch), or rebuild the bundle for that machine's target")


def check_engines(bundle, trt=None, driver=None) -> Dict[str, object]:
    """Check every engine of ``bundle`` against this machine (see the module docstring).

    Args:
        bundle: an opened ``jei_edge.bundle.Bundle``.
        trt: the toolchain module (default: imported by ``toolchain.import_toolchain``).
        driver: a ``CudaDriver`` (default: device 0's; tests pass a fake).

    Returns:
        ``{"toolchain", "compute_capability", "engines"}`` when every engine may be deserialized.

    Raises:
        BundleError (mismatch), DependencyError (toolchain missing), CudaUnavailableError (no GPU).
    """
    from jei_edge.backends.tensorrt.toolchain import import_toolchain, logger, version

    m = bundle.manifest
    where = f"bundle '{bundle.path}'"
    if m.lowering is None:
        raise BundleError(f"{where} targets '{m.target.name}' ({m.target.backend}): it has no engines")
    missing = [s.index for s in m.stages if not s.engines]
    if missing:
        raise BundleError(f"{where} has no engines yet (stages {missing}): target '{m.target.name}' builds them on "
                          "the board", hint=f"run `jei-edge lower {bundle.path}` on the board (JetPack's TensorRT)")
    _refuse(bundle, lambda e: e.backend != m.target.backend,
            lambda e: f"was built by {e.backend} standing in for the target's {m.target.backend}; it does not run on "
                      f"'{m.target.name}'")
    trt = trt if trt is not None else import_toolchain(m.target.backend, purpose="running")
    here = version(trt)
    _refuse(bundle, lambda e: e.toolchain != here,
            lambda e: f"was built by {e.backend} {e.toolchain}, this machine has {here}; engines do not cross "
                      "toolchain versions")
    if driver is None:
        from jei_edge.runtime.cuda.driver import CudaDriver, CudaUnavailableError

        try:
            driver = CudaDriver.get()
        except CudaUnavailableError as exc:
            raise CudaUnavailableError(
                f"{where}: its {m.target.backend} engines run on a GPU of compute capability "
                f"{m.stages[0].engines[0].compute_capability}, and {exc.message}",
                hint="run it where that GPU is; here `--device cpu` runs (and `jei-edge verify --device cpu` "
                     "checks) the stage graphs the engines were built from") from None
    cc = "{}.{}".format(*driver.compute_capability)
    _refuse(bundle, lambda e: e.compute_capability != cc,
            lambda e: f"is for compute capability {e.compute_capability}, this GPU "
                      f"({getattr(driver, 'name', 'GPU')}) is {cc}")
    runtime = trt.Runtime(logger(trt))
    if hasattr(runtime, "get_engine_validity"):
        valid = getattr(getattr(trt, "EngineValidity", None), "VALID", None)
        for s in m.stages:
            e = s.engines[0]
            result = runtime.get_engine_validity(bundle.file(e.file).read_bytes())
            state, diagnostics = result if isinstance(result, tuple) else (result, 0)
            if valid is not None and state != valid:
                raise BundleError(f"{where}: {trt.__name__} {here} says stage {s.index}'s engine '{e.file}' is not "
                                  f"valid on this GPU ({_name(state)}; diagnostics {_diagnostics(trt, diagnostics)})",
                                  hint=rebuild_hint(bundle))
    return {"toolchain": here, "compute_capability": cc, "engines": len(m.stages)}


def _refuse(bundle, wrong, why) -> None:
    """BundleError for the first stage whose engine is ``wrong(engine)``, saying ``why(engine)``."""
    for s in bundle.manifest.stages:
        e = s.engines[0]
        if wrong(e):
            raise BundleError(f"bundle '{bundle.path}': stage {s.index}'s engine '{e.file}' {why(e)}",
                              hint=rebuild_hint(bundle))


def _name(value) -> str:
    return str(value).split(".")[-1]


def _diagnostics(trt, bits: int) -> str:
    flags = getattr(trt, "EngineInvalidityDiagnostics", None)
    if flags is None or not bits:
        return str(bits)
    names = [n for n in dir(flags) if n.isupper() and int(getattr(flags, n)) & int(bits)]
    return ", ".join(names) or str(bits)


def engine_check_error(bundle) -> Optional[Exception]:
    """The error ``check_engines`` raises for ``bundle`` here, or None (used where a load must refuse)."""
    from jei_edge.errors import JeiEdgeError

    try:
        check_engines(bundle)
    except JeiEdgeError as exc:
        return exc
    return None
