"""The exit kernel's decision code (``jei_decide`` in exit_kernel.cu, ``__host__ __device__``)
compiled for the HOST by nvcc and run on this CPU against the numpy exit rule: every slot and
every running sum bit for bit, one-gate and merged stages, offsets, NaN gates, exact ties.

This checks the kernel's own source text for the decision (gates in order, the earliest that
fires wins, S accumulated in FP64 with round-to-nearest operations), not a Python twin of it. It is
not a GPU run: the device build of the same function is checked by tests/gpu/test_exit_kernel.py
when a GPU is present. Skipped without nvcc.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from jei_edge.exit_rule import exit_levels, exit_mask
from jei_edge.runtime.cuda import nvrtc
from jei_edge.runtime.cuda.kernel import MAX_GATES

HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "KERNEL"

// stdin: n G E mode final_head first_exit, then G deltas, n S values, n*G gates (as %a hex floats)
// stdout: per row "<slot> <s_after as %a>"
int main() {
    int n, G, E, mode, final_head, first_exit;
    if (scanf("%d %d %d %d %d %d", &n, &G, &E, &mode, &final_head, &first_exit) != 6) return 2;
    ExitArgs a = {};
    std::vector<double> s(n);
    std::vector<float> g((size_t)n * (G > 0 ? G : 1));
    for (int j = 0; j < G; ++j) if (scanf("%la", &a.deltas[j]) != 1) return 3;
    for (int r = 0; r < n; ++r) if (scanf("%la", &s[r]) != 1) return 4;
    for (long long i = 0; i < (long long)n * G; ++i) if (scanf("%a", &g[i]) != 1) return 5;
    a.gate = g.data(); a.s_in = s.data(); a.n = n; a.num_gates = G; a.num_exits = E;
    a.mode = mode; a.final_head = final_head; a.first_exit = first_exit;
    for (int r = 0; r < n; ++r) {
        double after;
        const int slot = jei_decide(a, r, &after);
        printf("%d %a\n", slot, after);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def decide(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH (the host build of the kernel's decision needs it)")
    d = tmp_path_factory.mktemp("decide")
    src = d / "harness.cu"
    src.write_text(HARNESS.replace("KERNEL", str(nvrtc.KERNEL_FILE)))
    exe = d / "harness"
    r = subprocess.run([nvcc, "-O2", "-arch=sm_80", "-Xcompiler", "-ffp-contract=off", "-o", str(exe), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    def run(g, s, deltas, mode=0, final_head=False, first_exit=0, num_exits=None):
        g = np.asarray(g, np.float32).reshape(len(s), -1)
        n, G = g.shape
        E = num_exits if num_exits is not None else G + int(final_head)
        lines = [f"{n} {G} {max(E, 1)} {mode} {int(final_head)} {first_exit}"]
        lines += [float(v).hex() for v in deltas[:G]] + [float(v).hex() for v in s]
        lines += [float(v).hex() for v in g.ravel()]
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        rows = [ln.split() for ln in out.stdout.splitlines()]
        return np.array([int(a) for a, _ in rows]), np.array([float.fromhex(b) for _, b in rows])

    return run


def reference(g, s, deltas, mode=0, final_head=False):
    """Slot and running sum after the gates, from jei_edge.exit_rule (the numpy rule)."""
    g = np.asarray(g, np.float32)
    n, G = g.shape
    slot = np.full(n, -1)
    S = np.asarray(s, np.float64).copy()
    for j in range(G):
        fire = (slot < 0) & (exit_mask(g[:, j].astype(np.float64), S, deltas[j]) if mode == 0 else False)
        slot[fire] = j
        S = np.where(slot < 0, S + g[:, j].astype(np.float64), S)
    if final_head:
        slot[slot < 0] = G
    return slot, S


@pytest.mark.parametrize("G", [1, 2, 5, MAX_GATES])
@pytest.mark.parametrize("final_head", [False, True])
def test_merged_decisions_bit_exact(decide, G, final_head):
    rng = np.random.default_rng(G * 2 + final_head)
    n = 500
    g = rng.random((n, G)).astype(np.float32) ** 3  # many small gates: rows travel deep
    s = rng.uniform(0, 0.9, n) * (rng.random(n) < 0.5)
    deltas = rng.uniform(-0.2, 0.2, G)
    slot, after = decide(g, s, deltas, final_head=final_head)
    want_slot, want_s = reference(g, s, deltas, final_head=final_head)
    np.testing.assert_array_equal(slot, want_slot)
    np.testing.assert_array_equal(after, want_s)  # bit for bit (FP64 round-to-nearest, no contraction)
    assert len(set(slot.tolist())) >= min(G + final_head, 3)


def test_from_zero_the_slots_are_the_exit_levels(decide):
    """With S = 0 (the first stage) and the final head in the stage, the slots are exit_levels."""
    rng = np.random.default_rng(3)
    g = rng.random((400, 7)).astype(np.float32) ** 2
    deltas = [0.0, 0.1, -0.1, 0.2, 0.0, -0.2, 0.05]
    slot, _ = decide(g, np.zeros(400), deltas, final_head=True)
    np.testing.assert_array_equal(slot, exit_levels(g, deltas))


def test_ties_nan_and_modes(decide):
    g = np.array([[0.25, 0.9], [np.nan, 0.9], [np.nan, np.nan], [0.2499999, 0.0]], np.float32)
    s = np.array([0.5, 0.0, 0.0, 0.5])
    slot, after = decide(g, s, [0.0, 0.0])
    # exactly the threshold exits (>=); a NaN gate never fires but its NaN joins S (as in numpy),
    # so no later gate can fire either
    np.testing.assert_array_equal(slot, [0, -1, -1, -1])
    assert np.isnan(after[1]) and np.isnan(after[2])
    ref_slot, ref_s = reference(g, s, [0.0, 0.0])
    np.testing.assert_array_equal(slot, ref_slot)
    np.testing.assert_array_equal(after, ref_s)
    # mode 1 ("full"): no gate fires, S takes every gate; with a final head all leave there
    slot, after = decide(g[[0, 3]], s[[0, 3]], [0.0, 0.0], mode=1)
    np.testing.assert_array_equal(slot, [-1, -1])
    np.testing.assert_array_equal(after, s[[0, 3]] + g[[0, 3]].astype(np.float64).sum(1))
    slot, _ = decide(g[[0, 3]], s[[0, 3]], [0.0, 0.0], mode=1, final_head=True)
    np.testing.assert_array_equal(slot, [2, 2])
    # mode 2: every row takes the stage's last exit, gates unread
    slot, after = decide(g, s, [0.0, 0.0], mode=2, num_exits=3)
    np.testing.assert_array_equal(slot, [2, 2, 2, 2])
    np.testing.assert_array_equal(after, s)
