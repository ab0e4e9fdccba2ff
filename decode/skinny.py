"""Linear layers over a few rows on a CPU: one pass over the weights for all rows.

A verification forward multiplies 1 + n rows (n draft nodes: a few to a few dozen) by every
weight matrix of the target. At those shapes BLAS is slow on a CPU: its GEMM kernels, built
for large batches, took about as long for 2 rows as for 8 and twice as long as its
matrix-vector product for 1, which itself streamed the weights at half the memory bandwidth
(2-core AMD EPYC, MKL; see README). The kernel here reads each weight row once and dots it
with every input row while it is in cache, so its time follows the weights' size, nearly
flat in the number of rows: that is the cost curve speculative decoding needs.

Within ``skinny_linears(model)``, every float32 CPU ``nn.Linear`` of the model sends inputs
of at most ``MAX_ROWS`` rows through the kernel and anything larger (a prompt's prefill) to
``F.linear``, unless the block's ``KernelSettings`` route that row count to ``F.linear``
(where the cost curve found BLAS faster on this machine). The sums are the same dot products
in another order, so results agree with ``F.linear`` to float32 rounding, as BLAS's own
1-row and n-row kernels agree with each other.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from llvmlite.binding import get_host_cpu_features
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from retrodraft.decode.cores import free_cores

MAX_ROWS = 128  # BLAS above (a prompt's prefill); from ~16 rows to here the two trade places between runs
BLOCK = 4  # weight rows per task
LINE = 16  # float32 values per 64-byte cache line
AHEAD = 32 * 1024  # bytes of weights between a task's block and the block it prefetches
# input rows per pass over a weight block: a 4 x 6 tile of accumulators (24) fits AVX-512's 32
# vector registers, a 4 x 3 tile (12) AVX2's 16
WIDE = bool(get_host_cpu_features().get("avx512f", False))


@intrinsic
def prefetch(typingctx, arr, i, j):
    """Ask the CPU to bring ``arr[i, j]``'s cache line into its L2 cache (a hint: no effect
    on any result, no fault on any address)."""
    sig = types.void(arr, i, j)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, array, [args[1], args[2]], wraparound=False)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(2), i32(1)])  # read, keep in L2, data
        return context.get_dummy_value()

    return sig, codegen


# The tiles below are written out by hand, alike: each must be straight-line code over named
# scalars for LLVM to keep its accumulators in vector registers (a loop over an array of them
# would load and store them at every k).
@numba.njit(cache=True, fastmath=True, inline="always")
def _six_rows(x, w, out, m, n):
    """out[m:m + 6, n:n + 4]: a 4 x 6 tile of dot products in registers."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    a40 = a41 = a42 = a43 = np.float32(0.0)
    a50 = a51 = a52 = a53 = np.float32(0.0)
    for k in range(x.shape[1]):
        w0, w1, w2, w3 = w[n, k], w[n + 1, k], w[n + 2, k], w[n + 3, k]
        v = x[m, k]
        a00 += v * w0
        a01 += v * w1
        a02 += v * w2
        a03 += v * w3
        v = x[m + 1, k]
        a10 += v * w0
        a11 += v * w1
        a12 += v * w2
        a13 += v * w3
        v = x[m + 2, k]
        a20 += v * w0
        a21 += v * w1
        a22 += v * w2
        a23 += v * w3
        v = x[m + 3, k]
        a30 += v * w0
        a31 += v * w1
        a32 += v * w2
        a33 += v * w3
        v = x[m + 4, k]
        a40 += v * w0
        a41 += v * w1
        a42 += v * w2
        a43 += v * w3
        v = x[m + 5, k]
        a50 += v * w0
        a51 += v * w1
        a52 += v * w2
        a53 += v * w3
    out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a00, a01, a02, a03
    out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = a10, a11, a12, a13
    out[m + 2, n], out[m + 2, n + 1], out[m + 2, n + 2], out[m + 2, n + 3] = a20, a21, a22, a23
    out[m + 3, n], out[m + 3, n + 1], out[m + 3, n + 2], out[m + 3, n + 3] = a30, a31, a32, a33
    out[m + 4, n], out[m + 4, n + 1], out[m + 4, n + 2], out[m + 4, n + 3] = a40, a41, a42, a43
    out[m + 5, n], out[m + 5, n + 1], out[m + 5, n + 2], out[m + 5, n + 3] = a50, a51, a52, a53


