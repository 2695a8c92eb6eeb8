"""Profiling of compiled bundles (torch-free): timed passes with the definitions of docs/architecture.md, and reports.

``profile_bundle(rt, x)`` measures a loaded ``Runtime``; ``format_profile``, ``write_json`` and
``plot_profile`` turn the result into a table, a JSON file and a PNG, ``write_html`` into one
self-contained HTML page; ``measure_energy`` adds energy per inference on Jetson boards
(``power.PowerSampler``: tegrastats or jtop). ``jei-edge profile`` is the
command line. The timing protocol (``Passes``, ``interleaved``, ``median``, ``median_ratio``,
``median_ci``, ``median_time``, ``Breakdown``) is what ``benchmarks/`` uses too.
"""

from jei_edge.profile.html import write_html
from jei_edge.profile.measure import (Breakdown, Passes, format_interval, interleaved, measure_energy, median, median_ci,
                                      median_ratio, median_time, profile_bundle, ratio_verdict, ratios, settings_record,
                                      theoretical_speedup)
from jei_edge.profile.report import format_profile, plot_profile, write_json

__all__ = ["Breakdown", "Passes", "format_interval", "interleaved", "measure_energy", "median", "median_ci",
           "median_ratio", "median_time", "ratio_verdict", "ratios", "profile_bundle", "settings_record",
           "theoretical_speedup", "format_profile", "plot_profile", "write_html", "write_json"]
