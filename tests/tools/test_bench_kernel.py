"""tools/bench_kernel.py's roofline: the arithmetic it counts, the peak it measures and the time
outside the kernels."""

import math

import numpy as np

from conftest import TINY_VOCAB, tiny_model
from retrodraft.decode import skinny
from retrodraft.tools import bench_kernel


def test_forward_flops_counts_every_linear_layer_and_both_attention_products():
    model = tiny_model("llama")  # hidden 32, MLP 64, 2 layers, 4 query heads of 8 on 2 key/value heads
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 64)  # q, k and v, o, gate, up and down
    weights = 2 * per_layer + TINY_VOCAB * 32  # and the LM head
    rows, context = 5, 100
    attention = 2 * 4 * rows * (context + rows) * 8 * 4  # layers x query heads x rows x keys x head size x 4
    assert bench_kernel.forward_flops(model, context, rows - 1) == 2 * rows * weights + attention


def test_fma_peak_is_a_rate(capsys):
    peak = bench_kernel.fma_peak(steps=10_000)
    assert math.isfinite(peak) and peak > 1e8  # any CPU of this century multiplies faster than 0.1 GFLOP/s
    model = tiny_model("llama")
    seconds = [0.01 * (1 + n / 8) for n in bench_kernel.TREE_SIZES]
    bench_kernel.roofline(model, 100, seconds, [0.004] * len(seconds))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| least c(n)")]
    by_peak, with_outside = ([float(v) for v in line.strip("| ").split(" | ")[1:]] for line in lines)
    for floors in (by_peak, with_outside):
        assert floors[0] == 1.0 and floors == sorted(floors)
    # the time outside the kernels adds to the arithmetic: never a lower floor than the peak's alone
    assert all(w >= p - 0.005 for w, p in zip(with_outside, by_peak))


def test_the_kernel_clock_counts_kernel_time_and_puts_the_kernels_back():
    original = skinny.rows_times_panels
    x, weight = np.ones((3, 64), np.float32), skinny.panels_of(np.ones((128, 64), np.float32))
    with bench_kernel.kernel_clock() as spent:
        assert skinny.rows_times_panels is not original
        skinny.multiply(x, weight)
    assert spent[0] > 0 and skinny.rows_times_panels is original
    outside = bench_kernel.outside_kernels(tiny_model("llama"), 100, reps=2)
    assert len(outside) == len(bench_kernel.TREE_SIZES) and all(math.isfinite(s) and s > 0 for s in outside)
    assert skinny.rows_times_panels is original
