"""The HTML profile page (``jei_edge.profile.html``): sections, embedded plots, numbers, escaping.

The page is parsed with the standard library's ``html.parser``; most tests use a small synthetic
profile dict, one uses a real ``profile_bundle`` result.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from jei_edge import _deps
from jei_edge.errors import DependencyError
from jei_edge.profile import html as page
from jei_edge.profile.html import fmt, fmt_x, humanize, render_html, write_html

ROOT = Path(__file__).resolve().parents[2]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
CORE = {"header", "key-numbers", "stages", "exits", "timing", "speedups", "definitions"}


def synthetic_info(bundle="/runs/demo/model.jei", device="cpu"):
    """A small profile dict with the keys of ``profile_bundle``: 3 stages, batch 1 with a plain
    backbone, batch 16 without."""
    def batch(bsz, scale, plain):
        b = {"batches": 48 // bsz, "samples": 48, "boundaries": 40 // bsz, "reach_total": [48, 30, 12],
             "exit_ms_per_sample": 0.5 * scale, "full_ms_per_sample": 0.8 * scale,
             "ideal_ms_per_sample": 0.45 * scale, "throughput_exit": 1e3 / (0.5 * scale),
             "throughput_full": 1e3 / (0.8 * scale), "realized_speedup": 1.6123456789,
             "efficiency": 0.9087654321, "overhead_us_per_boundary": 12.5 * scale,
             "latency_ms_per_call": {"p50": 0.5 * scale * bsz, "p90": 0.6 * scale * bsz, "p99": 0.9 * scale * bsz,
                                     "max": 1.2 * scale * bsz},
             "stage_ms": [0.1 * bsz * scale, 0.12 * bsz * scale, 0.15 * bsz * scale]}
        if plain:
            b.update({"plain_ms_per_sample": 0.7 * scale, "throughput_plain": 1e3 / (0.7 * scale),
                      "speedup_vs_plain": 1.4098765432})
        return b

    return {
        "bundle": bundle, "device": device, "stages": 3, "samples": 48, "repeats": 3, "offsets": None,
        "settings": {"backend": "onnxruntime", "intra_op_threads": 2, "io_binding": True,
                     "graph_optimization": "all"},
        "exits": {"histogram": [18, 18, 12], "fraction": [0.375, 0.375, 0.25], "cost": [0.3, 0.62, 1.0],
                  "cost_vs_plain": [0.31, 0.64, 1.03], "mean_cost": 0.5950, "mean_cost_vs_plain": 0.6138,
                  "theoretical_speedup": 1 / 0.595, "theoretical_speedup_vs_plain": 1 / 0.6138},
        "accuracy": {"exit": 0.9375, "full": 0.9583},
        "batches": {"1": batch(1, 1.0, True), "16": batch(16, 0.1, False)},
    }


ENERGY = {"exit": {"mj_per_inference": 1.9, "mean_mw": 4210.0, "idle_mw": 1500.0},
          "full": {"mj_per_inference": 2.6, "mean_mw": 4420.0, "idle_mw": 1500.0},
          "plain": {"mj_per_inference": 2.4, "mean_mw": 4380.0, "idle_mw": 1500.0},
          "board": {"name": "Orin Nano", "rail": "VDD_IN"},
          "note": "carrier-board power not included"}
CURVE = {"jei": {"cost": [0.3, 0.5, 0.7, 1.0], "accuracy": [0.85, 0.92, 0.95, 0.96]},
         "baseline": {"cost": [0.3, 0.5, 0.7, 1.0], "accuracy": [0.6, 0.8, 0.9, 0.96]},
         "chosen": {"cost": 0.5, "accuracy": 0.92}}


class Page(HTMLParser):
    """Tags with their attributes, the text, tables by id (cells with their data-* attributes), and
    whether every non-void element is closed in order."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.data, self.tables, self.stack, self.mismatched = [], [], {}, [], []
        self._table = self._row = self._cell = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", f"#{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"tag": tag, "text": "", **{k: v for k, v in a.items() if k.startswith("data-")},
                          "class": a.get("class", "")}

    def handle_startendtag(self, tag, attrs):  # <path ... /> inside svg
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.mismatched.append((tag, list(self.stack[-3:])))
        else:
            self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.data.append(data)
        if self._cell is not None:
            self._cell["text"] += data

    # -- views ---------------------------------------------------------------------------------
    def ids(self, tag):
        return {a.get("id") for t, a in self.tags if t == tag and a.get("id")}

    def count(self, tag, **attrs):
        return sum(1 for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items()))

    def plots(self):
        return [a["data-plot"] for t, a in self.tags if t == "figure" and "data-plot" in a]

    def text(self):
        return "".join(self.data)

    def body_rows(self, table_id):
        return [r for r in self.tables[table_id] if r and r[0]["tag"] == "td"]

    def by_key(self, table_id):
        """{first cell's text: {data-key: cell}} of a table's body rows."""
        return {r[0]["text"]: {c["data-key"]: c for c in r if "data-key" in c} for r in self.body_rows(table_id)}