@numba.njit(cache=True, fastmath=True, inline="always")
def _three_rows(x, w, out, m, n):
    """out[m:m + 3, n:n + 4]: a 4 x 3 tile."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    for k in range(x.shape[1]):
        x0, x1, x2 = x[m, k], x[m + 1, k], x[m + 2, k]
        w0, w1, w2, w3 = w[n, k], w[n + 1, k], w[n + 2, k], w[n + 3, k]
        a00 += x0 * w0
        a01 += x0 * w1
        a02 += x0 * w2
        a03 += x0 * w3
        a10 += x1 * w0
        a11 += x1 * w1
        a12 += x1 * w2
        a13 += x1 * w3
        a20 += x2 * w0
        a21 += x2 * w1
        a22 += x2 * w2
        a23 += x2 * w3
    out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a00, a01, a02, a03
    out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = a10, a11, a12, a13
    out[m + 2, n], out[m + 2, n + 1], out[m + 2, n + 2], out[m + 2, n + 3] = a20, a21, a22, a23


@numba.njit(cache=True, fastmath=True, inline="always")
def _two_rows(x, w, out, m, n):
    """out[m:m + 2, n:n + 4]: a 4 x 2 tile."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    for k in range(x.shape[1]):
        x0, x1 = x[m, k], x[m + 1, k]
        w0, w1, w2, w3 = w[n, k], w[n + 1, k], w[n + 2, k], w[n + 3, k]
        a00 += x0 * w0
        a01 += x0 * w1
        a02 += x0 * w2
        a03 += x0 * w3
        a10 += x1 * w0
        a11 += x1 * w1
        a12 += x1 * w2
        a13 += x1 * w3
    out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a00, a01, a02, a03
    out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = a10, a11, a12, a13


@numba.njit(cache=True, fastmath=True, inline="always")
def _one_row(x, w, out, m, n):
    """out[m, n:n + 4]: the four weight rows by one input row."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(x.shape[1]):
        v = x[m, k]
        a0 += v * w[n, k]
        a1 += v * w[n + 1, k]
        a2 += v * w[n + 2, k]
        a3 += v * w[n + 3, k]
    out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a0, a1, a2, a3


@numba.njit(cache=True, parallel=True, fastmath=True)
def rows_times_weights(x: np.ndarray, w: np.ndarray, out: np.ndarray, wide: bool = WIDE) -> None:
    """out[m, n] = dot(x[m], w[n]) for x float32 [M, K], w float32 [N, K] (row-major).

    Register-blocked: each pass over k keeps a tile of dot products in registers, BLOCK (4)
    weight rows by 6 input rows where ``wide`` (AVX-512's 32 vector registers) else by 3,
    so each weight value loaded serves six (three) input rows and each input value four
    weight rows. A task's 4 weight rows (9 KB at K = 576) stay in L1 across all passes over
    the input rows; the weights stream from memory once per call. Rows left over take one
    4 x 3 pass (wide) and a 4 x 2 or 4 x 1 tile. On a 2-core Zen 5 VM, 30 matrices of
    1536 x 576 by 66 rows took 0.50 ms each with 6-row passes against 0.63 with 3-row ones
    (in cache: 250 against 224 GFLOP/s); at 6 rows or fewer nothing changes.

    While a task computes, it prefetches a later block of its thread's weights (AHEAD bytes
    on) into L2, a share before each pass, so that the next block's load from memory overlaps
    this block's arithmetic instead of taking turns with it. On the 2-core EPYC VM, for a
    1536 x 576 matrix (median of 21 interleaved rounds, ``decode.skinny`` before and after):
    1 row 0.144 -> 0.106 ms (memory bound: 33 GB/s), 8 rows 0.216 -> 0.151 ms, 17 rows 0.294
    -> 0.237 ms; the same 17 rows from cache take 0.17 ms. Spread over the passes, the
    requests never fill the core's queue of misses (all at once, they gained nothing).
    """
    m_rows, k_len = x.shape
    n_rows = w.shape[0]
    step = 6 if wide else 3
    lines = (k_len + LINE - 1) // LINE  # cache lines per weight row
    distance = BLOCK * max(1, AHEAD // (4 * BLOCK * max(1, k_len)))  # weight rows ahead
    passes = max(1, m_rows // step + (m_rows % step) // 3)
    per_pass = (BLOCK * lines + passes - 1) // passes  # prefetches before each pass
    for b in numba.prange((n_rows + BLOCK - 1) // BLOCK):
        n = b * BLOCK
        if n + BLOCK > n_rows:  # the last, partial block: one dot product at a time
            for r in range(n, n_rows):
                for m in range(m_rows):
                    acc = np.float32(0.0)
                    for k in range(k_len):
                        acc += x[m, k] * w[r, k]
                    out[m, r] = acc
            continue
        later = n + distance
        to_fetch = BLOCK * lines if later + BLOCK <= n_rows else 0
        fetched = 0
        m = 0
        while m + 3 <= m_rows:
            for j in range(fetched, min(fetched + per_pass, to_fetch)):
                prefetch(w, later + j // lines, (j % lines) * LINE)
            fetched += per_pass
            if wide and m + 6 <= m_rows:
                _six_rows(x, w, out, m, n)
                m += 6
            else:
                _three_rows(x, w, out, m, n)
                m += 3
        for j in range(fetched, to_fetch):  # the rest before the last pass (none left if there is none)
            prefetch(w, later + j // lines, (j % lines) * LINE)
        if m + 2 == m_rows:
            _two_rows(x, w, out, m, n)
        elif m + 1 == m_rows:
            _one_row(x, w, out, m, n)


def skinny_linear(x: torch.Tensor, weight: np.ndarray, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU ``x`` [..., K] with at most MAX_ROWS rows;
    ``weight`` is the layer's weight as a numpy array [N, K]."""
    # numpy on both sides of the call: a forward makes 211 of them, and torch's reshape, empty
    # and view cost 10 us a call here against 5 (0.6 ms of a 1-token forward on the Xeon VM)
    xs = (x if x.is_contiguous() else x.contiguous()).numpy()
    out = np.empty(xs.shape[:-1] + weight.shape[:1], np.float32)
    rows_times_weights(xs.reshape(-1, xs.shape[-1]), weight, out.reshape(-1, weight.shape[0]), WIDE)
    y = torch.from_numpy(out)
    if bias is not None:
        y += bias
    return y


