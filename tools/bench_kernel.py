"""What a few rows cost through BLAS and through decode.skinny's kernel: a benchmark, not a test.

usage: python tools/bench_kernel.py [--model DIR] [--context N] [--reps N]

Prints two tables, milliseconds, median of --reps (the forwards: --reps rounds over all sizes,
interleaved, after a warm-up round, as the cost curve is measured):
  weights   30 float32 weight matrices of 1536 x 576 (SmolLM2-135M's MLP shape, 106 MB: more
            than any cache, as in a real forward) times 1-64 input rows, F.linear (BLAS) and
            decode.skinny's kernel on panels of 64 features (what AVX-512 machines use) and of
            16 (what others use), one matrix after another
  attention one layer's attention of the model at --context cached tokens for 1 + n tree
            rows (query heads packed on their key/value head, as a tree forward runs it),
            PyTorch's SDPA and decode.cpu_attention's kernel, interleaved, each call on
            fresh keys and values (a forward's are cold too)
  forward   one verification forward of the model (1 + n tokens, LM head included, as the
            cost curve measures it) over a cache of --context tokens, with the linear layers
            on BLAS, on the kernel within the decoder layers' own forward, and on the kernel
            within decode.decoder_layers' pass (interleaved)
  norms     the model's RMS norms (one call of each, as in a forward) over 1 + n rows, their
            own forward and decode.norms' pass (the one generate runs where it serves them)
  roofline  the forward's arithmetic (linear layers, LM head and attention, in GFLOP) over
            this machine's float32 multiply-add peak (measured: vector FMAs on every thread),
            the share of that peak the measured forward reached, and the least c(n) the peak
            allows (a forward can be no faster than its arithmetic at the peak, nor than the
            0-node forward, which streams the weights); then the forward's time outside the
            linear and attention kernels (Python, norms, rotary embedding, copies: a forward
            timed with the kernels clocked), and the least c(n) with the 0-node forward's
            outside time added to the kernels at the peak (no forward spends less outside them)
  prefill   the prompt of --context tokens run into a fresh cache in one forward (BLAS and
            SDPA) and as ``generate`` runs it (``tree_attention.run_prompt``: forwards of
            ``prompt_rows`` rows through the kernels), interleaved
and last the cost curve c(n) the budget uses at --context (from the disk cache, checked, else
measured; with what earlier runs' steps taught it) and the path ``generate`` takes at each n:
the faster of the two where the cost curve was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from typing import Iterator


from retrodraft.tools.threads import short_openmp_spin

short_openmp_spin()  # before torch: see tools/threads.py

import numba
import numpy as np
import torch
import torch.nn.functional as F

from retrodraft.decode import load_model
from retrodraft.decode.budget import CostModel, forward_seconds, forward_steps
from retrodraft.decode import cpu_attention, skinny
from retrodraft.decode import norms as norm_pass
from retrodraft.decode.simd import LANES, WIDE_REGISTERS, add, fma, lanes_sum, splat
from retrodraft.decode.skinny import PANEL, PANEL_WIDTHS, multiply, panels_of
from retrodraft.decode.tree_attention import attention_shape, new_cache, prompt_rows, run_prompt, verification_kernels

ROWS = (1, 2, 4, 8, 16, 32, 64)
TREE_SIZES = (0, 1, 2, 4, 8, 16, 32, 64)


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps + 2):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:])) * 1000


def row(label: str, values: list[float], digits: int = 1) -> str:
    return f"| {label} | " + " | ".join(f"{v:.{digits}f}" for v in values) + " |"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # cost curve news
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local HF model directory (default SmolLM2-135M-Instruct)")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens before the forward (default 1024)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.context < 1:
        ap.error(f"--reps and --context must be at least 1, got {args.reps} and {args.context}")
    model, _ = load_model(args.model)
    longest = CostModel.of(model).longest
    if args.context > longest:
        ap.error(f"--context {args.context} leaves no room for a 64-node tree in the model's context: "
                 f"at most {longest}")

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(1536, 576, generator=gen) for _ in range(30)]
    panels = {width: [panels_of(w.numpy(), width) for w in weights] for width in PANEL_WIDTHS}
    blas, paneled = [], {width: [] for width in PANEL_WIDTHS}
    for m in ROWS:
        x = torch.randn(m, 576, generator=gen)
        blas.append(median_ms(lambda: [F.linear(x, w) for w in weights], args.reps))
        for width in PANEL_WIDTHS:
            paneled[width].append(median_ms(lambda: [multiply(x.numpy(), p) for p in panels[width]], args.reps))
    print(f"weights: 30 x (1536 x 576) float32, ms, {torch.get_num_threads()} threads\n")
    print("| rows | " + " | ".join(map(str, ROWS)) + " |\n|---|" + "---|" * len(ROWS))
    print(row("`F.linear` (BLAS)", blas))
    for width in PANEL_WIDTHS:
        print(row(f"`decode.skinny` kernel on panels of {width} features" + (" (used here)" if width == PANEL else ""),
                  paneled[width]))

    attention(model, args.context, args.reps)

    with_blas, own_layers, with_kernel = forward_seconds(model, args.context, TREE_SIZES, args.reps,
                                                         kernel=(False, True, True), layers=(False, False, True))
    print(f"\nforward of 1 + n tokens over {args.context} cached tokens, ms\n")
    print("| n | " + " | ".join(map(str, TREE_SIZES)) + " |\n|---|" + "---|" * len(TREE_SIZES))
    print(row("BLAS linear layers", [s * 1000 for s in with_blas]))
    print(row("`decode.skinny` kernel, the decoder layers' own forward", [s * 1000 for s in own_layers]))
    print(row("`decode.skinny` kernel and `decode.decoder_layers`' pass (what generate runs)",
              [s * 1000 for s in with_kernel]))
    roofline(model, args.context, with_kernel, outside_kernels(model, args.context, args.reps))
    norms(model, args.reps)
    prefill(model, args.context, args.reps)

    costs = CostModel.of(model)
    curve, rows = costs.table(args.context), costs.kernel_rows(args.context)
    print(f"\ncost curve the budget uses at {args.context}: "
          + ", ".join(f"c({n}) = {curve[n]:.2f}" for n in TREE_SIZES[1:]))
    print("path generate takes: " + ", ".join(f"n = {n}: {'kernel' if rows[n + 1] else 'BLAS'}" for n in TREE_SIZES))


# independent chains of vector multiply-adds per thread: enough to keep every FMA unit busy
# through their latency, and no more than the registers hold (a vector is two of AVX2's)
CHAINS = 12 if WIDE_REGISTERS else 6


@numba.njit(parallel=True, fastmath=True)
def _multiply_adds(steps: int, out: np.ndarray) -> None:
    """CHAINS chains of vector multiply-adds per thread, ``steps`` long."""
    for t in numba.prange(out.shape[0]):
        x, y = splat(np.float32(1.0) + np.float32(t) * np.float32(1e-7)), splat(0.999999)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = splat(0.0)
        for _ in range(steps):
            a0, a1, a2, a3 = fma(x, y, a0), fma(x, y, a1), fma(x, y, a2), fma(x, y, a3)
            a4, a5 = fma(x, y, a4), fma(x, y, a5)
            if CHAINS == 12:  # a constant: the branch is compiled away
                a6, a7 = fma(x, y, a6), fma(x, y, a7)
                a8, a9, a10, a11 = fma(x, y, a8), fma(x, y, a9), fma(x, y, a10), fma(x, y, a11)
        total = add(add(add(a0, a1), add(a2, a3)), add(add(a4, a5), add(a6, a7)))
        out[t] = lanes_sum(add(total, add(add(a8, a9), add(a10, a11))))  # used: the loop is not dropped


def fma_peak(steps: int = 20_000_000) -> float:
    """FLOP/s of float32 vector multiply-adds on all of Numba's threads (the kernels' pool):
    the best of three runs."""
    threads = numba.get_num_threads()
    out = np.empty(threads, np.float32)
    _multiply_adds(10, out)  # compile
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        _multiply_adds(steps, out)
        best = min(best, time.perf_counter() - t)
    return threads * steps * CHAINS * LANES * 2 / best


def forward_flops(model, context: int, n: int) -> float:
    """Floating-point operations of a verification forward of 1 + n rows over ``context``
    cached tokens: every linear layer (the LM head included) and attention's two products
    (scores and the weighted sum of values, every key for every row, as the kernels compute
    them); norms and element-wise work left out."""
    rows = n + 1
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    kv_heads, groups, dim = attention_shape(model.config)
    attention = model.config.num_hidden_layers * kv_heads * groups * rows * (context + rows) * dim * 4
    return 2.0 * rows * weights + attention


# the arithmetic forward_flops counts: the linear layers' kernel and attention's two (module, name) pairs
KERNELS = ((skinny, "rows_times_panels"), (cpu_attention, "ROW_BLOCK_KERNEL"), (cpu_attention, "few_rows_attention"))


@contextlib.contextmanager
def kernel_clock() -> Iterator[list[float]]:
    """Within the block, every call of the KERNELS adds its seconds to the yielded one-item
    list (their callers look them up in their modules at each call)."""
    spent = [0.0]

    def clocked(kernel):
        def call(*args):
            t = time.perf_counter()
            kernel(*args)
            spent[0] += time.perf_counter() - t

        return call

    originals = [getattr(module, name) for module, name in KERNELS]
    for (module, name), kernel in zip(KERNELS, originals):
        setattr(module, name, clocked(kernel))
    try:
        yield spent
    finally:
        for (module, name), kernel in zip(KERNELS, originals):
            setattr(module, name, kernel)


@torch.inference_mode()
def outside_kernels(model, context: int, reps: int) -> list[float]:
    """Seconds of a verification forward (decode.decoder_layers' pass) spent outside the
    KERNELS, per n in TREE_SIZES: each forward's time less its kernels', the median of
    ``reps`` interleaved rounds after a warm-up one."""
    outside = np.empty((reps + 1, len(TREE_SIZES)))
    with verification_kernels(model) as settings:
        steps = forward_steps(model, context, TREE_SIZES, (True,), None, settings)
        with kernel_clock() as spent:
            for r in range(reps + 1):
                for i, (step,) in enumerate(steps):
                    before = spent[0]
                    seconds = step()
                    outside[r, i] = seconds - (spent[0] - before)
    return np.median(outside[1:], axis=0).tolist()


def roofline(model, context: int, seconds: list[float], outside: list[float]) -> None:
    """The roofline table (see the module's docstring) for the forward's measured ``seconds``
    at TREE_SIZES (decode.decoder_layers' pass) and their time ``outside`` the kernels."""
    peak = fma_peak()
    flops = [forward_flops(model, context, n) for n in TREE_SIZES]
    print(f"\nroofline: float32 multiply-add peak {peak / 1e9:.0f} GFLOP/s on {numba.get_num_threads()} threads\n")
    print("| n | " + " | ".join(map(str, TREE_SIZES)) + " |\n|---|" + "---|" * len(TREE_SIZES))
    print(row("arithmetic, GFLOP", [f / 1e9 for f in flops], 2))
    print(row("arithmetic at the peak, ms", [f / peak * 1000 for f in flops]))
    print(row("measured forward (the pass), % of the peak", [100 * f / peak / s for f, s in zip(flops, seconds)], 0))
    print(row("least c(n) the peak allows", [max(seconds[0], f / peak) / seconds[0] for f in flops], 2))
    print(row("measured c(n)", [s / seconds[0] for s in seconds], 2))
    print(row("time outside the kernels, ms", [s * 1000 for s in outside]))
    streamed = seconds[0] - outside[0]  # the 0-node forward's kernels: the weights streamed
    print(row("least c(n), the 0-node forward's time outside the kernels added",
              [(outside[0] + max(streamed, f / peak)) / seconds[0] for f in flops], 2))


@torch.inference_mode()
def norms(model, reps: int) -> None:
    """The norms table (see the module's docstring), or a line saying why there is none."""
    served = [m for m in model.modules() if norm_pass.serves(m)]
    if not served:
        print("\nRMS norms: decode.norms serves none of this model's norms (other arithmetic, dtype or device)")
        return
    d = served[0].weight.shape[0]
    held = [(m.weight.detach().numpy(), np.float32(norm_pass.epsilon(m))) for m in served]
    gen = torch.Generator().manual_seed(3)
    own, ours = [], []
    for n in TREE_SIZES:
        x = torch.randn(1, n + 1, d, generator=gen)
        own.append(median_ms(lambda: [m(x) for m in served], reps))
        ours.append(median_ms(lambda: [norm_pass.normalise(x, w, eps) for w, eps in held], reps))
    print(f"\nRMS norms of one forward ({len(served)} calls) over 1 + n rows, ms\n")
    print("| n | " + " | ".join(map(str, TREE_SIZES)) + " |\n|---|" + "---|" * len(TREE_SIZES))
    print(row("the modules' own forward", own, 2))
    print(row("`decode.norms` pass", ours, 2))


@torch.inference_mode()
def prefill(model, context: int, reps: int) -> None:
    """The prefill line (see the module's docstring)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(2))
    times: dict[bool, list[float]] = {False: [], True: []}
    with verification_kernels(model) as settings:
        rows = prompt_rows(model, settings)
        for r in range(reps + 1):  # a warm-up round
            for chunked in (False, True):
                cache = new_cache(model, context)
                t = time.perf_counter()
                run_prompt(model, ids.to(model.device), cache, settings if chunked else None)
                if r:
                    times[chunked].append(time.perf_counter() - t)
    whole, parts = (1000 * float(np.median(times[c])) for c in (False, True))
    print(f"\nprefill of {context} tokens, ms: one forward {whole:.0f}, "
          + (f"forwards of {rows} rows (as generate) {parts:.0f}" if rows else "generate runs one forward here"))


def attention(model, context: int, reps: int) -> None:
    """The attention table (see the module's docstring), or a line saying why there is none."""
    kv_heads, groups, dim = attention_shape(model.config)
    if dim not in cpu_attention.HEAD_DIMS:
        print(f"\nattention: head size {dim} has no few-rows kernel (SDPA serves it)")
        return
    gen = torch.Generator().manual_seed(1)
    times = {}
    for r in range(reps + 1):  # a warm-up round, then reps rounds over all sizes and both paths
        for n in TREE_SIZES:
            q = torch.randn(1, kv_heads, groups * (n + 1), dim, generator=gen)
            k, v = (torch.randn(1, kv_heads, context + n + 1, dim, generator=gen) for _ in range(2))
            mask = torch.zeros(1, 1, groups * (n + 1), context + n + 1)
            # a forward transposes its mask once for all layers (tree_attention._transposed): not timed here
            mask_t = cpu_attention.transposed_mask(mask) if cpu_attention.uses_row_blocks(mask.shape[-2]) else None
            for path in ("sdpa", "kernel"):
                t = time.perf_counter()
                if path == "sdpa":
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                else:
                    cpu_attention.attend(q, k, v, mask, dim**-0.5, mask_t)
                if r:
                    times.setdefault(path, {}).setdefault(n, []).append(time.perf_counter() - t)
    print(f"\nattention of one layer ({kv_heads} key/value heads x {groups} query heads, head size {dim}) for 1 + n "
          f"rows over {context} cached tokens, ms\n")
    print("| n | " + " | ".join(map(str, TREE_SIZES)) + " |\n|---|" + "---|" * len(TREE_SIZES))
    for path, label in (("sdpa", "PyTorch SDPA"), ("kernel", "`decode.cpu_attention`")):
        print(row(label, [1000 * float(np.median(times[path][n])) for n in TREE_SIZES], digits=3))


if __name__ == "__main__":
    main()