def assert_self_contained(raw: str, p: Page):
    """No script, no external style sheet, image, font or frame: nothing to fetch."""
    assert p.count("script") == 0 and "<script" not in raw.lower()
    assert p.count("link") == 0 and p.count("iframe") == 0 and p.count("object") == 0
    for tag, attrs in p.tags:
        for name in ("src", "href", "xlink:href", "data", "action", "poster", "srcset"):
            v = (attrs.get(name) or "").strip().lower()
            assert not v.startswith(("http:", "https:", "//", "ftp:", "file:")), (tag, name, v)
        if tag == "img":
            assert (attrs.get("src") or "").startswith("data:image/"), attrs
    low = raw.lower()
    assert "src=\"http" not in low and "url(http" not in low and "url(//" not in low and "@import" not in low
    assert not p.mismatched, p.mismatched[:5]
    assert p.stack == [], p.stack  # every element closed


def parse(path) -> tuple:
    raw = Path(path).read_text(encoding="utf-8")
    return raw, Page(raw)


# -- tests ------------------------------------------------------------------------------------------
def test_sections_and_embedded_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = write_html(synthetic_info(), tmp_path / "profile.html")
    assert out == tmp_path / "profile.html"
    raw, p = parse(out)
    assert raw.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in raw
    assert p.ids("section") | p.ids("header") >= CORE
    assert not {"energy", "curve"} & p.ids("section")
    assert p.ids("div").isdisjoint({"no-plots"})
    assert sorted(p.plots()) == ["exits", "speedups", "stages", "timing"]
    assert p.count("svg") == 4  # inline svg, one per plot
    assert_self_contained(raw, p)
    # svg ids are unique across the page (clip paths and glyphs of several figures)
    ids = [a["id"] for _, a in p.tags if "id" in a]
    assert len(ids) == len(set(ids))
    # the tables are all there, with units in the headers
    assert {"key-numbers-table", "stage-table", "exit-table", "timing-table", "speedup-table"} <= set(p.tables)
    assert "ms / sample" in p.text() and "samples / s" in p.text() and "µs / row" in p.text()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["profile.html"]  # no temp file left


def test_header_shows_the_run():
    p = Page(render_html(synthetic_info(), plots=False))
    header = p.text()
    for want in ("model.jei", "/runs/demo/model.jei", "device", "cpu", "onnxruntime", "samples", "48", "repeats",
                 "intra op threads", "io binding", "yes", "graph optimization"):
        assert want in header, want


def test_key_numbers_match_the_profile():
    info = synthetic_info()
    p = Page(render_html(info, plots=False))
    rows = p.by_key("key-numbers-table")
    assert set(rows) == {"1", "16"}
    for bsz, b in info["batches"].items():
        row = rows[bsz]
        for key in ("realized_speedup", "efficiency", "exit_ms_per_sample", "throughput_exit"):
            assert float(row[key]["data-value"]) == b[key], key  # exact: repr round-trips
        assert row["realized_speedup"]["text"] == f"{b['realized_speedup']:.2f}×" == "1.61×"
        assert row["efficiency"]["text"] == fmt(b["efficiency"]) == "0.909"
        assert row["theoretical_speedup"]["text"] == fmt_x(info["exits"]["theoretical_speedup"]) == "1.68×"
        assert float(row["latency_ms_per_call.p99"]["data-value"]) == b["latency_ms_per_call"]["p99"]
    assert float(rows["1"]["speedup_vs_plain"]["data-value"]) == info["batches"]["1"]["speedup_vs_plain"]
    assert rows["1"]["speedup_vs_plain"]["text"] == "1.41×" and "good" in rows["1"]["speedup_vs_plain"]["class"]
    assert rows["16"]["speedup_vs_plain"]["text"] == "–" and "data-value" not in rows["16"]["speedup_vs_plain"]
    assert rows["16"]["throughput_exit"]["text"] == "20,000"
    # the cards
    cards = {a["data-key"] for t, a in p.tags if t == "div" and "card" in a.get("class", "").split()}
    assert cards == {"theoretical_speedup", "best_realized_speedup", "best_speedup_vs_plain", "mean_cost", "accuracy"}
    text = p.text()
    assert "93.75%" in text and "95.83%" in text and "0.595" in text
    # the exit table: counts, shares, costs
    exits = p.body_rows("exit-table")
    assert [r[1]["text"] for r in exits[:3]] == ["18", "18", "12"] and exits[3][1]["text"] == "48"
    assert [r[2]["text"] for r in exits[:3]] == ["37.5%", "37.5%", "25.0%"]
    # the stage table: ms per call, µs per row, rows reaching, per batch size
    stages = p.body_rows("stage-table")
    assert len(stages) == 3 and [c["text"] for c in stages[2][1:4]] == ["0.150", "150", "12"]
    assert float(stages[2][4]["data-value"]) == pytest.approx(0.15 * 16 * 0.1)


