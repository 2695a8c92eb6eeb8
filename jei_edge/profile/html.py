"""A self-contained HTML page per profile: key numbers, tables and plots in one file.

``write_html(info, path)`` writes the page for a ``profile_bundle`` result beside the JSON and the
PNG of ``report.py``: the header (bundle, device, backend settings, samples, repeats), the key
numbers (theoretical speedup, realized speedup and speedup vs the plain backbone per batch size,
efficiency), stage latency, the exit histogram with each exit's cost, time per sample and
throughput vs batch size, speedups, and, when given, energy and the accuracy/cost curve.

Everything is inside the file: plots are inline ``<svg>`` (matplotlib, the ``plots`` extra; drawn
on ``matplotlib.figure.Figure`` objects, so no GUI backend and no pyplot state is involved), the
style is one small inline ``<style>``; no script, no external image, font or style sheet, so the
page opens offline. Without matplotlib the page has the tables only, and says how to get plots.
Every string taken from the profile is escaped.

Torch-free; ``render_html`` returns the page as a string, ``write_html`` writes it atomically.
"""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from jei_edge import _deps
from jei_edge._io import atomic_write_bytes
from jei_edge.profile.measure import format_interval, ratio_verdict

# one colour per pass, the same in every plot and in the tables' legends
COLORS = {"exit": "#2563eb", "full": "#6b7280", "plain": "#ea580c", "ideal": "#16a34a",
          "theoretical": "#7c3aed", "realized": "#2563eb", "vs_plain": "#ea580c",
          "cost": "#374151", "hist": "#0d9488", "baseline": "#6b7280"}
_SERIES = ["#2563eb", "#ea580c", "#16a34a", "#7c3aed", "#db2777", "#0891b2", "#ca8a04", "#4b5563"]

_CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f3f4f6;--card:#fff;--accent:#2563eb;
--good:#15803d;--bad:#b91c1c}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 20px 40px}
header.top{background:linear-gradient(135deg,#1e3a8a,#2563eb);color:#fff;border-radius:14px;
padding:22px 26px;margin-bottom:18px}
header.top h1{margin:0 0 4px;font-size:26px;font-weight:650;letter-spacing:-.01em}
header.top .path{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;opacity:.85;
word-break:break-all}
.facts{display:flex;flex-wrap:wrap;gap:8px;margin-top:14px}
.fact{background:rgba(255,255,255,.14);border-radius:999px;padding:3px 12px;font-size:13px}
.fact b{font-weight:600}
.facts.settings{margin-top:8px;gap:6px;align-items:center}
.fact.small{font-size:12px;padding:2px 10px;background:rgba(255,255,255,.10)}
.facts-label{font-size:12px;opacity:.8;margin-right:2px}
section{background:var(--card);border-radius:14px;padding:20px 24px;margin:0 0 18px;
box-shadow:0 1px 2px rgba(0,0,0,.05),0 1px 8px rgba(0,0,0,.03)}
section h2{margin:0 0 4px;font-size:19px;font-weight:650}
p.lead{margin:0 0 14px;color:var(--muted);font-size:14px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin:6px 0 18px}
.card{border:1px solid var(--line);border-radius:12px;padding:12px 16px}
.card .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.card .value{font-size:28px;font-weight:650;line-height:1.25;font-variant-numeric:tabular-nums}
.card .sub{color:var(--muted);font-size:13px}
.good{color:var(--good)}.bad{color:var(--bad)}
table{border-collapse:collapse;width:100%;font-size:14px;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-weight:600;padding:0 0 6px;font-size:14px}
th,td{padding:6px 9px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{background:#f9fafb;color:#374151;font-weight:600;font-size:13px;vertical-align:bottom}
th .unit{display:block;color:var(--muted);font-weight:400;font-size:11px}
td.text,th.text{text-align:left;white-space:normal}
tbody tr:nth-child(even){background:#fafafa}
tbody tr:hover{background:#eff6ff}
td.ratio{color:#4b5563;font-style:italic}
p.energy-note{margin:8px 0 0}
.scroll{overflow-x:auto}
figure{margin:8px 0 14px}
figure svg{width:100%;height:auto;display:block}
figure img{max-width:100%;height:auto;display:block}
.grid2{display:grid;grid-template-columns:minmax(0,5fr) minmax(0,4fr);gap:22px;align-items:start}
.grid2 th{white-space:normal}.grid2 th,.grid2 td{padding:6px 7px}
@media (max-width:900px){.grid2{grid-template-columns:1fr}}
.note{background:#fffbeb;border:1px solid #fde68a;color:#92400e;border-radius:10px;padding:10px 14px;
font-size:14px;margin:0 0 18px}
.note code{background:#fef3c7;border-radius:4px;padding:0 4px}
.defs{font-size:13px;color:var(--muted)}
.defs dt{font-weight:600;color:var(--fg)}.defs dd{margin:0 0 6px}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:10px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:baseline}
@media print{body{background:#fff}section{box-shadow:none;border:1px solid var(--line);break-inside:avoid}}
"""


# -- formatting -------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes too: safe in text and attribute values)."""
    return html.escape(str(value), quote=True)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, digits: int = 3) -> str:
    """A number for people: ``digits`` significant digits, thousands separated, no exponent for
    ordinary magnitudes; '–' for None, NaN and infinities; anything else as text."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 10 ** digits:
            return f"{v:,.0f}"
        if a < 1e-4:
            return f"{v:.{max(digits - 1, 1)}e}"
        decimals = max(digits - 1 - int(math.floor(math.log10(a))), 0)
        return f"{v:,.{decimals}f}"
    return str(v)


def fmt_x(v: Any) -> str:
    """A speedup: ``1.29×``."""
    return f"{v:.2f}×" if _finite(v) else "–"


def fmt_pct(v: Any, digits: int = 1) -> str:
    """A fraction as a percentage: ``0.189`` -> ``18.9%``."""
    return f"{100 * v:.{digits}f}%" if _finite(v) else "–"


def _cell(text: str, value: Any = None, cls: str = "", key: str = "") -> str:
    """A ``<td>``; a numeric ``value`` is kept exactly in ``data-value`` and ``key`` names the profile
    field in ``data-key`` (for machines and tests)."""
    attrs = f' class="{esc(cls)}"' if cls else ""
    if key:
        attrs += f' data-key="{esc(key)}"'
    if _finite(value):
        attrs += f' data-value="{esc(repr(float(value)))}"'
    return f"<td{attrs}>{esc(text)}</td>"


def _th(label: str, unit: str = "", cls: str = "") -> str:
    u = f'<span class="unit">{esc(unit)}</span>' if unit else ""
    c = f' class="{esc(cls)}"' if cls else ""
    return f"<th{c}>{esc(label)}{u}</th>"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "", tid: str = "") -> str:
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    idattr = f' id="{esc(tid)}"' if tid else ""
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table{idattr}>{cap}<thead><tr>{"".join(head)}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _speed_cls(v: Any) -> str:
    if not _finite(v):
        return ""
    return "good" if v >= 1.0 else "bad"


_UNIT_TOKENS = {"mj": "mJ", "mw": "mW", "uj": "µJ", "uw": "µW", "w": "W", "j": "J", "ms": "ms", "us": "µs",
                "s": "s", "pct": "%", "percent": "%", "c": "°C", "v": "V", "ma": "mA", "a": "A", "hz": "Hz",
                "mhz": "MHz"}


def humanize(key: Any) -> str:
    """``mj_per_inference`` -> ``mJ per inference``; unit tokens get their usual spelling."""
    words = str(key).replace("-", "_").split("_")
    return " ".join(_UNIT_TOKENS.get(w.lower(), w) for w in words if w) or str(key)


# -- plots ------------------------------------------------------------------------------------------
class _Plots:
    """matplotlib when it is there (inline SVG figures), else a note: ``available``, ``reason``."""

    def __init__(self, enabled: bool = True):
        self.available = False
        self.reason = "plots were turned off"
        self.hint = ""
        self.mpl = None
        if not enabled:
            return
        from jei_edge.errors import DependencyError

        try:
            self.mpl = _deps.require("matplotlib", purpose="the plots of the HTML profile")
            from matplotlib.figure import Figure  # noqa: F401  (fails on a broken install)
        except DependencyError as exc:
            self.reason, self.hint = exc.message, exc.hint or ""
            return
        except ImportError as exc:
            self.reason = f"matplotlib could not be imported ({exc})"
            return
        self.available = True

    def figure(self, name: str, draw: Callable[[Any], None], size: Tuple[float, float] = (7.2, 3.6),
               alt: str = "") -> str:
        """``draw(fig)`` on a new figure, returned as an inline ``<figure><svg>``; '' without matplotlib."""
        if not self.available:
            return ""
        from matplotlib.figure import Figure

        rc = {"svg.hashsalt": "jei-edge",  # stable ids: the same profile gives the same page
              "svg.fonttype": "path",  # glyphs as paths: the same look in every browser, no fonts needed
              "font.size": 9.5, "axes.spines.top": False, "axes.spines.right": False,
              "axes.grid": True, "grid.color": "#e5e7eb", "grid.linewidth": 0.8, "axes.axisbelow": True,
              "axes.edgecolor": "#9ca3af", "axes.labelcolor": "#374151", "xtick.color": "#4b5563",
              "ytick.color": "#4b5563", "axes.titlesize": 10.5, "axes.titleweight": "bold",
              "legend.frameon": False, "legend.fontsize": 8.5}
        with self.mpl.rc_context(rc):
            fig = Figure(figsize=size, layout="constrained")
            draw(fig)
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
        svg = buf.getvalue()
        svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE (not allowed inline)
        # ids are per document in HTML: give this figure's (glyphs, clip paths, groups) a prefix of their own
        pre = f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)}-"
        svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{pre}{m.group(1)}"', svg)
        svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{pre}{m.group(1)}"', svg)
        svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{pre}{m.group(1)})", svg)
        # scale with the page: keep the viewBox, drop the fixed size
        svg = re.sub(r'^<svg([^>]*?) width="[^"]*" height="[^"]*"', r"<svg\1", svg, count=1)
        label = f' role="img" aria-label="{esc(alt)}"' if alt else ""
        svg = svg.replace("<svg", f'<svg preserveAspectRatio="xMidYMid meet"{label}', 1)
        return f'<figure class="plot" data-plot="{esc(name)}">{svg}</figure>'


def _mpl_text(s: Any) -> str:
    """Text for matplotlib: '$' would start mathtext."""
    return str(s).replace("$", r"\$")


def _bar_labels(ax, bars, values, fmt_fn=lambda v: f"{v:.2f}") -> None:
    for b, v in zip(bars, values):
        if _finite(v):
            ax.annotate(fmt_fn(v), (b.get_x() + b.get_width() / 2, b.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7.5, color="#374151")


def _batch_axis(ax, sizes: List[int]) -> None:
    if len(set(sizes)) > 1 and min(sizes) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (rows per call)")


def _log_ticks(ax) -> None:
    """Log axis ticks at 1, 2, 5 per decade, written as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v), 2)))


# -- sections ---------------------------------------------------------------------------------------
def _section(sid: str, title: str, lead: str, body: str) -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{lead_html}{body}</section>'


def _header(info: Dict[str, Any]) -> str:
    bundle = str(info.get("bundle", "?"))
    name = Path(bundle).name or bundle
    settings = info.get("settings") or {}
    backend = settings.get("backend", "–")
    facts = [("device", info.get("device", "–")), ("backend", backend), ("stages", fmt(info.get("stages"))),
             ("samples", fmt(info.get("samples"))), ("repeats", fmt(info.get("repeats")))]
    offsets = info.get("offsets")
    facts.append(("offsets", info.get("offsets_used") or (", ".join(fmt(o) for o in offsets) if offsets else "none")))
    chips = "".join(f'<span class="fact">{esc(k)} <b>{esc(v)}</b></span>' for k, v in facts)
    sett = "".join(f'<span class="fact small">{esc(humanize(k))} <b>{esc(v if isinstance(v, str) else fmt(v))}</b>'
                   "</span>" for k, v in settings.items() if k != "backend")
    sett_html = (f'<div class="facts settings" id="backend-settings"><span class="facts-label">backend settings</span>'
                 f"{sett}</div>") if sett else ""
    return (f'<header class="top" id="header"><h1>Early-exit profile · {esc(name)}</h1>'
            f'<div class="path">{esc(bundle)}</div><div class="facts">{chips}</div>{sett_html}</header>')


def _key_numbers(info: Dict[str, Any]) -> str:
    ex = info["exits"]
    batches = info.get("batches") or {}
    th = ex.get("theoretical_speedup")
    # (data-key, label, value, sub-line, class)
    cards = [("theoretical_speedup", "Theoretical speedup", fmt_x(th),
              f"from counted MACs · {fmt_x(ex.get('theoretical_speedup_vs_plain'))} vs plain backbone",
              _speed_cls(th))]

    def best(field):
        vals = {s: b[field] for s, b in batches.items() if _finite(b.get(field))}
        return max(vals, key=vals.get) if vals else None

    s = best("realized_speedup")
    if s is not None:
        v = batches[s]["realized_speedup"]
        cards.append(("best_realized_speedup", "Best realized speedup", fmt_x(v),
                      f"full depth / early exit, at batch {s}", _speed_cls(v)))
    s = best("speedup_vs_plain")
    if s is not None:
        v = batches[s]["speedup_vs_plain"]
        cards.append(("best_speedup_vs_plain", "Best vs plain backbone", fmt_x(v),
                      f"plain one-graph / early exit, at batch {s}", _speed_cls(v)))
    cards.append(("mean_cost", "Mean cost", fmt(ex.get("mean_cost")),
                  f"of the full model's MACs · {fmt(ex.get('mean_cost_vs_plain'))} of the plain backbone", ""))
    acc = info.get("accuracy")
    if acc:
        cards.append(("accuracy", "Accuracy", fmt_pct(acc.get("exit"), 2),
                      f"early exit · {fmt_pct(acc.get('full'), 2)} at full depth", ""))
    cards_html = "".join(f'<div class="card" data-key="{esc(k)}"><div class="label">{esc(lbl)}</div>'
                         f'<div class="value {esc(c)}">{esc(v)}</div><div class="sub">{esc(sub)}</div></div>'
                         for k, lbl, v, sub, c in cards)
    head = [_th("batch size", "rows per call"), _th("theoretical", "speedup, MACs"),
            _th("realized", "speedup, full / exit"), _th("vs plain", "speedup, plain / exit"),
            _th("efficiency", "ideal / exit"), _th("early exit", "ms / sample"), _th("throughput", "samples / s"),
            _th("latency p50", "ms / call"), _th("latency p99", "ms / call")]
    rows = []
    for s, b in batches.items():
        lat = b.get("latency_ms_per_call") or {}
        th = ex.get("theoretical_speedup")
        rows.append([_cell(s, int(s) if str(s).isdigit() else None, key="batch_size"),
                     _cell(fmt_x(th), th, key="theoretical_speedup")]
                    + [_cell(fmt_x(b.get(k)), b.get(k), _speed_cls(b.get(k)), key=k)
                       for k in ("realized_speedup", "speedup_vs_plain")]
                    + [_cell(fmt(b.get(k)), b.get(k), key=k)
                       for k in ("efficiency", "exit_ms_per_sample", "throughput_exit")]
                    + [_cell(fmt(lat.get(k)), lat.get(k), key=f"latency_ms_per_call.{k}") for k in ("p50", "p99")])
    body = f'<div class="cards">{cards_html}</div>' + _table(head, rows, tid="key-numbers-table")
    return _section("key-numbers", "Key numbers",
                    "Green: early exit is faster than the reference; red: slower. Times are medians over the "
                    "timed repeats.", body)


def _stage_section(info: Dict[str, Any], plots: _Plots) -> str:
    batches = info.get("batches") or {}
    n = int(info.get("stages") or 0)
    sizes = list(batches)

    def draw(fig):
        ax = fig.subplots()
        width = 0.8 / max(len(sizes), 1)
        cmap = plots.mpl.colormaps["Blues"]
        for j, s in enumerate(sizes):
            b = batches[s]
            per_row = [1e3 * t / max(int(s), 1) for t in b["stage_ms"]]
            col = cmap(0.35 + 0.6 * (j + 1) / max(len(sizes), 1))
            ax.bar([i + (j - (len(sizes) - 1) / 2) * width for i in range(n)], per_row, width,
                   label=f"batch {s}", color=col)
        ax.set_xticks(range(n))
        ax.set_xticklabels([f"stage {k}" for k in range(n)])
        ax.set_ylabel("µs per row (stage alone, full batch)")
        ax.set_title("Stage latency per row")
        ax.legend(ncols=min(len(sizes), 4))

    fig = plots.figure("stages", draw, (10.0, 3.3), "bar chart of each stage's latency per row by batch size") \
        if sizes and n else ""
    head = [_th("stage")]
    for s in sizes:
        head += [_th(f"batch {s}", "ms / call"), _th(f"batch {s}", "µs / row"), _th(f"batch {s}", "rows reaching")]
    rows = []
    for k in range(n):
        r = [_cell(str(k), k)]
        for s in sizes:
            b = batches[s]
            t = b["stage_ms"][k] if k < len(b.get("stage_ms", [])) else None
            reach = b.get("reach_total", [])
            rt = reach[k] if k < len(reach) else None
            r += [_cell(fmt(t), t), _cell(fmt(1e3 * t / max(int(s), 1)) if _finite(t) else "–",
                                          1e3 * t / max(int(s), 1) if _finite(t) else None),
                  _cell(fmt(rt), rt)]
        rows.append(r)
    body = fig + _table(head, rows, tid="stage-table")
    return _section("stages", "Stage latency",
                    "Each stage run alone on a full batch (its buffers primed), and how many rows reached it over "
                    "all batches. Per row, the bars compare batch sizes directly.", body)


def _exits_section(info: Dict[str, Any], plots: _Plots) -> str:
    ex = info["exits"]
    hist = list(ex.get("histogram") or [])
    frac = list(ex.get("fraction") or [])
    cost = list(ex.get("cost") or [])
    cost_p = list(ex.get("cost_vs_plain") or [])
    idx = list(range(len(hist)))

    def draw(fig):
        ax = fig.subplots()
        bars = ax.bar(idx, [100 * f for f in frac], color=COLORS["hist"], width=0.6, label="samples exiting")
        _bar_labels(ax, bars, [100 * f for f in frac], lambda v: f"{v:.1f}%")
        ax.set_xticks(idx)
        ax.set_xticklabels([f"exit {i}" for i in idx])
        ax.set_ylabel("% of samples")
        ax.set_ylim(0, max([100 * f for f in frac] + [1]) * 1.18)
        twin = ax.twinx()
        twin.plot(idx, cost, "o-", color=COLORS["cost"], label="cost of the exit", linewidth=1.8)
        twin.set_ylim(0, 1.08)
        twin.set_ylabel("cost (fraction of full-model MACs)")
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        mc = ex.get("mean_cost")
        if _finite(mc):
            twin.axhline(mc, color=COLORS["cost"], linestyle=":", linewidth=1.2, label=f"mean cost {mc:.3f}")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        # under the axes: tall bars never hide behind it
        ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=3)
        ax.set_title("Where samples exit")

    fig = plots.figure("exits", draw, (6.0, 3.4), "exit histogram with each exit's cost") if hist else ""
    head = [_th("exit"), _th("samples", "count"), _th("share", "% of samples"), _th("cost", "of full-model MACs"),
            _th("cost", "of plain backbone")]
    rows = []
    for i in idx:
        f = frac[i] if i < len(frac) else None
        c = cost[i] if i < len(cost) else None
        cp = cost_p[i] if i < len(cost_p) else None
        rows.append([_cell(str(i), i), _cell(fmt(hist[i]), hist[i]), _cell(fmt_pct(f), f), _cell(fmt(c), c),
                     _cell(fmt(cp), cp)])
    total = sum(h for h in hist if _finite(h))
    rows.append([_cell("mean", cls="text"), _cell(fmt(total), total), _cell(""),
                 _cell(fmt(ex.get("mean_cost")), ex.get("mean_cost")),
                 _cell(fmt(ex.get("mean_cost_vs_plain")), ex.get("mean_cost_vs_plain"))])
    body = f'<div class="grid2">{fig or ""}<div>' + _table(head, rows, tid="exit-table") + "</div></div>" \
        if fig else _table(head, rows, tid="exit-table")
    return _section("exits", "Exits",
                    f"Where the {esc(fmt(info.get('samples')))} samples left the network, and what each exit costs. "
                    f"Theoretical speedup = 1 / mean cost = {esc(fmt_x(ex.get('theoretical_speedup')))}.", body)


def _timing_section(info: Dict[str, Any], plots: _Plots) -> str:
    batches = info.get("batches") or {}
    sizes = list(batches)
    nums = [int(s) for s in sizes] if all(str(s).isdigit() for s in sizes) else list(range(1, len(sizes) + 1))
    has_plain = any("plain_ms_per_sample" in b for b in batches.values())
    modes = [("exit", "early exit"), ("full", "full depth")] + ([("plain", "plain backbone")] if has_plain else [])

    def series(key):
        return [batches[s].get(key, float("nan")) for s in sizes]

    def draw(fig):
        a1, a2 = fig.subplots(1, 2)
        for m, label in modes:
            a1.plot(nums, series(f"{m}_ms_per_sample"), "o-", color=COLORS[m], label=label, linewidth=1.8)
        a1.plot(nums, series("ideal_ms_per_sample"), "o--", color=COLORS["ideal"], label="ideal (stages alone)",
                linewidth=1.2, markersize=4)
        a1.set_yscale("log")
        _log_ticks(a1)
        a1.set_ylabel("ms per sample (log)")
        a1.set_title("Time per sample (lower is better)")
        _batch_axis(a1, nums)
        a1.legend()
        for m, label in modes:
            a2.plot(nums, series(f"throughput_{m}"), "o-", color=COLORS[m], label=label, linewidth=1.8)
        a2.set_yscale("log")
        _log_ticks(a2)
        a2.set_ylabel("samples per second (log)")
        a2.set_title("Throughput (higher is better)")
        _batch_axis(a2, nums)
        a2.legend()

    fig = plots.figure("timing", draw, (10.0, 3.6), "time per sample and throughput by batch size") \
        if sizes else ""
    head = [_th("batch size", "rows per call"), _th("early exit", "ms / sample"), _th("full depth", "ms / sample"),
            _th("plain", "ms / sample"), _th("ideal", "ms / sample"), _th("early exit", "samples / s"),
            _th("full depth", "samples / s"), _th("plain", "samples / s"), _th("p50 / p90 / p99 / max", "ms / call"),
            _th("overhead", "µs / boundary"), _th("calls", "batches timed")]
    rows = []
    for s, b in batches.items():
        lat = b.get("latency_ms_per_call") or {}
        pct = " / ".join(fmt(lat.get(k)) for k in ("p50", "p90", "p99", "max"))
        rows.append([_cell(s, int(s) if str(s).isdigit() else None),
                     *[_cell(fmt(b.get(k)), b.get(k)) for k in ("exit_ms_per_sample", "full_ms_per_sample",
                                                               "plain_ms_per_sample", "ideal_ms_per_sample",
                                                               "throughput_exit", "throughput_full",
                                                               "throughput_plain")],
                     _cell(pct), _cell(fmt(b.get("overhead_us_per_boundary")), b.get("overhead_us_per_boundary")),
                     _cell(fmt(b.get("batches")), b.get("batches"))])
    body = fig + _table(head, rows, tid="timing-table")
    return _section("timing", "Latency and throughput",
                    "Time per sample and samples per second by batch size: early exit, full depth, the plain "
                    "one-graph backbone, and the ideal (the same stage runs back to back, no decisions or "
                    "compaction).", body)


def _speedup_section(info: Dict[str, Any], plots: _Plots) -> str:
    ex = info["exits"]
    batches = info.get("batches") or {}
    sizes = list(batches)
    groups = [("theoretical (MACs)", "theoretical", lambda b: ex.get("theoretical_speedup")),
              ("realized (full / exit)", "realized", lambda b: b.get("realized_speedup")),
              ("vs plain backbone", "vs_plain", lambda b: b.get("speedup_vs_plain"))]

    def draw(fig):
        ax = fig.subplots()
        width = 0.8 / len(groups)
        top = 1.0
        for j, (name, key, get) in enumerate(groups):
            vals = [get(batches[s]) for s in sizes]
            vals = [v if _finite(v) else float("nan") for v in vals]
            xs = [i + (j - 1) * width for i in range(len(sizes))]
            bars = ax.bar(xs, vals, width, label=name, color=COLORS[key])
            _bar_labels(ax, bars, vals, lambda v: f"{v:.2f}×")
            for xv, v in zip(xs, vals):
                if not _finite(v):  # e.g. no plain backbone timed: say so rather than leave a gap
                    ax.annotate("n/a", (xv, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                                va="bottom", fontsize=7.5, color="#9ca3af", annotation_clip=False)
            top = max([top] + [v for v in vals if _finite(v)])
        ax.axhline(1.0, color="#111827", linewidth=0.9)
        ax.set_ylim(0, 1.38 * top)
        ax.set_xlim(-0.6, len(sizes) - 0.4)  # room for every group, also one without a bar
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"batch {s}\nefficiency {fmt(batches[s].get('efficiency'))}" for s in sizes])
        ax.set_ylabel("speedup (×), above 1 = faster")
        ax.set_title("Speedup of early exit by batch size")
        ax.legend(ncols=3, loc="upper center")

    fig = plots.figure("speedups", draw, (6.0, 3.5), "theoretical, realized and vs-plain speedups by batch size") \
        if sizes else ""
    head = [_th("batch size", "rows per call"), _th("theoretical", "×, from MACs"), _th("realized", "×, full / exit"),
            _th("vs plain", "×, plain / exit"), _th("efficiency", "ideal / exit")]
    rows = [[_cell(s, int(s) if str(s).isdigit() else None),
             _cell(fmt_x(ex.get("theoretical_speedup")), ex.get("theoretical_speedup")),
             _cell(fmt_x(b.get("realized_speedup")), b.get("realized_speedup"), _speed_cls(b.get("realized_speedup"))),
             _cell(fmt_x(b.get("speedup_vs_plain")), b.get("speedup_vs_plain"), _speed_cls(b.get("speedup_vs_plain"))),
             _cell(fmt(b.get("efficiency")), b.get("efficiency"))] for s, b in batches.items()]
    body = (f'<div class="grid2">{fig}<div>' + _table(head, rows, tid="speedup-table") + "</div></div>") if fig \
        else _table(head, rows, tid="speedup-table")
    return _section("speedups", "Speedups",
                    "What counted MACs promise (theoretical) against what the clock shows (realized, and against "
                    "the plain backbone). Efficiency near 1 means the runtime's own work is nearly free.", body)


def _settings_section(info: Dict[str, Any]) -> str:
    """Other backend settings timed side by side with the profiled ones (``--compare-settings``)."""
    batches = info.get("batches") or {}
    labels = list(info.get("compare_settings") or {})
    head = [_th("settings"), *(_th(f"batch {s}", "ms / sample · speedup [95% CI]") for s in batches)]
    rows = [[_cell("current (profiled above)")] + [_cell(fmt(b.get("exit_ms_per_sample")), b.get("exit_ms_per_sample"))
                                                  for b in batches.values()]]
    for label in labels:
        row = [_cell(label)]
        for b in batches.values():
            c = (b.get("compare") or {}).get(label) or {}
            ci = c.get("speedup_ci")
            text = f"{fmt(c.get('ms_per_sample'))} · {fmt_x(c.get('speedup'))}" + \
                (f" {format_interval(ci, 2)}" if ci else "") + ("" if c.get("same_exits", True) else " (exits differ)")
            cls = {"faster": "good", "slower": "bad"}.get(ratio_verdict(ci), "") if ci else ""
            row.append(_cell(text, c.get("speedup"), cls))
        rows.append(row)
    best = info.get("best_settings") or {}
    picks = "; ".join(f"batch {s}: {esc(v['label'])}" + (f" ({v['speedup']:.2f}x)" if v["label"] != "current" else "")
                      for s, v in best.items())
    return _section("settings", "Backend settings compared",
                    "Each setting's early-exit pass timed next to the profiled one in every repeat, on the same "
                    "batches (speedup > 1: faster than the current settings). Fastest, where its whole interval "
                    f"is above 1: {picks or '-'}.", _table(head, rows, tid="settings-table"))


def _energy_section(energy: Dict[str, Any], plots: _Plots) -> str:
    dicts = [(k, v) for k, v in energy.items() if isinstance(v, dict)]
    # a dict with a number in it is a measured row (exit, full, plain, ...); one without (e.g. the
    # board's name and rail) and any other value (e.g. a note) is shown as text under the table
    modes = [(k, d) for k, d in dicts if any(_finite(v) for v in d.values())]
    infos = [(k, d) for k, d in dicts if (k, d) not in modes]
    notes = [(k, v) for k, v in energy.items() if not isinstance(v, dict)]
    metrics: List[str] = []
    for _, d in modes:
        for key in d:
            if key not in metrics:
                metrics.append(key)
    numeric = [m for m in metrics if any(_finite(d.get(m)) for _, d in modes)]
    plotted = numeric[:6]
    modes_d = dict(modes)

    def draw(fig):
        axes = fig.subplots(1, len(plotted), squeeze=False)[0]
        for ax, m in zip(axes, plotted):
            names = [k for k, d in modes if _finite(d.get(m))]
            vals = [float(modes_d[k][m]) for k in names]
            cols = [COLORS.get(k, _SERIES[i % len(_SERIES)]) for i, k in enumerate(names)]
            bars = ax.bar(range(len(names)), vals, color=cols, width=0.62)
            _bar_labels(ax, bars, vals, lambda v: fmt(float(v)))
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([_mpl_text(n) for n in names])
            ax.set_title(_mpl_text(humanize(m)))
            lo, hi = min(vals + [0.0]), max(vals + [0.0])
            ax.set_ylim(lo * 1.18, (hi * 1.18) or 1.0)
            ax.grid(axis="x", visible=False)

    fig = plots.figure("energy", draw, (min(3.2 * max(len(plotted), 1) + 0.4, 10.0), 2.5),
                       "energy and power by pass") if plotted else ""
    head = [_th("pass", cls="text")] + [_th(humanize(m), cls="" if m in numeric else "text") for m in metrics]
    rows = []
    for k, d in modes:
        rows.append([_cell(humanize(k), cls="text")] +
                    [_cell(fmt(d.get(m)), d.get(m), "" if m in numeric else "text") for m in metrics])
    # early exit against the references, metric by metric (below 1: early exit uses less)
    for ref in ("full", "plain"):
        if "exit" in modes_d and ref in modes_d:
            ratios = []
            for m in metrics:
                e, r = modes_d["exit"].get(m), modes_d[ref].get(m)
                ratios.append(e / r if _finite(e) and _finite(r) and r != 0 else None)
            if any(v is not None for v in ratios):
                rows.append([_cell(f"exit / {ref}", cls="text ratio")] +
                            [_cell(f"{v:.2f}×" if v is not None else "–", v, "ratio") for v in ratios])
    table = _table(head, rows, tid="energy-table") if modes else ""
    extra = [(humanize(k), " · ".join(f"{humanize(kk)} {vv if isinstance(vv, str) else fmt(vv)}"
                                      for kk, vv in d.items())) for k, d in infos]
    extra += [(humanize(k), v if isinstance(v, str) else fmt(v)) for k, v in notes]
    note_html = "".join(f'<p class="lead energy-note"><b>{esc(k)}:</b> {esc(v)}</p>' for k, v in extra)
    return _section("energy", "Energy", "Energy and power per pass, as measured on the device; the ratio rows "
                    "compare early exit with each reference (below 1: early exit uses less).",
                    fig + table + note_html)


def _curve_section(curve: Dict[str, Any], plots: _Plots) -> str:
    lines = [(k, v) for k, v in curve.items()
             if isinstance(v, dict) and isinstance(v.get("cost"), (list, tuple)) and isinstance(v.get("accuracy"),
                                                                                                (list, tuple))]
    chosen = curve.get("chosen") if isinstance(curve.get("chosen"), dict) else None
    accs = [a for _, v in lines for a in v["accuracy"] if _finite(a)]
    if chosen and _finite(chosen.get("accuracy")):
        accs.append(chosen["accuracy"])
    scale = 100.0 if accs and max(accs) <= 1.0 else 1.0  # fractions are shown as percentages

    def draw(fig):
        ax = fig.subplots()
        for i, (k, v) in enumerate(lines):
            col = COLORS["exit"] if k == "jei" else (COLORS["baseline"] if k == "baseline" else _SERIES[(i + 2) % 8])
            pts = sorted((c, a) for c, a in zip(v["cost"], v["accuracy"]) if _finite(c) and _finite(a))
            ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], marker="o" if len(pts) < 30 else None, color=col,
                    label=_mpl_text("early exit (jei)" if k == "jei" else k), linewidth=1.8, markersize=3.5,
                    linestyle="--" if k == "baseline" else "-")
        if chosen and _finite(chosen.get("cost")) and _finite(chosen.get("accuracy")):
            ax.plot([chosen["cost"]], [scale * chosen["accuracy"]], marker="*", markersize=15, color="#dc2626",
                    linestyle="none", label="chosen", zorder=5)
            ax.annotate(f"cost {chosen['cost']:.3f}, {scale * chosen['accuracy']:.2f}{'%' if scale == 100 else ''}",
                        (chosen["cost"], scale * chosen["accuracy"]), xytext=(9, -15), textcoords="offset points",
                        fontsize=8, color="#dc2626", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none",
                                                           "alpha": 0.9})
        ax.set_xlabel("cost (fraction of full-model MACs)")
        ax.set_ylabel("accuracy (%)" if scale == 100 else "accuracy")
        ax.set_title("Accuracy vs cost")
        ax.legend(loc="lower right")

    fig = plots.figure("curve", draw, (6.0, 3.6), "accuracy against cost") if lines or chosen else ""
    head = [_th("curve", cls="text"), _th("points"), _th("cost", "lowest"), _th("cost", "highest"),
            _th("accuracy", "best")]
    rows = []

    def acc_text(a):
        return fmt_pct(a, 2) if scale == 100 else fmt(a)

    for k, v in lines:
        cs = [c for c in v["cost"] if _finite(c)]
        aa = [a for a in v["accuracy"] if _finite(a)]
        rows.append([_cell(k, cls="text"), _cell(fmt(len(v["cost"])), len(v["cost"])),
                     _cell(fmt(min(cs)) if cs else "–", min(cs) if cs else None),
                     _cell(fmt(max(cs)) if cs else "–", max(cs) if cs else None),
                     _cell(acc_text(max(aa)) if aa else "–", max(aa) if aa else None)])
    if chosen:
        rows.append([_cell("chosen", cls="text"), _cell("1", 1), _cell(fmt(chosen.get("cost")), chosen.get("cost")),
                     _cell(fmt(chosen.get("cost")), chosen.get("cost")),
                     _cell(acc_text(chosen.get("accuracy")), chosen.get("accuracy"))])
    grid = (f'<div class="grid2">{fig}<div>' + _table(head, rows, tid="curve-table") + "</div></div>") if fig \
        else _table(head, rows, tid="curve-table")
    return _section("curve", "Accuracy and cost",
                    "Accuracy against mean cost as the exit thresholds move, with the operating point chosen.", grid)


