"""GPU test fixtures: everything here needs a CUDA driver + GPU (and torch with CUDA for the
executor tests); without them every test in this folder skips cleanly.

``KernelHarness`` runs the exit kernel alone on numpy inputs: it uploads them, poisons every
output buffer (0xFF / 0xAB bytes) before each launch, and downloads everything afterwards so tests
can check each element, including the ones the kernel must leave untouched.
"""

from __future__ import annotations

import numpy as np
import pytest

POISON = 0xAB


def _driver_or_reason():
    try:
        from jei_edge.runtime.cuda.driver import CudaDriver

        return CudaDriver.get(0), None
    except Exception as exc:  # CudaUnavailableError, DependencyError
        return None, str(exc)


@pytest.fixture(scope="session")
def cuda_driver():
    drv, why = _driver_or_reason()
    if drv is None:
        pytest.skip(f"no usable CUDA GPU: {why}")
    return drv


@pytest.fixture(scope="session")
def torch_cuda(cuda_driver):
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA support on this machine")
    return torch


@pytest.fixture(scope="session")
def exit_kernel(cuda_driver, tmp_path_factory):
    from jei_edge.runtime.cuda.kernel import ExitKernel

    return ExitKernel(cuda_driver, cache_dir=tmp_path_factory.mktemp("nvrtc"))


class KernelHarness:
    """Device buffers for up to ``max_rows`` rows / ``max_slots`` output slots / ``max_row_bytes`` /
    ``max_exits`` exits per stage (merged stages: gates ``[n, G]``, probs ``[n, E, C]``)."""

    def __init__(self, driver, kernel, max_rows, max_slots, max_classes, max_row_bytes, max_grid=1024, max_exits=1):
        from jei_edge.runtime.cuda.kernel import KernelLauncher
        from jei_edge.runtime.cuda.memory import DeviceBuffer, HostBuffer

        self.d = driver
        self.stream = driver.stream_create()
        self.ev = driver.event_create()
        self.launcher = KernelLauncher(kernel, max_grid=max_grid)
        pad = 16  # room to offset pointers for misaligned cases
        mk = lambda nbytes, name: DeviceBuffer(driver, (nbytes + pad,), np.uint8, stream=self.stream, name=name)
        self.buf = {
            "gate": mk(max_rows * max_exits * 4, "gate"), "s_in": mk(max_rows * 8, "s_in"), "idx_in": mk(max_rows * 4, "idx_in"),
            "probs": mk(max_rows * max_exits * max_classes * 4, "probs"), "hidden_in": mk(max_rows * max_row_bytes, "hidden_in"),
            "s_out": mk(max_rows * 8, "s_out"), "idx_out": mk(max_rows * 4, "idx_out"),
            "hidden_out": mk(max_rows * max_row_bytes, "hidden_out"),
            "out_probs": mk(max_slots * max_classes * 4, "out_probs"), "out_class": mk(max_slots * 4, "out_class"),
            "out_conf": mk(max_slots * 4, "out_conf"), "out_exit": mk(max_slots * 4, "out_exit"),
        }
        self.host = HostBuffer(driver, (max(b.nbytes for b in self.buf.values()),), np.uint8)
        self.count = HostBuffer(driver, (1,), np.int32, mapped=True)

    def _put(self, name, arr, offset=0):
        raw = np.ascontiguousarray(arr).view(np.uint8).ravel()
        self.host.array[: raw.size] = raw
        self.d.memcpy_htod_async(self.buf[name].ptr + offset, self.host.ptr, raw.size, self.stream)
        self.d.stream_synchronize(self.stream)

    def _get(self, name, nbytes, offset=0):
        self.d.memcpy_dtoh_async(self.host.ptr, self.buf[name].ptr + offset, nbytes, self.stream)
        self.d.stream_synchronize(self.stream)
        return self.host.array[:nbytes].copy()

    def run(self, *, gate, s, idx, probs, hidden, slots, mode=0, delta=0.0, exit_index=0, offset=0,
            final_head=False):
        """Poison outputs, launch once, return every output (bytes beyond the written part included).

        ``gate`` ``[n]`` and ``probs`` ``[n, C]`` for a one-exit stage, ``[n, G]`` / ``[n, E, C]`` for a
        merged one; ``delta`` a float (every gate) or one per gate; ``exit_index`` the stage's first exit."""
        n, C = probs.shape[0], probs.shape[-1]
        E = probs.shape[1] if probs.ndim == 3 else 1
        G = gate.shape[1] if gate.ndim == 2 else 1
        deltas = tuple(delta) if np.ndim(delta) else (float(delta),) * G
        row_bytes = hidden.shape[1] if hidden is not None else 0
        for name, b in self.buf.items():
            self.d.memset_async(b.ptr, 0xFF if name.startswith("out") or name in ("s_out", "idx_out") else POISON,
                                b.nbytes, self.stream)
        self._put("gate", gate.astype(np.float32))
        self._put("s_in", s.astype(np.float64))
        self._put("idx_in", idx.astype(np.int32))
        self._put("probs", probs.astype(np.float32))
        if hidden is not None:
            self._put("hidden_in", hidden, offset)
        self.count.array[0] = -7
        p = {k: b.ptr for k, b in self.buf.items()}
        self.launcher.launch(self.stream, n=n, mode=mode, first_exit=exit_index, num_classes=C, deltas=deltas,
                             num_gates=G, num_exits=E, final_head=final_head,
                             gate=p["gate"], s_in=p["s_in"], idx_in=p["idx_in"], probs=p["probs"],
                             hidden_in=p["hidden_in"] + offset, row_bytes=row_bytes, s_out=p["s_out"],
                             idx_out=p["idx_out"], hidden_out=p["hidden_out"] + offset, out_probs=p["out_probs"],
                             out_class=p["out_class"], out_conf=p["out_conf"], out_exit=p["out_exit"],
                             survivors=self.count.device_ptr)
        self.d.event_record(self.ev, self.stream)
        self.d.event_synchronize(self.ev)
        out = {"count": int(self.count.array[0])}
        out["hidden_out"] = self._get("hidden_out", n * row_bytes + 16, offset).reshape(-1)
        out["s_out"] = self._get("s_out", n * 8).view(np.float64)
        out["s_out_raw"] = self._get("s_out", n * 8)
        out["idx_out"] = self._get("idx_out", n * 4).view(np.int32)
        out["out_probs"] = self._get("out_probs", slots * C * 4).view(np.float32).reshape(slots, C)
        out["out_probs_raw"] = self._get("out_probs", slots * C * 4).reshape(slots, C * 4)
        out["out_class"] = self._get("out_class", slots * 4).view(np.int32)
        out["out_conf_raw"] = self._get("out_conf", slots * 4).reshape(slots, 4)
        out["out_conf"] = out["out_conf_raw"].view(np.float32).ravel()
        out["out_exit"] = self._get("out_exit", slots * 4).view(np.int32)
        return out

    def close(self):
        for b in self.buf.values():
            b.free()
        self.host.free()
        self.count.free()
        self.d.event_destroy(self.ev)
        self.d.stream_destroy(self.stream)


