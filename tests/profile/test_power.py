"""jei_edge.profile.power: tegrastats parsing, rail maps, energy arithmetic, the sampler's process
handling (a fake ``tegrastats`` on PATH), the jtop path (a fake ``jtop`` module) and board facts.

Every test is bounded in time: 20 ms sampling intervals and waits of at most 1.5 s.
"""

import os
import stat
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from jei_edge.errors import DependencyError, InputError, JeiEdgeError
from jei_edge.profile import power
from jei_edge.profile.power import (BOARDS, CARRIER_NOTE, PowerSampler, PowerWindow, available, board_facts,
                                    board_from_model, board_from_rails, energy_per_inference, measure_idle,
                                    module_total, parse_jetson_clocks, parse_l4t, parse_line, parse_nvpmodel)

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"

# fixture -> (board, total mW of every parsed line (None: no total known), malformed lines)
CASES = {
    "orin_nano.txt": ("orin_nano_nx", [4970.0, 7012.0, 6503.0], 2),
    "orin_nx.txt": ("orin_nano_nx", [5412.0, 14250.0], 1),
    "agx_orin.txt": ("agx_orin", [3180.0 + 1192 + 4566, 6340.0 + 12020 + 5080, None], 1),
    "agx_orin_jp72.txt": ("agx_orin", [4120.0 + 2803 + 5320, 8640.0 + 3310 + 5610], 1),
    "thor.txt": ("thor", [23560.0, 41200.0], 1),
    "thor_no_vin.txt": ("thor", [None], 0),
    "xavier.txt": ("agx_xavier", [0.0 + 310 + 1241 + 0 + 155 + 1860, 1552.0 + 931 + 2172 + 0 + 465 + 2211], 1),
    "nano.txt": ("nano", [2284.0, 4872.0], 1),
    "tx2.txt": ("tx2", [1678.0, 3640.0], 0),
}

ORIN_NANO_LINE = (FIXTURES / "orin_nano.txt").read_text().splitlines()[0]  # VDD_IN 4970 mW


def _feed_file(name, board):
    s = PowerSampler(interval_ms=20, board=board)
    for i, line in enumerate((FIXTURES / name).read_text().splitlines()):
        s.feed(line, t=float(i))
    return s


