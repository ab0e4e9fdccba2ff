"""tools/bench_kernel.py's roofline: the arithmetic it counts and the peak it measures."""

import math

from conftest import TINY_VOCAB, tiny_model
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
    bench_kernel.roofline(model, 100, seconds)
    least = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| least c(n)"))
    floors = [float(v) for v in least.strip("| ").split(" | ")[1:]]
    assert floors[0] == 1.0 and floors == sorted(floors)
