"""A synthetic image-classification set with controllable, per-sample difficulty.

Each class has a smooth prototype pattern (a few Gaussian blobs of random sign). A sample is its
class prototype, randomly shifted, blended with the prototype of a random *other* class and
covered in pixel noise, both scaled by a per-sample difficulty ``d ~ U(0, 1)``::

    x = 0.5 + contrast * ((1 - hard*d) * P_y + hard*d * P_z) + noise*d * N(0, 1),   clipped to [0, 1]

Samples with small ``d`` are clean (an early exit gets them right), those with ``d`` near 1 are
noisy and ambiguous and need the deeper blocks, so exits spread over depth. Options
(``synthetic:key=value,...``)::

    n=4000 classes=10 size=16 channels=1 hard=0.3 noise=0.25 contrast=0.25 shift=2 blobs=4 seed=0
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, Tuple

import numpy as np

from jei_edge.errors import InputError


@dataclass(frozen=True)
class SyntheticSpec:
    n: int = 4000
    classes: int = 10
    size: int = 16
    channels: int = 1
    hard: float = 0.3
    noise: float = 0.25
    contrast: float = 0.25
    shift: int = 2
    blobs: int = 4
    seed: int = 0

    def validate(self) -> "SyntheticSpec":
        problems = []
        if self.n < 4 * self.classes:
            problems.append(f"n={self.n} must be >= 4 x classes ({4 * self.classes})")
        if self.classes < 2:
            problems.append("classes must be >= 2")
        if self.size < 4:
            problems.append("size must be >= 4")
        if self.channels not in (1, 3):
            problems.append("channels must be 1 or 3")
        if not 0.0 <= self.hard < 1.0:
            problems.append("hard must be in [0, 1)")
        if self.noise < 0 or self.contrast <= 0 or self.shift < 0 or self.blobs < 1:
            problems.append("noise >= 0, contrast > 0, shift >= 0 and blobs >= 1 are required")
        if problems:
            raise InputError("bad synthetic data options: " + "; ".join(problems),
                             hint="e.g. --data synthetic:n=4000,hard=0.45")
        return self


def parse_synthetic(options: str) -> SyntheticSpec:
    """``"n=2000,hard=0.3"`` -> SyntheticSpec (unknown keys and bad values are InputErrors)."""
    kinds = {f.name: f.type for f in fields(SyntheticSpec)}
    values: Dict[str, object] = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or key not in kinds:
            raise InputError(f"bad synthetic option '{item}'",
                             hint=f"use key=value with keys {', '.join(kinds)}")
        try:
            values[key] = float(val) if kinds[key] in (float, "float") else int(val)
        except ValueError as exc:
            raise InputError(f"synthetic option {key}={val!r} is not a number") from exc
    return replace(SyntheticSpec(), **values).validate()


def _prototypes(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """``[classes, C, size, size]`` zero-mean prototypes with max |value| = 1."""
    s = spec.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    protos = np.zeros((spec.classes, spec.channels, s, s))
    for k in range(spec.classes):
        for c in range(spec.channels):
            for _ in range(spec.blobs):
                cy, cx = rng.uniform(0.15 * s, 0.85 * s, size=2)
                sigma = rng.uniform(0.08 * s, 0.2 * s)
                sign = rng.choice([-1.0, 1.0])
                protos[k, c] += sign * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
        protos[k] -= protos[k].mean()
        protos[k] /= max(np.abs(protos[k]).max(), 1e-6)
    return protos


def make_synthetic(spec: SyntheticSpec) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``(x01 [n, C, size, size] float32, y [n] int64, difficulty [n] float32)``, deterministic in seed."""
    rng = np.random.default_rng(spec.seed)
    protos = _prototypes(spec, rng)
    n = spec.n
    y = np.arange(n) % spec.classes
    rng.shuffle(y)
    other = (y + rng.integers(1, spec.classes, size=n)) % spec.classes
    d = rng.uniform(0.0, 1.0, size=n)
    h = spec.hard * d
    sig = (1.0 - h)[:, None, None, None] * protos[y] + h[:, None, None, None] * protos[other]
    if spec.shift:
        dy = rng.integers(-spec.shift, spec.shift + 1, size=n)
        dx = rng.integers(-spec.shift, spec.shift + 1, size=n)
        for i in range(n):
            sig[i] = np.roll(sig[i], (dy[i], dx[i]), axis=(1, 2))
    noise = (spec.noise * d)[:, None, None, None] * rng.standard_normal(sig.shape)
    x = 0.5 + spec.contrast * sig + noise
    return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64), d.astype(np.float32)
