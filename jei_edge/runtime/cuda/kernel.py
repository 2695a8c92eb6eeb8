"""Host side of the fused exit kernel: argument packing, grid choice, launch.

``ExitKernel`` is the loaded module (one per device); ``KernelLauncher`` owns one preallocated
argument struct (so launching allocates nothing) and counts its launches. Workspaces each own a
launcher, so pipeline lanes on different threads never share argument memory.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Sequence

from jei_edge.runtime.cuda.nvrtc import KERNEL_NAME, CompiledKernel, compile_exit_kernel

BLOCK = 256  # JEI_BLOCK in exit_kernel.cu
DEFAULT_MAX_GRID = 1024
MAX_ROWS = 16384  # largest live-row count one launch supports (each block scans <= this many decisions)
MAX_GATES = 32  # JEI_MAX_GATES in exit_kernel.cu: gates one (merged) stage may hold

MODE_EXIT, MODE_NONE_EXIT, MODE_ALL_EXIT = 0, 1, 2


class ExitArgs(ctypes.Structure):
    """Mirror of ``struct ExitArgs`` in exit_kernel.cu (size and offsets are static_asserted there)."""

    _fields_ = [
        ("gate", ctypes.c_uint64),
        ("s_in", ctypes.c_uint64),
        ("idx_in", ctypes.c_uint64),
        ("probs", ctypes.c_uint64),
        ("hidden_in", ctypes.c_uint64),
        ("s_out", ctypes.c_uint64),
        ("idx_out", ctypes.c_uint64),
        ("hidden_out", ctypes.c_uint64),
        ("out_probs", ctypes.c_uint64),
        ("out_class", ctypes.c_uint64),
        ("out_conf", ctypes.c_uint64),
        ("out_exit", ctypes.c_uint64),
        ("survivors", ctypes.c_uint64),
        ("row_bytes", ctypes.c_int64),
        ("deltas", ctypes.c_double * MAX_GATES),
        ("n", ctypes.c_int32),
        ("num_classes", ctypes.c_int32),
        ("mode", ctypes.c_int32),
        ("first_exit", ctypes.c_int32),
        ("num_gates", ctypes.c_int32),
        ("num_exits", ctypes.c_int32),
        ("final_head", ctypes.c_int32),
        ("rows_per_block", ctypes.c_int32),
    ]


def grid_for(n: int, max_grid: int = DEFAULT_MAX_GRID):
    """``(grid, rows_per_block)`` for ``n`` live rows: one row per block up to ``max_grid`` blocks."""
    if n < 1:
        raise ValueError("the exit kernel needs at least one live row")
    if n > MAX_ROWS:
        raise ValueError(f"{n} live rows exceed the exit kernel's limit of {MAX_ROWS}")
    rows = -(-n // max_grid)
    return -(-n // rows), rows


class ExitKernel:
    """The exit kernel loaded on a device.

    Args:
        driver: a ``CudaDriver`` (or a test fake).
        compiled: a precompiled image; default: compile (or take from the cache) for the device.
        cache_dir: the NVRTC cache directory.
    """

    def __init__(self, driver, compiled: Optional[CompiledKernel] = None, cache_dir=None):
        self.driver = driver
        self.compiled = compiled or compile_exit_kernel(driver.arch, cache_dir=cache_dir)
        self.module = driver.module_load(self.compiled.image)
        self.function = driver.module_function(self.module, KERNEL_NAME)


@dataclass
class LaunchRecord:
    """The last launch (for tests and profiling)."""

    grid: int = 0
    rows_per_block: int = 0
    stream: int = 0


class KernelLauncher:
    """Launches the exit kernel with a preallocated argument struct; ``launches`` counts them."""

    def __init__(self, kernel: ExitKernel, max_grid: int = DEFAULT_MAX_GRID):
        self.kernel = kernel
        self.max_grid = int(max_grid)
        self.args = ExitArgs()
        self._params = (ctypes.c_void_p * 1)(ctypes.addressof(self.args))
        self.params_address = ctypes.addressof(self._params)
        self.launches = 0
        self.last = LaunchRecord()

    def launch(self, stream: int, *, n: int, mode: int, first_exit: int, num_classes: int, deltas: Sequence[float],
               gate: int, s_in: int, idx_in: int, probs: int, hidden_in: int, row_bytes: int,
               s_out: int, idx_out: int, hidden_out: int, out_probs: int, out_class: int,
               out_conf: int, out_exit: int, survivors: int, num_gates: int = 1, num_exits: int = 1,
               final_head: bool = False) -> None:
        """One launch over ``n`` live rows (pointers are device addresses; see exit_kernel.cu).

        ``deltas``: one threshold offset per gate (``num_gates`` of them); a stage's exits are
        ``first_exit .. first_exit + num_exits - 1`` (several when merged)."""
        if not 0 <= num_gates <= MAX_GATES or not max(1, num_gates) <= num_exits <= num_gates + 1:
            raise ValueError(f"a stage with {num_gates} gates and {num_exits} exits is outside the exit kernel's "
                             f"limits (at most {MAX_GATES} gates, exits = gates or gates + 1)")
        if len(deltas) < num_gates:
            raise ValueError(f"{len(deltas)} threshold offsets for {num_gates} gates")
        grid, rows = grid_for(n, self.max_grid)
        a = self.args
        a.gate, a.s_in, a.idx_in, a.probs, a.hidden_in = gate, s_in, idx_in, probs, hidden_in
        a.s_out, a.idx_out, a.hidden_out = s_out, idx_out, hidden_out
        a.out_probs, a.out_class, a.out_conf, a.out_exit = out_probs, out_class, out_conf, out_exit
        a.survivors, a.row_bytes = survivors, row_bytes
        a.n, a.num_classes, a.mode, a.first_exit, a.rows_per_block = n, num_classes, mode, first_exit, rows
        a.num_gates, a.num_exits, a.final_head = num_gates, num_exits, int(bool(final_head))
        for j in range(num_gates):
            a.deltas[j] = deltas[j]
        self.kernel.driver.launch(self.kernel.function, grid, BLOCK, 0, stream, self.params_address)
        self.launches += 1
        self.last.grid, self.last.rows_per_block, self.last.stream = grid, rows, stream
