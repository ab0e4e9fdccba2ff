"""decode.simd's vector values: each operation against numpy, and the exponential's accuracy."""

import numba
import numpy as np

from retrodraft.decode import simd
from retrodraft.decode.simd import LANES


@numba.njit
def _ops(a, b, c, out):
    x, y, z = simd.load(a, (0, 0)), simd.load(b, (1,)), simd.load(c, (0,))
    simd.store(out, (0, 0), simd.fma(x, y, z))
    simd.store(out, (1, 0), simd.maximum(x, y))
    simd.store(out, (2, 0), simd.add(x, simd.splat(2.5)))
    simd.store(out, (3, 0), simd.sub(x, y))
    simd.store(out, (4, 0), simd.mul(x, y))
    r = simd.fma4(a[1, 2], x, y, z, x, z, y, x, z)
    for i in range(4):
        simd.store(out, (5 + i, 0), r[i])
    return simd.lanes_sum(x), simd.largest(y), simd.lane(z, 3)


def test_each_operation_is_numpys_lane_by_lane():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, LANES), np.float32)
    b = rng.standard_normal(LANES + 3, np.float32)
    c = rng.standard_normal(LANES, np.float32)
    out = np.zeros((9, LANES), np.float32)
    total, top, third = _ops(a, b, c, out)
    x, y, z = a[0], b[1 : LANES + 1], c  # load reads from the index along the last axis
    np.testing.assert_allclose(out[0], x * y + c, rtol=1e-6)
    np.testing.assert_array_equal(out[1], np.maximum(x, y))
    np.testing.assert_array_equal(out[2], x + np.float32(2.5))
    np.testing.assert_array_equal(out[3], x - y)
    np.testing.assert_array_equal(out[4], x * y)
    s = a[1, 2]
    for i, (w, acc) in enumerate(((x, z), (y, y), (z, x), (x, z))):  # fma4: a row of four accumulators
        np.testing.assert_allclose(out[5 + i], acc + s * w, rtol=1e-6)
    assert np.isclose(total, x.sum(), rtol=1e-5) and top == y.max() and third == c[3]


@numba.njit
def _exps(x, out):
    for i in range(0, x.shape[0], LANES):
        simd.store(out, (i,), simd.exp_nonpositive(simd.load(x, (i,))))


def test_the_exponential_is_exact_to_float32_rounding_and_zero_where_masked():
    x = np.concatenate([-np.random.default_rng(0).random(100_000 - 4, np.float32) * 86.9,
                        np.float32([0.0, -1e-30, -0.5, -86.99])])
    out = np.empty_like(x)
    _exps(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 4e-7  # a few float32 ulps
    masked = np.float32([-87.5, -1e4, np.finfo(np.float32).min, -np.inf] * 4)
    out = np.empty_like(masked)
    _exps(masked, out)
    assert not out.any()