def _definitions() -> str:
    items = [("theoretical speedup", "full-model MACs / mean MACs spent per sample (from the exit histogram and the "
                                     "bundle's MAC costs); vs plain: against the plain backbone's MACs."),
             ("realized speedup", "full-depth time / early-exit time, median of per-repeat ratios."),
             ("vs plain", "plain one-graph backbone time / early-exit time."),
             ("efficiency", "ideal time (the same stage runs back to back) / early-exit time; 1.0 means the "
                            "runtime's decisions and compaction cost nothing."),
             ("overhead", "(early-exit time − ideal time) per exit boundary crossed."),
             ("stage latency", "one stage alone on a full batch, median of repeated runs.")]
    body = '<dl class="defs">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"
    return _section("definitions", "Definitions", "", body)


def render_html(info: Dict[str, Any], energy: Optional[Dict[str, Any]] = None,
                curve: Optional[Dict[str, Any]] = None, *, plots: bool = True) -> str:
    """The profile page as a string (see ``write_html``); ``plots=False``: tables only."""
    p = _Plots(plots)
    name = Path(str(info.get("bundle", "profile"))).name
    parts = [_header(info)]
    if not p.available and plots:
        how = f" (<code>{esc(p.hint)}</code>)" if p.hint else ""
        parts.append(f'<div class="note" id="no-plots"><b>No plots:</b> they need matplotlib{how}; this page has '
                     f'the tables only.<br><small>{esc(p.reason)}</small></div>')
    parts += [_key_numbers(info), _stage_section(info, p), _exits_section(info, p), _timing_section(info, p),
              _speedup_section(info, p)]
    if info.get("compare_settings"):
        parts.append(_settings_section(info))
    if energy is not None:
        parts.append(_energy_section(energy, p))
    if curve is not None:
        parts.append(_curve_section(curve, p))
    parts.append(_definitions())
    try:
        from jei_edge import __version__ as version
    except ImportError:  # pragma: no cover
        version = "?"
    footer = f"<footer>jei-edge {esc(version)} · self-contained page: no scripts, no network</footer>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Profile · {esc(name)} on {esc(info.get('device', '?'))}</title>"
            f"<style>{_CSS}</style></head><body><main>" + "\n".join(parts) + footer + "</main></body></html>\n")


def write_html(info: Dict[str, Any], path, energy: Optional[Dict[str, Any]] = None,
               curve: Optional[Dict[str, Any]] = None) -> Path:
    """Write the self-contained HTML page of a ``profile_bundle`` result to ``path`` (atomically).

    Args:
        info: the profile dict (``profile_bundle``, or ``profile.json`` read back).
        energy: optional ``{"exit": {"mj_per_inference": .., "mean_mw": .., ...}, "full": {..}, ...,
            "note": ".."}``: each dict value is a row of a table and a bar in one chart per metric;
            other values are shown as notes.
        curve: optional ``{"jei": {"cost": [..], "accuracy": [..]}, "baseline": {..},
            "chosen": {"cost": .., "accuracy": ..}}``: a line per curve, a star at the chosen point.

    Plots need matplotlib (the ``plots`` extra); without it the page has the tables and says so.
    """
    data = render_html(info, energy, curve).encode("utf-8")
    path = Path(path)
    atomic_write_bytes(path, lambda f: f.write(data))
    return path
