"""Power and energy of timed passes on NVIDIA Jetson boards (``jei-edge profile --power``).

A ``PowerSampler`` runs beside the timed passes: ``tegrastats --interval N`` (ms) as a child process
whose stdout a reader thread parses line by line, or the ``jtop`` service (jetson-stats) when that is
installed and answers. Each sample is stamped with ``time.perf_counter()`` on arrival (the clock of
``measure.timed_call``), so ``window(t0, t1)`` takes a pass's samples by the pass's clock readings.

tegrastats prints ``NAME cur/avg`` (``VDD_IN 4970mW/4970mW``; ``POM_5V_IN 1234/1300`` before
JetPack 5) or ``NAME cur/avg/max`` (JetPack 7.2 on); the current value is used. ``BOARDS`` says per
board which rail is the module total or which rails add up to it; other rails are reported, never
summed; an unknown board gets a total only from a ``VDD_IN`` / ``VIN`` / ``POM_5V_IN`` rail. Lines
without a rail reading are skipped and counted. The carrier board's power is never included.

Energy per inference = (mean power during the pass - idle power just before it) x pass time /
samples (``energy_per_inference``, ``measure_idle``). ``board_facts()`` records model, nvpmodel mode,
jetson_clocks, L4T / JetPack and TensorRT; ``available()`` is None where power can be sampled, else why.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from jei_edge.errors import DependencyError, InputError

CARRIER_NOTE = "module rails only: the carrier board's power is not included"
GENERIC_TOTALS = ("VDD_IN", "VIN", "POM_5V_IN")  # module-input rails, trusted on any board
MODEL_PATH = "/proc/device-tree/model"
SOURCES = ("auto", "jtop", "tegrastats")


@dataclass(frozen=True)
class Rails:
    """One board's rails: ``total`` measures the whole module, else ``parts`` add up to it;
    ``other`` are documented sub-rails (reported, never summed)."""

    name: str
    total: Optional[str] = None
    parts: Tuple[str, ...] = ()
    other: Tuple[str, ...] = ()


# NVIDIA's INA3221 labels (linux-tegra "arm64: tegra: Add power-sensors for Tegra234 boards", 2023)
# and Jetson Linux power guides: on AGX Orin "VDDQ_VDD2_1V8AO power is also included in VIN_SYS_5V0
# power"; AGX Xavier's six monitors sit on the module's supply inputs; Thor's VIN is the module input.
BOARDS: Dict[str, Rails] = {
    "orin_nano_nx": Rails("Jetson Orin Nano / Orin NX", total="VDD_IN", other=("VDD_CPU_GPU_CV", "VDD_SOC")),
    "agx_orin": Rails("Jetson AGX Orin", parts=("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),
                      other=("VDDQ_VDD2_1V8AO",)),
    "thor": Rails("Jetson Thor", total="VIN", other=("VDD_GPU", "VDD_CPU_SOC_MSS", "VIN_SYS_5V0")),
    "xavier_nx": Rails("Jetson Xavier NX", total="VDD_IN", other=("VDD_CPU_GPU_CV", "VDD_SOC")),
    "agx_xavier": Rails("Jetson AGX Xavier", parts=("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V")),
    "nano": Rails("Jetson Nano", total="POM_5V_IN", other=("POM_5V_GPU", "POM_5V_CPU")),
    "tx2": Rails("Jetson TX2", total="VDD_IN",
                 other=("VDD_SYS_GPU", "VDD_SYS_SOC", "VDD_SYS_CPU", "VDD_SYS_DDR", "VDD_4V0_WIFI")),
}

_NUM = r"(\d+(?:\.\d+)?)(?:mW)?"
_RAIL_RE = re.compile(rf"(?<![\w@/.])([A-Z][A-Z0-9_]*) {_NUM}/{_NUM}(?:/{_NUM})?(?=\s|$)")


def parse_line(line: str) -> Dict[str, float]:
    """Current power (mW) of every rail on one tegrastats line; {} when it has none."""
    return {m.group(1): float(m.group(2)) for m in _RAIL_RE.finditer(line)}


def board_from_model(model: Optional[str]) -> Optional[str]:
    """The ``BOARDS`` key of a /proc/device-tree/model string (None: not a known board)."""
    m = (model or "").lower()
    if "thor" in m:
        return "thor"
    if "orin" in m:
        return "agx_orin" if "agx" in m else ("orin_nano_nx" if ("nano" in m or " nx" in m) else None)
    if "xavier" in m or m.strip() == "jetson-agx":
        return "xavier_nx" if " nx" in m else "agx_xavier"
    return "nano" if "nano" in m else ("tx2" if "tx2" in m else None)


def board_from_rails(names: Iterable[str]) -> Optional[str]:
    """The ``BOARDS`` key whose documented rails all appear in ``names`` (None: no board matches)."""
    seen = set(names)
    return next((k for k, b in BOARDS.items() if set(b.parts or (b.total,) + b.other) <= seen), None)


def module_total(rails: Dict[str, float], board: Optional[Rails]) -> Tuple[Optional[float], str]:
    """``(total mW, the rails it is)`` of one reading, or ``(None, why there is none)``."""
    if board is None:
        name = next((r for r in GENERIC_TOTALS if r in rails), None)
        if name is None:
            return None, "unknown board and no VDD_IN / VIN / POM_5V_IN rail: no total is known"
        return rails[name], name
    if board.total is not None:
        if board.total in rails:
            return rails[board.total], board.total
        return None, f"{board.name}: its total rail {board.total} is not reported"
    missing = [r for r in board.parts if r not in rails]
    if missing:
        return None, f"{board.name}: rail(s) {', '.join(missing)} of the total not reported"
    return float(sum(rails[r] for r in board.parts)), "+".join(board.parts)


@dataclass(frozen=True)
class PowerSample:
    t: float  # time.perf_counter() on arrival
    rails: Dict[str, float]  # mW
    total_mw: Optional[float]
    total_from: str  # the rails of the total, or why there is none


@dataclass
class PowerWindow:
    """Mean power (mW) of the samples that arrived between ``t0`` and ``t1`` (perf_counter seconds);
    ``total_mw`` None when no total is known or there are no samples (``note`` says why)."""

    t0: float
    t1: float
    samples: int
    mean_mw: Dict[str, float]
    total_mw: Optional[float]
    total_from: str = ""
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"seconds": self.t1 - self.t0, "samples": self.samples, "mean_mw": dict(self.mean_mw),
                "total_mw": self.total_mw, "total_from": self.total_from, "note": self.note}


def energy_per_inference(active_mw: float, idle_mw: float, seconds: float, samples: int) -> float:
    """mJ per inference: ``(active_mw - idle_mw) * seconds / samples`` (mW x s = mJ); negative when
    the pass read below idle (a pass too short or too light for its power to show)."""
    if samples < 1 or seconds < 0:
        raise InputError(f"energy needs samples >= 1 and seconds >= 0, got {samples} and {seconds}")
    return (float(active_mw) - float(idle_mw)) * float(seconds) / samples


def _jtop_class():
    try:
        from jtop import jtop  # jetson-stats
        return jtop
    except Exception:
        return None


def _pick_source(source: str) -> Tuple[Optional[str], str]:
    if source in ("auto", "jtop") and _jtop_class() is not None:
        return "jtop", ""
    if source in ("auto", "tegrastats") and shutil.which("tegrastats") is not None:
        return "tegrastats", ""
    why = {"jtop": "jtop (jetson-stats) is not installed", "tegrastats": "no tegrastats on PATH"}
    return None, why.get(source, "no tegrastats on PATH and jtop (jetson-stats) is not installed") \
        + " (not an NVIDIA Jetson board?)"


def available(source: str = "auto") -> Optional[str]:
    """None where power can be sampled here, else the reason (``--power`` says it and profiles on)."""
    return _pick_source(source)[1] or None


def _jtop_rails(power: Dict[str, Any]) -> Dict[str, float]:
    """Rails (mW) of jtop's ``power`` (``{"rail": {name: {"power": mW, ...}}, "tot": {...}}``). jtop
    moves a VDD_IN / POM_5V_IN rail into "tot" with its "name"; a "tot" without a name is jtop's sum of
    all rails (on AGX Orin it counts VDDQ_VDD2_1V8AO twice) and is not used."""
    rails = {str(n): float(r["power"]) for n, r in (power.get("rail") or {}).items()
             if isinstance(r, dict) and r.get("power") is not None}
    tot = power.get("tot") or {}
    if tot.get("name") and tot.get("power") is not None:
        rails[str(tot["name"])] = float(tot["power"])
    return rails


class PowerSampler:
    """Samples the module's power rails in a background thread (see the module docstring).

    Args:
        interval_ms: sampling interval (``tegrastats --interval``; jtop's interval is this / 1000 s).
        board: a ``BOARDS`` key or ``Rails``; None: from /proc/device-tree/model, else from the rails seen.
        source: ``"auto"`` (jtop when installed and its service answers, else tegrastats), ``"jtop"``,
            ``"tegrastats"``.

    ``start()`` / ``stop()`` or ``with``; ``window(t0, t1)``: the mean power of a pass; ``feed(line)``
    adds a tegrastats line by hand (a log). ``error`` says why sampling ended early (the samples taken
    stay); ``skipped`` counts lines without a rail reading (tegrastats' stderr included), the last
    one in ``last_skipped``.
    """

    def __init__(self, interval_ms: int = 100, board: Union[str, Rails, None] = None, source: str = "auto"):
        if int(interval_ms) < 1 or source not in SOURCES or (isinstance(board, str) and board not in BOARDS):
            raise InputError(f"power sampling: bad interval {interval_ms} ms, source {source!r} or board {board!r}",
                             hint=f"interval >= 1 ms, source in {SOURCES}, board in {tuple(BOARDS)}")
        self.interval_ms = int(interval_ms)
        self.board: Optional[Rails] = BOARDS[board] if isinstance(board, str) else board
        self.requested, self.source, self.note = source, None, ""
        self.error: Optional[str] = None
        self.skipped, self.last_skipped = 0, ""
        self._samples: List[PowerSample] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._proc: Optional[subprocess.Popen] = None
        self._jtop = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "PowerSampler":
        if self._thread is not None:
            raise RuntimeError("this PowerSampler was already started")
        if self.board is None:
            self.board = BOARDS.get(board_from_model(_read_text(MODEL_PATH)) or "")
        kind, reason = _pick_source(self.requested)
        if kind is None:
            raise DependencyError(f"power sampling is unavailable: {reason}", hint="run on a Jetson board")
        if kind == "jtop":
            try:
                self._jtop = _jtop_class()(interval=self.interval_ms / 1000.0)
                self._jtop.start()
            except Exception as e:  # service not running, version mismatch, ...
                self._jtop = None
                if self.requested == "jtop" or shutil.which("tegrastats") is None:
                    raise DependencyError(f"jtop could not start: {e}",
                                          hint="is the jtop service running? (systemctl status jtop)") from e
                kind, self.note = "tegrastats", f"jtop could not start ({e}); tegrastats used"
        if kind == "tegrastats":
            try:
                self._proc = subprocess.Popen(
                    [shutil.which("tegrastats") or "tegrastats", "--interval", str(self.interval_ms)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    bufsize=1, start_new_session=True)
            except OSError as e:
                raise DependencyError(f"tegrastats could not start: {e}") from e
        self.source = kind
        self._thread = threading.Thread(target=self._read_jtop if kind == "jtop" else self._read_tegrastats,
                                        name=f"jei-edge-power-{kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends sampling: terminates the child's process group, reaps it and joins the thread."""
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                _kill(proc, signal.SIGKILL)
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if proc is not None and proc.stdout is not None and not self.running:
            proc.stdout.close()
        if self._jtop is not None:
            with contextlib.suppress(Exception):
                self._jtop.close()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> "PowerSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def feed(self, line: str, t: Optional[float] = None) -> bool:
        """Adds one tegrastats line stamped ``t`` (default: now); False when it has no rail reading."""
        t = time.perf_counter() if t is None else t
        rails = parse_line(line)
        if not rails:
            if line.strip():
                self.skipped += 1
                self.last_skipped = line.strip()[:200]
            return False
        self._add(rails, t)
        return True

    def _read_tegrastats(self) -> None:
        proc = self._proc
        try:
            for line in proc.stdout:
                self.feed(line, time.perf_counter())
        except (OSError, ValueError):  # pipe closed under us
            pass
        rc = proc.wait()
        if not self._stop.is_set():
            self._end(f"tegrastats exited with code {rc} while sampling"
                      + (f": {self.last_skipped}" if self.last_skipped else ""))

    def _read_jtop(self) -> None:
        why = "jtop stopped while sampling"
        try:
            while not self._stop.is_set() and self._jtop.ok():
                t, rails = time.perf_counter(), _jtop_rails(self._jtop.power)
                if rails:
                    self._add(rails, t)
        except Exception as e:
            why = f"jtop failed while sampling: {e}"
        if not self._stop.is_set():
            self._end(why)

    def _add(self, rails: Dict[str, float], t: float) -> None:
        if self.board is None:
            self.board = BOARDS.get(board_from_rails(rails) or "")
        total, why = module_total(rails, self.board)
        with self._cond:
            self._samples.append(PowerSample(t, rails, total, why))
            self._cond.notify_all()

    def _end(self, error: str) -> None:
        with self._cond:
            self.error = error
            self._cond.notify_all()

    @property
    def samples(self) -> List[PowerSample]:
        with self._cond:
            return list(self._samples)

    def wait_for(self, n: int, timeout: float) -> bool:
        """Waits for ``n`` samples (False when sampling ended or ``timeout`` s passed first)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._samples) >= n or self.error is not None
                                or self._stop.is_set(), timeout)
            return len(self._samples) >= n

    def window(self, t0: float, t1: float) -> PowerWindow:
        """Mean power, per rail and total, of the samples that arrived in ``[t0, t1]``."""
        got = [s for s in self.samples if t0 <= s.t <= t1]
        if not got:
            why = f"no power samples in the {t1 - t0:.3f} s window (sampling interval {self.interval_ms} ms)"
            return PowerWindow(t0, t1, 0, {}, None, "", why + (f"; {self.error}" if self.error else ""))
        names = sorted({n for s in got for n in s.rails})
        mean = {n: float(np.mean([s.rails[n] for s in got if n in s.rails])) for n in names}
        with_total = [s for s in got if s.total_mw is not None]
        if not with_total:
            return PowerWindow(t0, t1, len(got), mean, None, "", got[-1].total_from)
        return PowerWindow(t0, t1, len(got), mean, float(np.mean([s.total_mw for s in with_total])),
                           with_total[-1].total_from)


def measure_idle(sampler: PowerSampler, seconds: float) -> PowerWindow:
    """Idle power: the window of ``seconds`` spent doing nothing (call it just before a pass)."""
    t0 = time.perf_counter()
    time.sleep(max(0.0, float(seconds)))
    return sampler.window(t0, time.perf_counter())


def _kill(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, sig)  # the child leads its own session (start_new_session)


# -- board facts ---------------------------------------------------------------------------------
def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return ""


def _run(cmd: List[str]) -> str:
    """stdout + stderr of ``cmd`` ('' when it is not on PATH or does not end within 5 s)."""
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout + r.stderr


def parse_nvpmodel(text: str) -> Optional[str]:
    """The mode name in ``nvpmodel -q`` output (``NV Power Mode: MAXN``)."""
    m = re.search(r"^NV Power Mode:\s*(\S.*?)\s*$", text, re.M)
    return m.group(1) if m else None


def parse_jetson_clocks(text: str) -> str:
    """``"on"`` when ``jetson_clocks --show`` lists every online CPU and the GPU at MinFreq ==
    MaxFreq, ``"off"`` when one is not, ``"unknown"`` without such lines (it needs root)."""
    found = re.findall(r"^(?:cpu\d+:\s*Online=(\d)|GPU)\b.*?MinFreq=(\d+)\s+MaxFreq=(\d+)", text, re.M)
    pairs = [(int(lo), int(hi)) for online, lo, hi in found if online != "0"]
    if not pairs:
        return "unknown"
    return "on" if all(lo == hi for lo, hi in pairs) else "off"


_JETPACK = {"32": "4", "34": "5", "35": "5", "36": "6", "38": "7", "39": "7"}  # L4T major -> JetPack


def parse_l4t(text: str) -> Tuple[Optional[str], str]:
    """``(L4T version, JetPack series)`` of /etc/nv_tegra_release (``# R36 (release), REVISION: 4.4``
    -> ``("36.4.4", "6.x")``); ``(None, "unknown")`` when it cannot be read."""
    m = re.search(r"R(\d+)\s*\([^)]*\),\s*REVISION:\s*(\d+(?:\.\d+)*)", text)
    if not m:
        return None, "unknown"
    jp = _JETPACK.get(m.group(1))
    return f"{m.group(1)}.{m.group(2)}", f"{jp}.x" if jp else "unknown"


def board_facts(root: str = "/") -> Dict[str, Any]:
    """What a power figure depends on, JSON-ready ("unknown" where it cannot be read)."""
    model = _read_text(os.path.join(root, "proc/device-tree/model"))
    l4t, jetpack = parse_l4t(_read_text(os.path.join(root, "etc/nv_tegra_release")))
    key = board_from_model(model)
    try:
        tensorrt = str(importlib.import_module("tensorrt").__version__)
    except Exception:
        tensorrt = "not installed"
    return {"model": model or "unknown", "board": BOARDS[key].name if key else "unknown",
            "nvpmodel": parse_nvpmodel(_run(["nvpmodel", "-q"])) or "unknown",
            "jetson_clocks": parse_jetson_clocks(_run(["jetson_clocks", "--show"])),
            "l4t": l4t or "unknown", "jetpack": jetpack, "tensorrt": tensorrt, "power_scope": CARRIER_NOTE}
