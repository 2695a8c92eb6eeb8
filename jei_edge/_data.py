"""Where the shipped data files live: ``targets/`` and ``calibration/`` (TOML).

In a source checkout (and an editable install) they are the top-level folders of the repository;
in an installed wheel, setup.py maps them to ``jei_edge/targets/`` and ``jei_edge/calibration/``.
``data_dir(kind)`` finds whichever exists, so names like ``--target cpu`` resolve in both.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("targets", "calibration")
_PACKAGE = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """The folder holding the shipped ``kind`` files (``targets`` or ``calibration``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}")
    for cand in (_PACKAGE / kind, _PACKAGE.parent / kind):
        if cand.is_dir():
            return cand
    return _PACKAGE / kind  # missing: callers list it as empty and say so


def is_file_name(name_or_path: str) -> bool:
    """Whether a ``--target`` / ``--calibration`` value names a user's ``.toml`` file rather than a
    shipped one (a ``.toml`` suffix or a path separator)."""
    return name_or_path.lower().endswith(".toml") or "/" in name_or_path or "\\" in name_or_path
