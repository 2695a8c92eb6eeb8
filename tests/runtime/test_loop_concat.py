"""Results.concat: chunks of one run keep order and sum the reach counts stage by stage."""

import numpy as np

from jei_edge.runtime.loop import Results


def test_concat_sums_reach_and_keeps_order():
    a = Results(np.eye(3, dtype=np.float32)[:2], np.array([0, 2]), reach=[2, 1, 1])
    b = Results(np.eye(3, dtype=np.float32)[2:], np.array([0]), reach=[1])
    c = Results.concat([a, b])
    assert c.reach == [3, 1, 1]
    np.testing.assert_array_equal(c.exit_index, [0, 2, 0])
    np.testing.assert_array_equal(c.pred, [0, 1, 2])
