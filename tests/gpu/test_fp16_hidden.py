"""FP16 hidden states through the real CUDA workspace and exit kernel (any executor, no torch).

The executor here does its stage math on the host in numpy (``MockExecutor``'s model) and copies
rows in and out through the driver: the point is the workspace and the kernel on a real GPU
compacting 2-byte rows whose size is not a multiple of 16 bytes, against the numpy reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from jei_edge.runtime.cuda.backend import cuda_backend
from jei_edge.runtime.cuda.memory import HostBuffer
from jei_edge.runtime.cuda.options import CudaOptions
from jei_edge.runtime.loop import run_conditional

from ..cuda.conftest import MockExecutor, specs_for

pytestmark = pytest.mark.gpu


class HostMathExecutor(MockExecutor):
    """``MockExecutor``'s stage math on the host; inputs and outputs moved by the driver."""

    def prepare(self, ws):
        cap = ws.capacity
        d = int(np.prod(self.row_shape))
        self._stage = HostBuffer(ws.driver, (cap * d * 4 + cap * self.num_classes * 4 + cap * 4,), np.uint8)

    def release(self, ws):
        self._stage.free()

    def execute(self, k, n, ws):
        drv, st = ws.driver, self._stage
        d = int(np.prod(self.row_shape))
        in_dtype = np.dtype(np.float32 if k == 0 else self.hidden_dtype)
        drv.memcpy_dtoh_async(st.ptr, ws.stage_input(k).device_ptr, n * d * in_dtype.itemsize, ws.stream)
        drv.stream_synchronize(ws.stream)
        h = st.array[: n * d * in_dtype.itemsize].view(in_dtype).reshape((n,) + self.row_shape).copy()
        hid, probs, gate = self.forward(k, h)
        outs = ws.stage_outputs(k)
        for name, arr in (("hidden_out", hid), ("probs", probs), ("gate", gate)):
            if name in outs:
                raw = np.ascontiguousarray(arr).view(np.uint8).ravel()
                st.array[: raw.size] = raw
                drv.memcpy_htod_async(outs[name].ptr, st.ptr, raw.size, ws.stream)
                drv.stream_synchronize(ws.stream)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_hidden_rows_of_any_element_size(cuda_driver, dtype):
    ex = HostMathExecutor(seed=4, hidden_dtype=dtype, row_shape=(3, 7))  # 21 elements: 42 bytes in FP16
    ex, ws = cuda_backend(ex, specs_for(ex), ex.num_classes, 64, CudaOptions())
    try:
        rng = np.random.default_rng(2)
        for B in (1, 17, 64):
            x = rng.normal(size=(B, 3, 7)).astype(np.float32)
            res = run_conditional(ex, ws, x, "exit")
            levels, probs, _ = ex.reference(x)
            np.testing.assert_array_equal(res.exit_index, levels)
            np.testing.assert_array_equal(res.probs, probs)
    finally:
        ex.release(ws)
        ws.close()