@pytest.fixture(scope="module")
def harness(cuda_driver, exit_kernel):
    h = KernelHarness(cuda_driver, exit_kernel, max_rows=16384, max_slots=20000, max_classes=1000, max_row_bytes=1040)
    yield h
    h.close()


def small_vit(torch, exits=(0, 1, 2), depth=4, dim=32, seed=0, classes=10, img=16, chans=1):
    """A random-weight ViT JEIModel whose gates fire at varied depths (gate biases spread)."""
    from jei_edge.model import build_model

    torch.manual_seed(seed)
    m = build_model({"backbone": "vit", "exits": list(exits),
                     "backbone_kwargs": {"embed_dim": dim, "depth": depth, "img_size": img, "in_chans": chans,
                                         "num_classes": classes}})
    m.eval()
    with torch.no_grad():  # steep gates on p_max, thresholds at its 70th percentile: ~30% leave at each exit
        x = torch.from_numpy(np.random.default_rng(seed).normal(size=(512, chans, img, img)).astype(np.float32))
        logits, _ = m(x)
        pmax = torch.softmax(logits, -1).max(-1).values
        for l, g in enumerate(m.gates):
            g.linear.weight.zero_()
            g.linear.weight[0, 0] = 200.0
            g.linear.bias.fill_(-200.0 * float(torch.quantile(pmax[:, l], 0.7)))
    return m