# -- parser ----------------------------------------------------------------------------------------
def test_parse_line_formats():
    assert parse_line("VDD_IN 5078mW/5078mW VDD_SOC 1393mW/1390mW") == {"VDD_IN": 5078.0, "VDD_SOC": 1393.0}
    assert parse_line("POM_5V_IN 1234/1300 POM_5V_GPU 0/0") == {"POM_5V_IN": 1234.0, "POM_5V_GPU": 0.0}
    assert parse_line("VDD_GPU 7953mW/8332mW/8710mW VIN 23000mW/22000mW/24000mW") == {"VDD_GPU": 7953.0,
                                                                                     "VIN": 23000.0}
    # memory, CPU, engines and temperatures are not rails
    line = ("RAM 2246/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [1%@729,off] "
            "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] APE 200 MTS fg 0% bg 0% cpu@47.5C/47.5C GPU@31.5C")
    assert parse_line(line) == {}
    assert parse_line("") == {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_totals_per_board(name):
    board, totals, malformed = CASES[name]
    s = _feed_file(name, board)
    assert [x.total_mw for x in s.samples] == totals
    assert s.skipped == malformed
    assert s.board is BOARDS[board]


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_board_recognised_from_rails(name):
    """Without a board model the documented rail set names the board; Thor without its VIN rail
    stays unknown and has no total (its sub-rails are not summed)."""
    _, totals, malformed = CASES[name]
    s = _feed_file(name, None)
    if name == "thor_no_vin.txt":
        assert s.board is None
        assert s.samples[0].total_mw is None and "no total is known" in s.samples[0].total_from
        assert set(s.samples[0].rails) == {"VDD_GPU", "VDD_CPU_SOC_MSS", "VIN_SYS_5V0"}
        return
    assert [x.total_mw for x in s.samples] == totals
    assert s.skipped == malformed


def test_malformed_lines_are_counted_and_the_last_kept():
    s = _feed_file("thor.txt", "thor")
    assert s.skipped == 1 and s.last_skipped == "Error: cannot open power monitor"
    assert s.feed("   \n") is False and s.skipped == 1  # blank lines are not malformed


# -- rail maps -------------------------------------------------------------------------------------
def test_rail_maps():
    assert BOARDS["orin_nano_nx"].total == "VDD_IN" and not BOARDS["orin_nano_nx"].parts
    agx = BOARDS["agx_orin"]
    assert agx.total is None and agx.parts == ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
    assert "VDDQ_VDD2_1V8AO" in agx.other  # inside VIN_SYS_5V0: reported, never added
    assert BOARDS["thor"].total == "VIN" and "VIN_SYS_5V0" in BOARDS["thor"].other
    assert BOARDS["agx_xavier"].parts == ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V")
    assert BOARDS["nano"].total == "POM_5V_IN"
    for b in BOARDS.values():
        assert (b.total is None) != (not b.parts)  # either a total rail or a sum, never both


@pytest.mark.parametrize("model,key", [
    ("NVIDIA Jetson Orin Nano Developer Kit", "orin_nano_nx"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "orin_nano_nx"),
    ("Jetson AGX Orin", "agx_orin"),
    ("NVIDIA Jetson AGX Thor Developer Kit", "thor"),
    ("Jetson-AGX", "agx_xavier"),
    ("NVIDIA Jetson Xavier NX Developer Kit", "xavier_nx"),
    ("NVIDIA Jetson Nano Developer Kit", "nano"),
    ("NVIDIA Jetson TX2", "tx2"),
    ("Raspberry Pi 5 Model B", None),
    ("", None),
])
def test_board_from_model(model, key):
    assert board_from_model(model) == key


def test_unknown_board_reports_rails_and_only_input_rails_give_a_total():
    rails = parse_line("VDD_NEW 1200mW/1200mW VDD_IN 5000mW/5000mW")
    assert module_total(rails, None) == (5000.0, "VDD_IN")
    assert module_total({"VIN": 30000.0, "X": 1.0}, None) == (30000.0, "VIN")
    assert module_total({"POM_5V_IN": 2000.0}, None) == (2000.0, "POM_5V_IN")
    total, why = module_total({"FOO": 100.0, "BAR": 200.0}, None)
    assert total is None and "no total is known" in why
    assert board_from_rails(["FOO", "BAR"]) is None
    s = PowerSampler(board=None)
    s.feed("FOO 100mW/100mW VDD_NEW_RAIL 1200mW/1200mW", t=1.0)
    w = s.window(0.0, 2.0)
    assert w.mean_mw == {"FOO": 100.0, "VDD_NEW_RAIL": 1200.0} and w.total_mw is None
    assert "no total is known" in w.note


def test_known_board_with_a_missing_rail_has_no_total():
    total, why = module_total({"VDD_GPU_SOC": 1.0, "VDD_CPU_CV": 2.0}, BOARDS["agx_orin"])
    assert total is None and "VIN_SYS_5V0" in why
    total, why = module_total({"VDD_GPU": 1.0}, BOARDS["thor"])
    assert total is None and "VIN" in why


# -- windows and energy ----------------------------------------------------------------------------
def test_window_means_and_empty_window():
    s = PowerSampler(board="orin_nano_nx")
    for t, mw in [(1.0, 4000), (2.0, 6000), (3.0, 8000), (9.0, 1)]:
        s.feed(f"VDD_IN {mw}mW/{mw}mW VDD_SOC 1000mW/1000mW", t=t)
    w = s.window(1.5, 3.5)
    assert w.samples == 2 and w.total_mw == 7000.0 and w.total_from == "VDD_IN"
    assert w.mean_mw == {"VDD_IN": 7000.0, "VDD_SOC": 1000.0}
    assert w.to_dict()["seconds"] == pytest.approx(2.0)
    empty = s.window(4.0, 5.0)
    assert empty.samples == 0 and empty.total_mw is None and empty.mean_mw == {}
    assert "no power samples" in empty.note


def test_energy_per_inference_arithmetic():
    # (5000 mW - 3000 mW) x 2 s = 4000 mJ over 100 samples
    assert energy_per_inference(5000.0, 3000.0, 2.0, 100) == pytest.approx(40.0)
    assert energy_per_inference(3000.0, 3000.0, 1.0, 1) == 0.0
    assert energy_per_inference(2900.0, 3000.0, 1.0, 10) == pytest.approx(-10.0)
    with pytest.raises(InputError):
        energy_per_inference(1.0, 0.0, 1.0, 0)
    with pytest.raises(InputError):
        energy_per_inference(1.0, 0.0, -1.0, 1)
    active = PowerWindow(0.0, 1.0, 5, {}, 6000.0)
    idle = PowerWindow(0.0, 1.0, 5, {}, 4000.0)
    assert energy_per_inference(active.total_mw, idle.total_mw, 0.5, 50) == pytest.approx(20.0)


def test_bad_arguments_are_user_errors():
    for kwargs in ({"interval_ms": 0}, {"source": "nvml"}, {"board": "jetson_tk1"}):
        with pytest.raises(InputError):
            PowerSampler(**kwargs)


# -- the sampler with a fake tegrastats --------------------------------------------------------------
FAKE_TEGRASTATS = """\
#!{python}
import os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_TEGRA_ARGS"], "w") as f:
    f.write(" ".join(args))
interval = int(args[args.index("--interval") + 1]) / 1000.0
mode = os.environ.get("FAKE_TEGRA_MODE", "normal")
with open(os.environ["FAKE_TEGRA_LINES"]) as f:
    lines = [line.rstrip("\\n") for line in f if line.strip()]
if mode == "silent":
    time.sleep(60)
for n in range(100000):
    print(lines[n % len(lines)], flush=True)
    if mode == "crash" and n == 2:
        print("tegrastats: lost the power monitor (fake crash)", file=sys.stderr, flush=True)
        sys.exit(3)
    time.sleep(interval)
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def no_jtop(monkeypatch):
    monkeypatch.setitem(sys.modules, "jtop", None)  # `from jtop import jtop` raises ImportError


@pytest.fixture
def fake_tegrastats(tmp_path, monkeypatch, no_jtop):
    """Puts a fake ``tegrastats`` first on PATH; returns ``setup(mode, lines) -> args file``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "tegrastats", FAKE_TEGRASTATS.format(python=sys.executable))
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))

    def setup(mode="normal", lines=(ORIN_NANO_LINE,)):
        (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.setenv("FAKE_TEGRA_LINES", str(tmp_path / "lines.txt"))
        monkeypatch.setenv("FAKE_TEGRA_ARGS", str(tmp_path / "args.txt"))
        monkeypatch.setenv("FAKE_TEGRA_MODE", mode)
        return tmp_path / "args.txt"

    return setup


def _assert_reaped(s: PowerSampler):
    assert not s._thread.is_alive()
    assert s._proc.returncode is not None
    with pytest.raises(ChildProcessError):  # already reaped: no zombie left
        os.waitpid(s._proc.pid, os.WNOHANG)


def test_sampler_samples_and_stops_cleanly(fake_tegrastats):
    args = fake_tegrastats()
    s = PowerSampler(interval_ms=20, board="orin_nano_nx")
    assert available() is None
    t0 = time.perf_counter()
    s.start()
    assert s.source == "tegrastats" and s.running
    assert s.wait_for(3, timeout=1.5)
    t1 = time.perf_counter()
    s.stop()
    t2 = time.perf_counter()
    _assert_reaped(s)
    assert args.read_text() == "--interval 20"  # the interval reaches tegrastats
    assert s.error is None and s.skipped == 0
    assert all(t0 <= x.t <= t2 for x in s.samples)  # perf_counter stamps
    w = s.window(t0, t1)
    assert w.samples >= 3 and w.total_mw == pytest.approx(4970.0) and w.total_from == "VDD_IN"
    n = len(s.samples)
    time.sleep(0.06)
    assert len(s.samples) == n  # nothing arrives after stop()


def test_interval_passed_through_and_context_manager(fake_tegrastats):
    args = fake_tegrastats(lines=(FIXTURES / "agx_orin.txt").read_text().splitlines()[:2])
    with PowerSampler(interval_ms=35) as s:
        assert s.wait_for(2, timeout=1.5)
    _assert_reaped(s)
    assert args.read_text() == "--interval 35"
    assert s.board is BOARDS["agx_orin"]  # from the rails (no device-tree model here)
    assert [x.total_mw for x in s.samples[:2]] == [8938.0, 23440.0]


def test_child_crash_keeps_samples_and_reports(fake_tegrastats):
    fake_tegrastats(mode="crash")
    s = PowerSampler(interval_ms=20, board="orin_nano_nx").start()
    t0 = time.perf_counter() - 1.0
    assert not s.wait_for(10, timeout=1.5)  # sampling ended early
    assert "exited with code 3" in s.error and "fake crash" in s.error
    assert len(s.samples) == 3 and s.skipped == 1  # the stderr line
    s.stop()
    _assert_reaped(s)
    w = s.window(t0, time.perf_counter())
    assert w.samples == 3 and w.total_mw == pytest.approx(4970.0)


def test_silent_child_gives_an_empty_window_not_an_exception(fake_tegrastats):
    fake_tegrastats(mode="silent")
    s = PowerSampler(interval_ms=20, board="orin_nano_nx").start()
    t0 = time.perf_counter()
    time.sleep(0.1)
    w = s.window(t0, time.perf_counter())
    stopping = time.perf_counter()
    s.stop()
    assert time.perf_counter() - stopping < 1.0
    _assert_reaped(s)
    assert w.samples == 0 and w.total_mw is None and "no power samples" in w.note
    assert s.error is None


def test_measure_idle_and_energy(fake_tegrastats):
    fake_tegrastats()
    with PowerSampler(interval_ms=20, board="orin_nano_nx") as s:
        assert s.wait_for(1, timeout=1.5)
        idle = measure_idle(s, 0.2)
    assert idle.samples >= 2 and idle.total_mw == pytest.approx(4970.0)
    assert idle.t1 - idle.t0 >= 0.2
    assert energy_per_inference(idle.total_mw + 1000.0, idle.total_mw, 0.5, 10) == pytest.approx(50.0)


def test_unavailable_off_a_jetson(tmp_path, monkeypatch, no_jtop):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tegrastats
    reason = available()
    assert isinstance(reason, str) and "tegrastats" in reason and "jtop" in reason
    assert "tegrastats" in available("tegrastats") and "jtop" in available("jtop")
    with pytest.raises(DependencyError) as e:
        PowerSampler(interval_ms=20).start()
    assert isinstance(e.value, JeiEdgeError) and "unavailable" in str(e.value)


# -- the jtop path with a fake jtop module ---------------------------------------------------------------
def _fake_jtop(monkeypatch, power_dict, fail_start=False):
    class FakeJtop:
        made = []

        def __init__(self, interval=1.0):
            self.interval, self.closed = interval, False
            FakeJtop.made.append(self)

        def start(self):
            if fail_start:
                raise RuntimeError("The jtop.service is not active")

        def ok(self, spin=False):
            time.sleep(self.interval)
            return not self.closed

        @property
        def power(self):
            return power_dict

        def close(self):
            self.closed = True

    module = types.ModuleType("jtop")
    module.jtop = FakeJtop
    monkeypatch.setitem(sys.modules, "jtop", module)
    return FakeJtop


def _rail(mw):
    return {"online": True, "type": "INA3221", "volt": 5000, "curr": mw // 5, "power": mw, "avg": mw}


def test_jtop_path_uses_its_rails_and_our_totals(monkeypatch):
    # Orin NX: jtop moves VDD_IN into "tot" with its name
    nx = {"rail": {"VDD_CPU_GPU_CV": _rail(1200), "VDD_SOC": _rail(1500)}, "tot": {**_rail(6100), "name": "VDD_IN"}}
    fake = _fake_jtop(monkeypatch, nx)
    assert available() is None
    with PowerSampler(interval_ms=20, board="orin_nano_nx") as s:
        assert s.source == "jtop"
        assert s.wait_for(2, timeout=1.5)
    assert fake.made[0].interval == pytest.approx(0.02) and fake.made[0].closed and not s._thread.is_alive()
    assert s.samples[0].rails == {"VDD_CPU_GPU_CV": 1200.0, "VDD_SOC": 1500.0, "VDD_IN": 6100.0}
    assert s.samples[0].total_mw == 6100.0


def test_jtop_sum_total_is_not_trusted_on_agx_orin(monkeypatch):
    rails = {"VDD_GPU_SOC": _rail(3000), "VDD_CPU_CV": _rail(2000), "VIN_SYS_5V0": _rail(5000),
             "VDDQ_VDD2_1V8AO": _rail(1000)}
    _fake_jtop(monkeypatch, {"rail": rails, "tot": {"power": 11000, "avg": 11000}})  # jtop's own sum
    with PowerSampler(interval_ms=20) as s:
        assert s.wait_for(1, timeout=1.5)
    assert s.samples[0].total_mw == 10000.0  # VDDQ_VDD2_1V8AO is inside VIN_SYS_5V0


def test_jtop_service_down_falls_back_to_tegrastats(fake_tegrastats, monkeypatch):
    fake_tegrastats()
    _fake_jtop(monkeypatch, {}, fail_start=True)
    with PowerSampler(interval_ms=20, board="orin_nano_nx") as s:
        assert s.source == "tegrastats" and "jtop could not start" in s.note
        assert s.wait_for(1, timeout=1.5)
    with pytest.raises(DependencyError):
        PowerSampler(interval_ms=20, source="jtop").start()


# -- board facts -------------------------------------------------------------------------------------
def test_parsers_of_board_tools():
    assert parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN_SUPER\n2\n") == "MAXN_SUPER"
    assert parse_nvpmodel("nvpmodel: command failed") is None
    on = textwrap.dedent("""\
        SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
        Online CPUs: 0-7
        cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
        cpu1: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
        cpu8: Online=0 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=729600 IdleStates: WFI=1 c7=1
        GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000
        EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
        NV Power Mode: MAXN""")
    assert parse_jetson_clocks(on) == "on"
    assert parse_jetson_clocks(on.replace("GPU MinFreq=1300500000", "GPU MinFreq=306000000")) == "off"
    assert parse_jetson_clocks("Error: Run this script(/usr/bin/jetson_clocks) as a root user") == "unknown"
    assert parse_jetson_clocks("") == "unknown"
    release = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan 8"
    assert parse_l4t(release) == ("36.4.3", "6.x")
    assert parse_l4t("# R35 (release), REVISION: 5.0, GCID: 1") == ("35.5.0", "5.x")
    assert parse_l4t("# R32 (release), REVISION: 7.4, GCID: 1") == ("32.7.4", "4.x")
    assert parse_l4t("# R99 (release), REVISION: 1.0") == ("99.1.0", "unknown")
    assert parse_l4t("") == (None, "unknown")


def test_board_facts(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "nvpmodel", "#!/bin/sh\necho 'NVPM WARN: fan mode is not set!'\n"
                                      "echo 'NV Power Mode: 15W'\necho 0\n")
    _executable(bin_dir / "jetson_clocks", "#!/bin/sh\necho 'Error: Run this script as a root user' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    facts = board_facts(str(root))
    assert facts == {"model": "NVIDIA Jetson Orin Nano Developer Kit", "board": "Jetson Orin Nano / Orin NX",
                     "nvpmodel": "15W", "jetson_clocks": "unknown", "l4t": "36.4.3", "jetpack": "6.x",
                     "tensorrt": "10.3.0", "power_scope": CARRIER_NOTE}
    assert "carrier board" in facts["power_scope"]


def test_board_facts_off_a_jetson(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    facts = board_facts(str(tmp_path))
    assert facts["model"] == facts["board"] == facts["nvpmodel"] == facts["jetson_clocks"] == "unknown"
    assert facts["l4t"] == facts["jetpack"] == "unknown" and facts["tensorrt"] == "not installed"
    assert facts["power_scope"] == CARRIER_NOTE


def test_module_is_torch_free():
    src = Path(power.__file__).read_text()
    assert "import torch" not in src