def _eligible(module: torch.nn.Module) -> bool:
    if not isinstance(module, torch.nn.Linear):
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()


def serves(model: torch.nn.Module) -> bool:
    """Whether ``skinny_linears`` sends any of ``model``'s layers through the kernel (float32
    linear layers on a CPU)."""
    return any(_eligible(m) for m in model.modules())


class KernelSettings:
    """How a loop of few-rows forwards on a CPU uses the kernel: for which row counts, and on
    how many threads.

    ``kernel_rows``: bool [MAX_ROWS + 1], whether a linear layer over that many rows runs the
    kernel (else ``F.linear``); every count by default. Which is faster depends on the machine:
    on a 2-core AMD EPYC the kernel was faster at every count up to 64; on a 2-core Xeon with
    AVX-512 a 1-token forward at 1024 cached tokens took 38.2 ms with it and 35.2 ms with BLAS
    alone (each kernel call between torch's operations wakes a second thread pool), and BLAS
    won again from 33 rows (README, issue 10). The cost curve times both (``decode.budget``)
    and ``generate`` sets this from it per step.

    Threads: torch's pool and the kernel's each run on at most as many threads as other
    processes leave cores free (why: ``decode.cores``). ``update()`` (once per step) follows
    the free cores; the caller's thread counts are the most used and are restored when the
    block exits. Inactive (no-op) for models the kernel does not serve.
    """

    def __init__(self, active: bool):
        self.active = active
        self.kernel_rows = np.ones(MAX_ROWS + 1, bool)
        self.most = torch.get_num_threads(), numba.get_num_threads()
        self.threads = 0  # the free cores the pools were last set for

    def __enter__(self) -> "KernelSettings":
        self.update()
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            torch.set_num_threads(self.most[0])
            numba.set_num_threads(self.most[1])

    def update(self) -> None:
        if not self.active:
            return
        free = free_cores().count()
        if free != self.threads:
            self.threads = free
            torch.set_num_threads(min(self.most[0], free))
            numba.set_num_threads(min(self.most[1], free))


_blocks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its outermost block's settings


@contextlib.contextmanager
def skinny_linears(model: torch.nn.Module) -> Iterator[KernelSettings]:
    """Within the block, the model's float32 CPU linear layers compute inputs of at most
    MAX_ROWS rows with ``rows_times_weights`` where the yielded ``KernelSettings`` say so
    (``kernel_rows``; a no-op on other devices and dtypes), on the threads they set.

    A block within another for the same model (the cost curve is measured inside a generate
    call) yields the enclosing block's settings and leaves patching and restoring to it."""
    if model in _blocks:
        yield _blocks[model]
        return
    patched = [m for m in model.modules() if _eligible(m) and "forward" not in vars(m)]
    settings = KernelSettings(bool(patched))
    for module in patched:
        weight = module.weight.detach().numpy()

        def forward(x: torch.Tensor, module=module, weight=weight) -> torch.Tensor:
            rows = x.numel() // max(1, x.shape[-1])
            if (x.dtype != torch.float32 or rows > MAX_ROWS or x.requires_grad
                    or not settings.kernel_rows[rows]):
                return F.linear(x, module.weight, module.bias)
            return skinny_linear(x, weight, module.bias)

        module.forward = forward
    _blocks[model] = settings
    try:
        with settings:
            yield settings
    finally:
        del _blocks[model]
        for module in patched:
            del module.forward
