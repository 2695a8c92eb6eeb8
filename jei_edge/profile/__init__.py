"""Profiling of compiled bundles (torch-free): timed passes with DESIGN.md's definitions and reports.

``profile_bundle(rt, x)`` measures a loaded ``Runtime``; ``format_profile``, ``write_json`` and
``plot_profile`` turn the result into a table, a JSON file and a PNG. ``jei-edge profile`` is the
command line.
"""

from jei_edge.profile.measure import Passes, profile_bundle
from jei_edge.profile.report import format_profile, plot_profile, write_json

__all__ = ["Passes", "profile_bundle", "format_profile", "plot_profile", "write_json"]