def test_strings_are_escaped(tmp_path):
    evil = "/tmp/<script>alert('x')</script>/m.jei"
    info = synthetic_info(bundle=evil, device='cuda"><img src=x onerror=alert(1)>')
    info["settings"]["note"] = "<b>bold</b> & more"
    energy = {"<i>exit</i>": {"mj_<u>": 1.0}, "note": "<script>x()</script>"}
    curve = {"<em>jei</em>": {"cost": [0.5, 1.0], "accuracy": [0.9, 0.95]}}
    raw = render_html(info, energy, curve, plots=False)
    p = Page(raw)
    assert p.count("script") == 0 and p.count("img") == 0 and p.count("u") == 0 and p.count("em") == 0
    assert p.count("i") == 0
    assert "<script>" not in raw and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in raw
    text = p.text()
    assert evil in text and "<b>bold</b> & more" in text and "<script>x()</script>" in text
    assert 'cuda"><img src=x onerror=alert(1)>' in text
    assert_self_contained(raw, p)
    # and with the plots: matplotlib gets the odd labels too ('$' would start mathtext)
    pytest.importorskip("matplotlib")
    energy["$x$ <y>"] = {"a$b": 2.0}
    out = write_html(info, tmp_path / "p.html", energy, curve)
    raw, p = parse(out)
    assert p.count("script") == 0 and p.count("img") == 0
    assert_self_contained(raw, p)


def test_energy_and_curve_only_when_given(tmp_path):
    info = synthetic_info()
    raw = render_html(info, plots=False)
    assert not {"energy", "curve"} & Page(raw).ids("section")
    p = Page(render_html(info, energy=ENERGY, plots=False))
    assert "energy" in p.ids("section") and "curve" not in p.ids("section")
    p = Page(render_html(info, curve=CURVE, plots=False))
    assert "curve" in p.ids("section") and "energy" not in p.ids("section")

    p = Page(render_html(info, ENERGY, CURVE, plots=False))
    assert {"energy", "curve"} <= p.ids("section")
    rows = {r[0]["text"]: [c["text"] for c in r[1:]] for r in p.body_rows("energy-table")}
    assert rows["exit"] == ["1.90", "4,210", "1,500"] and rows["plain"] == ["2.40", "4,380", "1,500"]
    assert rows["exit / full"][0] == f"{1.9 / 2.6:.2f}×" and "exit / plain" in rows
    head = [c["text"] for c in p.tables["energy-table"][0]]
    assert head == ["pass", "mJ per inference", "mean mW", "idle mW"]
    text = p.text()
    assert "carrier-board power not included" in text and "Orin Nano" in text and "VDD_IN" in text
    curve_rows = {r[0]["text"]: r for r in p.body_rows("curve-table")}
    assert set(curve_rows) == {"jei", "baseline", "chosen"}
    assert curve_rows["chosen"][4]["text"] == "92.00%" and float(curve_rows["chosen"][2]["data-value"]) == 0.5

    pytest.importorskip("matplotlib")
    raw, p = parse(write_html(info, tmp_path / "all.html", ENERGY, CURVE))
    assert sorted(p.plots()) == ["curve", "energy", "exits", "speedups", "stages", "timing"]
    assert_self_contained(raw, p)


def test_tables_only_without_matplotlib(tmp_path, monkeypatch):
    real = _deps.require

    def no_matplotlib(name, purpose=None):
        if name == "matplotlib":
            raise DependencyError(f"'{name}' is needed for {purpose} but could not be imported",
                                  hint="pip install 'jei-edge[plots]'")
        return real(name, purpose)

    monkeypatch.setattr(_deps, "require", no_matplotlib)
    raw, p = parse(write_html(synthetic_info(), tmp_path / "p.html", ENERGY, CURVE))
    assert p.count("svg") == 0 and p.plots() == []
    assert "no-plots" in p.ids("div")
    assert "pip install 'jei-edge[plots]'" in p.text() and "tables only" in p.text()
    assert {"key-numbers-table", "stage-table", "exit-table", "timing-table", "speedup-table", "energy-table",
            "curve-table"} <= set(p.tables)
    assert p.ids("section") | p.ids("header") >= CORE | {"energy", "curve"}
    assert_self_contained(raw, p)


