"""Start and stop the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships, on a model repository.

Why the binary and not PyTriton's ``Triton.bind``: PyTriton answers a whole dynamic batch with one
error (its proxy sets a single exception for every request of the batch), so one NaN request would
fail the good requests batched with it. A Python-backend model (``jei_edge.serve.model``) answers
each request on its own. The same repository also serves on a stand-alone Triton (``jei-edge
export triton``), so there is one serving model, not two.

What the wheel's binary needs (found by trying it): the wheel's ``nvidia_pytriton.libs`` and the
interpreter's own ``LIBDIR`` first on ``LD_LIBRARY_PATH`` (the Python backend's stub links
``libpython3.X.so`` dynamically and would otherwise find the distribution's older one), this
Python's ``bin`` first on ``PATH`` (the stub runs this environment's packages), and the stub for
this Python version inside the backend directory (copied into a private one here; the wheel's
files are never modified). ``tritonserver`` stops gracefully on SIGTERM/SIGINT: it refuses new
requests, answers those in flight (up to ``exit_timeout_s``) and unloads the models; the child
gets SIGKILL if its parent dies (Linux ``PR_SET_PDEATHSIG``), so it is never orphaned.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from jei_edge.errors import DependencyError, JeiEdgeError

SERVE_HINT = "install the serving environment: `make setup-serve` (.venv-serve), or pip install 'jei-edge[serve]'"


class ServerError(JeiEdgeError):
    """Triton could not start, did not become ready, or exited."""


@dataclass(frozen=True)
class TritonDist:
    """Where the wheel's Triton lives: the binary, its backends and stubs, its bundled libraries."""

    root: Path  # .../site-packages/pytriton/tritonserver
    libs: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @classmethod
    def find(cls) -> "TritonDist":
        """Locate the wheel's files without importing PyTriton (DependencyError if not installed)."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise DependencyError("the Triton server (nvidia-pytriton) is not installed in this Python", hint=SERVE_HINT)
        pkg = Path(list(spec.submodule_search_locations)[0])
        dist = cls(pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs")
        if not dist.binary.is_file():
            raise DependencyError(f"nvidia-pytriton has no tritonserver binary at {dist.binary}", hint=SERVE_HINT)
        return dist

    def stub(self) -> Path:
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise DependencyError(f"nvidia-pytriton has no Python-backend stub for Python {version}",
                                  hint="use a Python it ships stubs for (3.8-3.13)")
        return stub

    def backend_dir(self, into: Path) -> Path:
        """A private backend directory: the wheel's Python backend plus this Python's stub."""
        py = into / "backends" / "python"
        py.mkdir(parents=True, exist_ok=True)
        for f in (self.root / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, py / f.name)
        shutil.copy2(self.stub(), py / "triton_python_backend_stub")
        return into / "backends"

    def env(self) -> Dict[str, str]:
        """The environment Triton and the stubs need (see the module docstring)."""
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(self.libs), env.get("LD_LIBRARY_PATH", ""))
                                                 if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> "Ports":
        ports = set()
        while len(ports) < 3:
            ports.add(free_port(host))
        return cls(*sorted(ports))


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class TritonServer:
    """A running ``tritonserver`` on a model repository; a context manager that always stops it.

    Args:
        repository: the model repository (``write_repository``).
        ports: HTTP, gRPC and metrics ports.
        host: the address every endpoint binds (loopback by default).
        log: a file for the server's output (default: a file in the work folder).
        exit_timeout_s: how long a graceful stop waits for requests in flight.
    """

    def __init__(self, repository, ports: Ports, host: str = "127.0.0.1", log: Optional[Path] = None,
                 exit_timeout_s: int = 30, verbose: int = 0):
        self.dist = TritonDist.find()
        self.repository = Path(repository)
        self.ports = ports
        self.host = host
        self.exit_timeout_s = int(exit_timeout_s)
        self.verbose = int(verbose)
        self.work = Path(tempfile.mkdtemp(prefix="jei-edge-triton-"))
        self.log_path = Path(log) if log is not None else self.work / "tritonserver.log"
        self.proc: Optional[subprocess.Popen] = None
        self.stop_signal: Optional[int] = None  # the stop asked for with signal(), if any

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    def command(self) -> List[str]:
        backends = self.dist.backend_dir(self.work)
        return [str(self.dist.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--cache-directory={self.dist.root / 'caches'}",
                f"--http-address={self.host}", f"--http-port={self.ports.http}",
                f"--grpc-address={self.host}", f"--grpc-port={self.ports.grpc}",
                f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}",
                "--allow-gpu-metrics=false", "--strict-readiness=true", "--exit-on-error=true",
                f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.verbose}"]

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        """Start the server and wait until every model is ready (ServerError naming the log if not)."""
        cmd = self.command()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.dist.env(),
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        if self.stop_signal is not None:  # asked to stop before the process existed
            self.proc.send_signal(self.stop_signal)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Return when every model is ready, or when the server exited after ``signal()`` asked it to
        stop (check ``stop_signal``); a ServerError naming the log otherwise."""
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                if self.stop_signal is not None:  # the exit that was asked for, not a failure to start
                    return
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} while starting: "
                                  f"{self.log_tail()}", hint=f"full log: {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s: {self.log_tail()}",
                          hint=f"full log: {self.log_path}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        errors = [t for t in text if t.startswith("E") or "error" in t.lower()]
        return " | ".join((errors or text)[-lines:])

    def stats(self, model: str) -> Dict:
        """Triton's statistics of ``model`` (``/v2/models/NAME/stats``): counts, batch sizes formed, times."""
        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/stats", timeout=10) as r:
            return json.loads(r.read())

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics`` (Triton's and jei-edge's)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def signal(self, sig: int) -> None:
        """Ask the server to stop (``sig``, e.g. SIGTERM: in-flight requests are answered). Also while
        it starts, or before ``start()`` (then the process gets it as soon as it exists)."""
        self.stop_signal = sig
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: Optional[float] = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, grace_s: Optional[float] = None) -> Optional[int]:
        """Graceful stop (SIGTERM: in-flight requests are answered), SIGKILL after ``grace_s``."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(self.exit_timeout_s + 10 if grace_s is None else grace_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            code = self.proc.returncode
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
        shutil.rmtree(self.work / "backends", ignore_errors=True)
        if self.log_path.parent != self.work or code == 0:  # keep a failed server's own log for reading
            shutil.rmtree(self.work, ignore_errors=True)
        return code

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
