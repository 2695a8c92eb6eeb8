"""Tiny models with spread-out exits and bundles built from them (shared by tests/compile and tests/runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PREP_1CH = {"input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}
KWARGS = {
    "vit": {"num_classes": 5, "in_chans": 1, "img_size": 8, "patch": 4, "embed_dim": 16, "depth": 4, "heads": 2},
    "resnet": {"num_classes": 5, "in_chans": 1, "img_size": 8, "widths": [4, 8], "blocks_per_stage": [2, 1]},
}
ALPHAS = [0.05, 0.1]


def spread_model(family: str = "vit", seed: int = 0, quantiles=(0.8, 0.7, 0.6)):
    """An untrained JEIModel whose gates fire on a spread of inputs.

    The IMs are sharpened (logits x 8) so p_max varies between inputs; gate l is
    ``sigmoid(w (p_max - q_l))`` with ``q_l`` a quantile of p_max at exit l on random inputs.
    """
    import torch

    from jei_edge.model.jei import build_model, confidence_gates

    torch.manual_seed(seed)
    model = build_model({"backbone": family, "backbone_kwargs": dict(KWARGS[family]), "exits": None})
    return confidence_gates(model, torch.randn((512,) + tuple(model.input_shape)), quantiles)


def spread_checkpoint(family: str = "vit", seed: int = 0, calibrated: bool = True) -> dict:
    from jei_edge.model.checkpoint import make_checkpoint

    model = spread_model(family, seed)
    calib = None
    if calibrated:
        qh = [[0.9 - 0.02 * l, 0.8 - 0.02 * l] for l in range(model.num_exits)]
        calib = {"alphas": ALPHAS, "qhat": qh, "split_size": 100}
    return make_checkpoint(model, calibration=calib, class_names=[f"c{i}" for i in range(model.num_classes)],
                           preprocessing=dict(PREP_1CH))


def save_spread(path: Path, family: str = "vit", **kw) -> Path:
    from jei_edge.model.checkpoint import save_checkpoint

    return save_checkpoint(path, checkpoint=spread_checkpoint(family, **kw))


def build_spread_bundle(tmp: Path, family: str = "vit", parity_samples: int = 2000, **opts) -> Path:
    from jei_edge.compile import BuildOptions, build_bundle

    ckpt = save_spread(tmp / f"{family}.pt", family)
    out = tmp / f"{family}.jei"
    build_bundle(ckpt, out, BuildOptions(parity_samples=parity_samples, stage_samples=128, **opts))
    return out


def spinning_entries(session_options) -> tuple:
    """``(intra-op allow_spinning, force_spinning_stop)`` as an onnxruntime ``SessionOptions`` holds them."""
    return tuple(session_options.get_session_config_entry(f"session.{k}")
                 for k in ("intra_op.allow_spinning", "force_spinning_stop"))


def model_inputs(n: int, seed: int = 0, shape=(1, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n,) + tuple(shape)).astype(np.float32)


def reference(model, x: np.ndarray, offsets=None):
    """PyTorch model + numpy exit rule: ``(levels [N], probs at exit [N, C], all probs [N, E, C])``."""
    import torch

    from jei_edge.exit_rule import exit_levels

    with torch.no_grad():
        logits, gl = model(torch.from_numpy(x))
        g = torch.sigmoid(gl).numpy()
        probs = torch.softmax(logits.float(), dim=-1).numpy()
    levels = exit_levels(g, offsets)
    return levels, probs[np.arange(len(x)), levels], probs


def rehash(bundle: Path, exclude=frozenset()) -> None:
    """Rewrite the manifest's file table after a deliberate edit (to test the checks below sha256)."""
    import json

    from jei_edge.bundle import MANIFEST, sha256_file

    m = json.loads((bundle / MANIFEST).read_text())
    files = {}
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in exclude:
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    m["files"] = files
    (bundle / MANIFEST).write_text(json.dumps(m))


def has_cuda_driver() -> bool:
    """True when a CUDA driver initialises here (tests of the "no driver" errors skip then)."""
    try:
        from cuda.bindings import driver as cu

        return cu.cuInit(0)[0] == cu.CUresult.CUDA_SUCCESS
    except Exception:
        return False


def cli_blocked(*args, block=("torch", "onnxruntime", "onnx"), timeout: int = 600):
    """``jei-edge ARGS`` in a child process with the modules ``block`` unimportable (a bare board)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block) +
            "from jei_edge.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=timeout)