def test_tables_only_when_matplotlib_cannot_be_imported(tmp_path):
    """A fresh interpreter in which ``import matplotlib`` fails."""
    src = tmp_path / "info.json"
    src.write_text(json.dumps(synthetic_info()))
    code = textwrap.dedent(f"""
        import json, sys
        sys.modules["matplotlib"] = None  # import matplotlib -> ImportError
        from jei_edge.profile.html import write_html
        write_html(json.load(open({str(src)!r})), {str(tmp_path / 'p.html')!r})
        assert "matplotlib.figure" not in sys.modules
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    raw, p = parse(tmp_path / "p.html")
    assert p.count("svg") == 0 and "no-plots" in p.ids("div") and "jei-edge[plots]" in p.text()
    assert "key-numbers-table" in p.tables
    assert_self_contained(raw, p)


def test_odd_values_are_shown_sensibly():
    info = synthetic_info()
    info["batches"]["1"]["realized_speedup"] = float("nan")
    info["offsets"] = [0.05, -0.1]
    del info["accuracy"]
    info["settings"] = {}
    p = Page(render_html(info, plots=False))
    row = p.by_key("key-numbers-table")["1"]
    assert row["realized_speedup"]["text"] == "–" and "data-value" not in row["realized_speedup"]
    assert "0.0500, -0.100" in p.text()
    cards = {a["data-key"] for t, a in p.tags if t == "div" and "card" in a.get("class", "").split()}
    assert "accuracy" not in cards and "best_realized_speedup" in cards  # batch 16 still has one


@pytest.mark.parametrize("value,want", [
    (None, "–"), (float("nan"), "–"), (float("inf"), "–"), (True, "yes"), (0, "0"), (0.0, "0"), (1234567, "1,234,567"),
    (36313.24, "36,313"), (1.0, "1.00"), (0.0275123, "0.0275"), (81.456, "81.5"), (2.0e-6, "2.00e-06"),
    (-0.5, "-0.500"), ("all", "all"),
])
def test_fmt(value, want):
    assert fmt(value) == want


def test_humanize():
    assert humanize("mj_per_inference") == "mJ per inference"
    assert humanize("mean_mw") == "mean mW" and humanize("idle_mw") == "idle mW"
    assert humanize("intra_op_threads") == "intra op threads"


def test_writes_atomically(tmp_path, monkeypatch):
    path = tmp_path / "profile.html"
    path.write_text("old")

    def boom(*a, **k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(page, "render_html", boom)
    with pytest.raises(RuntimeError):
        write_html(synthetic_info(), path)
    assert path.read_text() == "old" and sorted(f.name for f in tmp_path.iterdir()) == ["profile.html"]
    monkeypatch.undo()
    write_html(synthetic_info(), path)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_page_of_a_real_profile(bundle, tmp_path):
    pytest.importorskip("matplotlib")
    from jei_edge.profile import profile_bundle
    from jei_edge.runtime import Runtime
    from tests.runtime.helpers import model_inputs

    rt = Runtime.load(bundle, max_batch=4)
    x = model_inputs(16, seed=5)
    info = profile_bundle(rt, x, np.arange(16) % 5, batch_sizes=(1, 4), repeats=1)
    info_before = copy.deepcopy(info)
    raw, p = parse(write_html(info, tmp_path / "profile.html"))
    assert info == info_before  # the page does not touch the profile
    assert p.ids("section") | p.ids("header") >= CORE
    assert sorted(p.plots()) == ["exits", "speedups", "stages", "timing"]
    assert_self_contained(raw, p)
    rows = p.by_key("key-numbers-table")
    assert set(rows) == {"1", "4"}
    for bsz, b in info["batches"].items():
        assert float(rows[bsz]["realized_speedup"]["data-value"]) == b["realized_speedup"]
        assert float(rows[bsz]["efficiency"]["data-value"]) == b["efficiency"]
        if "speedup_vs_plain" in b:
            assert rows[bsz]["speedup_vs_plain"]["text"] == f"{b['speedup_vs_plain']:.2f}×"
    assert len(p.body_rows("stage-table")) == info["stages"]
    assert [int(r[1]["text"].replace(",", "")) for r in p.body_rows("exit-table")[:-1]] == info["exits"]["histogram"]
    # and the same page from the JSON the command writes
    again = json.loads(json.dumps(info))
    assert render_html(again) == render_html(info)
