"""Linear layers over a few rows on a CPU: one pass over the weights for all rows.

A verification forward multiplies 1 + n rows (n draft nodes: a few to a few dozen) by every
weight matrix of the target. At those shapes BLAS is slow on a CPU: its GEMM kernels, built
for large batches, took about as long for 2 rows as for 8 and twice as long as its
matrix-vector product for 1, which itself streamed the weights at half the memory bandwidth
(2-core AMD EPYC, MKL; see README). The kernels here read each weight once per call and
use it for every input row while it is in cache, so their time follows the weights' size,
nearly flat in the number of rows: that is the cost curve speculative decoding needs.

The kernel, ``rows_times_panels``, reads a copy of each weight re-laid out in panels of
output features (``PANEL``: 64 on AVX-512, 16 elsewhere), vectors along the outputs: no
horizontal sums, one contiguous stream per task. That copy is its price. Against dot
products along the input features on the weights as the model holds them (the kernel this
one replaced), a 17-row forward of SmolLM2-135M at a 1024-token context went from 47.5 to
36.6 ms on a 2-core Zen 5 VM, and with AVX2 code on a 2-core Zen 4 VM from 87.5 to 51.5 ms
(with SDPA taking the attention there; 47.2 with ``cpu_attention``'s tiles for AVX2: README,
issue 10).

Within ``skinny_linears(model)``, every float32 CPU ``nn.Linear`` of the model sends inputs
of at most ``MAX_ROWS`` rows through the kernel (a prompt too: ``tree_attention.run_prompt``
feeds it in forwards of that many rows) and anything larger to ``F.linear``, unless the
block's ``KernelSettings`` route that row count to ``F.linear`` (where the cost curve found
BLAS faster on this machine). The sums are the same dot products in another order, so
results agree with ``F.linear`` to float32 rounding, as BLAS's own 1-row and n-row kernels
agree with each other.
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
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from retrodraft.decode.cores import free_cores
from retrodraft.decode.simd import LANES, WIDE_REGISTERS, fma, fma4, largest, load, load4, maximum, splat, store, store4

MAX_ROWS = 128  # BLAS above (a whole prompt in one forward); from ~16 rows to here the two trade places between runs
# Output features per panel of rows_times_panels: 4 vectors of 16 lanes where AVX-512's 32
# registers hold a tile of 6 x 4 accumulators, else one (a vector of 16 is two of AVX2's 16
# registers: a tile of 6 x 1 takes 12)
PANEL = 4 * LANES if WIDE_REGISTERS else LANES
PANEL_WIDTHS = (4 * LANES, LANES)  # the widths the kernel has tiles for: both run on any machine, exact
TILE = 6  # input rows per panel tile
CHUNK_BYTES = 16 * 1024  # of a panel per pass of every tile over it (stays in L1 between the tiles)
AHEAD_BYTES = 32 * 1024  # of a panel between the row computed and the row prefetched
NO_MAXIMA = np.empty((0, 0), np.float32)  # rows_times_panels' ``best`` when no argmax is wanted


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


def panels_of(weight: np.ndarray, width: int = PANEL) -> np.ndarray:
    """A weight [N, K] re-laid out for ``rows_times_panels``: float32 [ceil(N / width), K,
    width], panel p holding output features p * width .. (p + 1) * width - 1 feature-minor
    (zero past N), each panel one contiguous block. ``width``: one of PANEL_WIDTHS (this
    machine's PANEL by default; the other one computes the same, slower)."""
    if width not in PANEL_WIDTHS:
        raise ValueError(f"panels are {' or '.join(map(str, sorted(PANEL_WIDTHS)))} features wide, not {width}")
    n, k = weight.shape
    panels = np.zeros((-(-n // width), width, k), np.float32)
    panels.reshape(-1, k)[:n] = weight
    return np.ascontiguousarray(panels.transpose(0, 2, 1))


@numba.njit(cache=True, fastmath=True, inline="always")
def _fetch(flat, row, t, passes):
    """Pass t of ``passes`` over a chunk prefetches its share of the 4 cache lines of panel row
    ``row``: all 4 in a single pass, else 2, 1 or (from the fifth pass) none."""
    if passes == 1:
        prefetch(flat, row, 0)
        prefetch(flat, row, 16)
        prefetch(flat, row, 32)
        prefetch(flat, row, 48)
    elif passes == 2:
        prefetch(flat, row, 32 * t)
        prefetch(flat, row, 32 * t + 16)
    elif passes == 3:
        prefetch(flat, row, 16 * t)
        if t == 0:
            prefetch(flat, row, 48)
    elif t < 4:
        prefetch(flat, row, 16 * t)


# The tiles below are written out by hand, alike: each must be straight-line code over named
# vectors for LLVM to keep its accumulators in registers (a loop over an array of them would
# load and store them at every k).
@numba.njit(cache=True, fastmath=True, inline="always")
def _panel_tile(x, panel, out, m, rows, k0, k1, flat, ahead, t, passes):
    """out[m:m + rows, :64] (rows <= 6) += x[m:m + rows, k0:k1] @ panel[k0:k1] (from zero
    when k0 is 0): 6 rows by 4 vectors of accumulators in registers; with fewer rows the
    last one is computed again in the spare slots (the stores repeat it)."""
    m0, m1, m2 = m, m + min(1, rows - 1), m + min(2, rows - 1)
    m3, m4, m5 = m + min(3, rows - 1), m + min(4, rows - 1), m + min(5, rows - 1)
    if k0 == 0:
        y00 = y01 = y02 = y03 = y10 = y11 = y12 = y13 = y20 = y21 = y22 = y23 = splat(0.0)
        y30 = y31 = y32 = y33 = y40 = y41 = y42 = y43 = y50 = y51 = y52 = y53 = splat(0.0)
    else:
        (y00, y01, y02, y03), (y10, y11, y12, y13), (y20, y21, y22, y23) = load4(out[m0]), load4(out[m1]), load4(out[m2])
        (y30, y31, y32, y33), (y40, y41, y42, y43), (y50, y51, y52, y53) = load4(out[m3]), load4(out[m4]), load4(out[m5])
    last = flat.shape[0] - 1
    for k in range(k0, k1):
        _fetch(flat, min(ahead + k, last), t, passes)
        w0, w1, w2, w3 = load(panel, (k, 0)), load(panel, (k, 16)), load(panel, (k, 32)), load(panel, (k, 48))
        y00, y01, y02, y03 = fma4(x[m0, k], w0, w1, w2, w3, y00, y01, y02, y03)
        y10, y11, y12, y13 = fma4(x[m1, k], w0, w1, w2, w3, y10, y11, y12, y13)
        y20, y21, y22, y23 = fma4(x[m2, k], w0, w1, w2, w3, y20, y21, y22, y23)
        y30, y31, y32, y33 = fma4(x[m3, k], w0, w1, w2, w3, y30, y31, y32, y33)
        y40, y41, y42, y43 = fma4(x[m4, k], w0, w1, w2, w3, y40, y41, y42, y43)
        y50, y51, y52, y53 = fma4(x[m5, k], w0, w1, w2, w3, y50, y51, y52, y53)
    store4(out[m5], y50, y51, y52, y53)  # last to first: a repeated row ends with its first slot's sums
    store4(out[m4], y40, y41, y42, y43)
    store4(out[m3], y30, y31, y32, y33)
    store4(out[m2], y20, y21, y22, y23)
    store4(out[m1], y10, y11, y12, y13)
    store4(out[m0], y00, y01, y02, y03)


@numba.njit(cache=True, fastmath=True, inline="always")
def _panel_tile3(x, panel, out, m, rows, k0, k1, flat, ahead, t, passes):
    """``_panel_tile`` for at most 3 rows (the last computed again in spare slots): half its
    multiply-adds."""
    m1, m2 = m + min(1, rows - 1), m + min(2, rows - 1)
    if k0 == 0:
        y00 = y01 = y02 = y03 = y10 = y11 = y12 = y13 = y20 = y21 = y22 = y23 = splat(0.0)
    else:
        (y00, y01, y02, y03), (y10, y11, y12, y13), (y20, y21, y22, y23) = load4(out[m]), load4(out[m1]), load4(out[m2])
    last = flat.shape[0] - 1
    for k in range(k0, k1):
        _fetch(flat, min(ahead + k, last), t, passes)
        w0, w1, w2, w3 = load(panel, (k, 0)), load(panel, (k, 16)), load(panel, (k, 32)), load(panel, (k, 48))
        y00, y01, y02, y03 = fma4(x[m, k], w0, w1, w2, w3, y00, y01, y02, y03)
        y10, y11, y12, y13 = fma4(x[m1, k], w0, w1, w2, w3, y10, y11, y12, y13)
        y20, y21, y22, y23 = fma4(x[m2, k], w0, w1, w2, w3, y20, y21, y22, y23)
    store4(out[m2], y20, y21, y22, y23)  # last to first, as in _panel_tile
    store4(out[m1], y10, y11, y12, y13)
    store4(out[m], y00, y01, y02, y03)


@numba.njit(cache=True, fastmath=True, inline="always")
def _narrow_tile(x, panel, out, m, rows, k0, k1, flat, ahead, t):
    """``_panel_tile`` for a panel of one vector (LANES features): 6 rows by 1 vector of
    accumulators, 12 of AVX2's 16 registers. A panel row is one cache line: the first pass
    over a chunk prefetches it."""
    m0, m1, m2 = m, m + min(1, rows - 1), m + min(2, rows - 1)
    m3, m4, m5 = m + min(3, rows - 1), m + min(4, rows - 1), m + min(5, rows - 1)
    if k0 == 0:
        y0 = y1 = y2 = y3 = y4 = y5 = splat(0.0)
    else:
        y0, y1, y2 = load(out, (m0, 0)), load(out, (m1, 0)), load(out, (m2, 0))
        y3, y4, y5 = load(out, (m3, 0)), load(out, (m4, 0)), load(out, (m5, 0))
    last = flat.shape[0] - 1
    for k in range(k0, k1):
        if t == 0:
            prefetch(flat, min(ahead + k, last), 0)
        w = load(panel, (k, 0))
        y0 = fma(splat(x[m0, k]), w, y0)
        y1 = fma(splat(x[m1, k]), w, y1)
        y2 = fma(splat(x[m2, k]), w, y2)
        y3 = fma(splat(x[m3, k]), w, y3)
        y4 = fma(splat(x[m4, k]), w, y4)
        y5 = fma(splat(x[m5, k]), w, y5)
    store(out, (m5, 0), y5)  # last to first, as in _panel_tile
    store(out, (m4, 0), y4)
    store(out, (m3, 0), y3)
    store(out, (m2, 0), y2)
    store(out, (m1, 0), y1)
    store(out, (m0, 0), y0)


@numba.njit(cache=True, parallel=True, fastmath=True)
def rows_times_panels(x: np.ndarray, panels: np.ndarray, out: np.ndarray, best: np.ndarray) -> None:
    """out[m, n] = sum over k of x[m, k] * w[n, k], with w given as ``panels_of(w)`` [P, K,
    width]: x float32 [M, K], out float32 [M, P * width] (features past N come out 0). Unless
    ``best`` is empty, best[m, p] is the largest of out[m, p * width : (p + 1) * width], taken
    while the panel's outputs are in L1 (``first_argmax`` finishes an argmax from it).

    Vectors run along the output features: a tile of 6 input rows by one panel's features
    (64 in 24 AVX-512 registers, or 16 in 12 of AVX2's) gathers k's products with each panel
    row loaded once and each input value broadcast once, so no sum ends horizontally. A task
    is one panel (147 KB at K = 576 and 64 features), taken CHUNK_BYTES of it at a time by
    every tile of rows in turn, so a chunk is read from memory once and served from L1 to the
    other tiles; while they compute, the tiles prefetch the panel rows AHEAD_BYTES on, a share
    per pass, so the stream from memory overlaps the arithmetic. 30 matrices of 1536 x 576
    (``tools/bench_kernel.py``'s weights table) took 2.6 ms for 1 row, 3.4 ms for 17 and
    10.0 ms for 65 on the 2-core Zen 5 VM (AVX-512), against 3.0, 5.3 and 16.0 ms with dot
    products along k on the weights as the model holds them; with AVX2 code on a 2-core Zen
    4 VM, 16-feature panels took 3.7, 5.8 and 17.9 ms against 4.5, 10.9 and 38.8 (and 64-
    feature ones, whose tiles spill AVX2's registers, 5.4, 15.1 and 56.2).
    """
    m_rows, k_len = x.shape
    width = panels.shape[2]
    flat = panels.reshape(panels.shape[0] * k_len, width)
    passes = (m_rows + TILE - 1) // TILE
    chunk, distance = CHUNK_BYTES // (4 * width), AHEAD_BYTES // (4 * width)  # in panel rows
    for p in numba.prange(panels.shape[0]):
        panel = panels[p]
        o = out[:, p * width : (p + 1) * width]
        ahead = p * k_len + distance
        for k0 in range(0, k_len, chunk):
            k1 = min(k_len, k0 + chunk)
            for t in range(passes):
                m = t * TILE
                rows = min(TILE, m_rows - m)
                if width == LANES:
                    _narrow_tile(x, panel, o, m, rows, k0, k1, flat, ahead, t)
                    continue
                # A last tile of 1-3 rows after full ones takes the 3-row tile: past 6 rows
                # the multiply-adds outweigh the stream of weights, so half of them is time
                # saved (13-15 and 19 rows took 8-15% less, 7-9 rows 3-7%, in two runs over
                # 30 matrices of 1536 x 576 on the 2-core Zen 5 VM). Alone, or for 4-5 rows,
                # the full tile was as fast or faster (1-4 rows alone in narrow tiles: +17%).
                if t == 0 or rows > 3:
                    _panel_tile(x, panel, o, m, rows, k0, k1, flat, ahead, t, passes)
                else:
                    _panel_tile3(x, panel, o, m, rows, k0, k1, flat, ahead, t, passes)
        if best.shape[0]:
            for m in range(m_rows):
                if width == LANES:
                    best[m, p] = largest(load(o, (m, 0)))
                else:
                    v0, v1, v2, v3 = load4(o[m])
                    best[m, p] = largest(maximum(maximum(v0, v1), maximum(v2, v3)))


@numba.njit(cache=True)
def first_argmax(out: np.ndarray, best: np.ndarray, n: int, width: int, index: np.ndarray) -> None:
    """index[m] = the first n' < n with out[m, n'] the largest of out[m, :n], given best [M, P]
    from ``rows_times_panels`` on panels ``width`` features wide: the first panel holding the
    row's largest value, then the first feature in it that equals it (features past n, the
    last panel's padding, excluded: ``out`` may come with or without them)."""
    panels = best.shape[1]
    last = panels - 1
    for m in range(out.shape[0]):
        if last * width + width > n:  # the padding's zeros are no candidates
            top = out[m, last * width]
            for j in range(last * width + 1, n):
                top = max(top, out[m, j])
            best[m, last] = top
        p = 0
        for q in range(1, panels):
            if best[m, q] > best[m, p]:
                p = q
        index[m] = p * width
        for j in range(p * width, min(n, p * width + width)):
            if out[m, j] == best[m, p]:
                index[m] = j
                break


def multiply(x: np.ndarray, weight: np.ndarray, best: np.ndarray = NO_MAXIMA,
             features: int | None = None) -> np.ndarray:
    """x float32 [M, K] times a layer's weight held as ``panels_of`` it (``rows_times_panels``,
    filling ``best`` [M, panels] with each panel's row maxima unless it is empty): [M, panels
    * width], or [M, N] if ``features`` is N (the padding's columns cut off)."""
    out = np.empty((x.shape[0], weight.shape[0] * weight.shape[2]), np.float32)
    rows_times_panels(x, weight, out, best)
    if features is not None and features != out.shape[1]:
        out = np.ascontiguousarray(out[:, :features])
    return out


def skinny_linear(x: torch.Tensor, weight: np.ndarray, bias: torch.Tensor | None,
                  features: int | None = None, best: np.ndarray = NO_MAXIMA) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for float32 CPU ``x`` [..., K] with at most MAX_ROWS rows;
    ``weight`` is ``panels_of`` w [N, K], ``features`` N (``best``, unless empty, gets each
    panel's row maxima: ``multiply``)."""
    # numpy on both sides of the call: a forward makes 211 of them, and torch's reshape, empty
    # and view cost 10 us a call here against 5 (0.6 ms of a 1-token forward on the Xeon VM)
    xs = (x if x.is_contiguous() else x.contiguous()).numpy()
    out = multiply(xs.reshape(-1, xs.shape[-1]), weight, best, features)
    y = torch.from_numpy(out.reshape(xs.shape[:-1] + out.shape[1:]))
    if bias is not None:
        y += bias
    return y


def eligible(module: torch.nn.Module) -> bool:
    """Whether ``skinny_linears`` patches ``module``: a float32 CPU ``nn.Linear`` with a contiguous weight."""
    if not isinstance(module, torch.nn.Linear):
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()


def serves(model: torch.nn.Module) -> bool:
    """Whether ``skinny_linears`` sends any of ``model``'s layers through the kernel (float32
    linear layers on a CPU)."""
    return any(eligible(m) for m in model.modules())


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
        # linear_argmax's request to the layer it calls, and the layer's (output, argmax)
        self.asked: torch.nn.Module | None = None
        self.found: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kernel_rows = np.ones(MAX_ROWS + 1, bool)
        self.layers = True  # whether decode.decoder_layers' pass runs the layers it serves (off: A/B timing)
        self.most = torch.get_num_threads(), numba.get_num_threads()
        self.threads = 0  # the free cores the pools were last set for

    def __enter__(self) -> "KernelSettings":
        self.update()
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            torch.set_num_threads(self.most[0])
            numba.set_num_threads(self.most[1])

    def takes(self, x: torch.Tensor) -> bool:
        """Whether a linear layer sends ``x`` (its input) through the kernel rather than ``F.linear``."""
        rows = x.numel() // max(1, x.shape[-1])
        return x.dtype == torch.float32 and rows <= MAX_ROWS and not x.requires_grad and bool(self.kernel_rows[rows])

    def update(self) -> None:
        if not self.active:
            return
        free = free_cores().count()
        if free != self.threads:
            self.threads = free
            torch.set_num_threads(min(self.most[0], free))
            numba.set_num_threads(min(self.most[1], free))


_panels: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # nn.Linear -> (its weight's stamp, panels)


def weight_stamp(weight: torch.Tensor) -> tuple:
    """What changes when a weight does: its storage, its shape, or (outside inference mode)
    its version counter, which a load or an optimizer step moves."""
    return weight.data_ptr(), tuple(weight.shape), None if weight.is_inference() else weight._version


def held_weight(module: torch.nn.Linear) -> np.ndarray:
    """A float32 CPU linear layer's weight as the kernel takes it: its ``panels_of`` (a copy,
    made once per layer and kept while the layer lives; made again when the weight's storage,
    shape or version counter changed: a load or an optimizer step in between)."""
    w = module.weight.detach()
    stamp = weight_stamp(module.weight)
    held = _panels.get(module)
    if held is None or held[0] != stamp:
        held = _panels[module] = (stamp, panels_of(w.numpy()))
    return held[1]


_stacks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # first nn.Linear of a stack -> (key, panels)


def held_stack(modules: tuple[torch.nn.Linear, ...]) -> np.ndarray | None:
    """The panels of linear layers that take the same input (a decoder layer's query, key and
    value projections), one layer's after another in one array [their panels, K, PANEL], so
    one kernel call computes all their outputs (layer i's at columns PANEL * (panels before
    it) on: ``stack_columns``). Each layer's ``held_weight`` becomes its view into the stack,
    so it costs no memory beyond the panels; made again when a weight changed
    (``weight_stamp``). None where a layer is not ``eligible``.

    Why: a kernel call costs 5-10 us around its arithmetic, and a layer of few panels leaves a
    thread idle (a key projection's 3 panels on 2 threads); on the 2-core Zen 5 VM, SmolLM2-
    135M's 30 q/k/v stacks took 2.09, 2.67 and 7.63 ms for 1, 17 and 65 rows against 2.38,
    3.22 and 8.58 as 90 calls."""
    if not all(eligible(m) for m in modules) or len({m.in_features for m in modules}) != 1:
        return None
    key = (tuple(map(id, modules)), tuple(weight_stamp(m.weight) for m in modules))
    held = _stacks.get(modules[0])
    if held is None or held[0] != key:
        panels = np.concatenate([held_weight(m) for m in modules])
        at = 0
        for m in modules:
            stamp, own = _panels[m]
            _panels[m] = (stamp, panels[at : at + own.shape[0]])
            at += own.shape[0]
        held = _stacks[modules[0]] = (key, panels)
    return held[1]


def stack_columns(modules: tuple[torch.nn.Linear, ...]) -> list[slice]:
    """Where each layer's outputs lie among the columns of a ``held_stack`` product."""
    out, at = [], 0
    for m in modules:
        out.append(slice(at, at + m.out_features))
        at += -(-m.out_features // PANEL) * PANEL
    return out


_blocks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its outermost block's settings
_routed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # patched nn.Linear -> its block's settings


@contextlib.contextmanager
def skinny_linears(model: torch.nn.Module) -> Iterator[KernelSettings]:
    """Within the block, the model's float32 CPU linear layers compute inputs of at most
    MAX_ROWS rows with the kernel (on ``held_weight``) where the yielded
    ``KernelSettings`` say so (``kernel_rows``; a no-op on other devices and dtypes), on the
    threads they set.

    A block within another for the same model (the cost curve is measured inside a generate
    call) yields the enclosing block's settings and leaves patching and restoring to it."""
    if model in _blocks:
        yield _blocks[model]
        return
    patched = [m for m in model.modules() if eligible(m) and "forward" not in vars(m)]
    settings = KernelSettings(bool(patched))
    for module in patched:
        weight = held_weight(module)

        def forward(x: torch.Tensor, module=module, weight=weight) -> torch.Tensor:
            if not settings.takes(x):
                return F.linear(x, module.weight, module.bias)
            if settings.asked is module and module.bias is None:
                settings.found = _panels_argmax(x, weight, module.out_features)
                return settings.found[0]
            return skinny_linear(x, weight, module.bias, module.out_features)

        module.forward = forward
        _routed[module] = settings
    _blocks[model] = settings
    try:
        with settings:
            yield settings
    finally:
        del _blocks[model]
        for module in patched:
            del module.forward
            _routed.pop(module, None)


def linear_argmax(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``module(x)`` [..., N] and the index of each row's first largest value, int64 [...]
    (``.max(-1).indices``). Where ``skinny_linears`` sends ``x`` through the panel kernel, the
    maxima come from its tiles while they sit in L1, sparing a pass over the outputs from
    memory: for an LM head over a 49152-token vocabulary, 0.5 ms at 17 rows, 1.2 at 65. The
    module is called as usual (its hooks run; one that replaces the output gets its max)."""
    settings = _routed.get(module)
    if settings is not None:
        settings.asked, settings.found = module, None
    try:
        y = module(x)
    finally:
        found = None
        if settings is not None:
            found, settings.asked, settings.found = settings.found, None, None
    if found is not None and found[0] is y:
        return y, found[1]
    return y, y.max(-1).indices


def _panels_argmax(x: torch.Tensor, panels: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``skinny_linear(x, panels, None, n)`` and its rows' first maxima (``first_argmax``)."""
    rows = x.numel() // x.shape[-1]
    best = np.empty((rows, panels.shape[0]), np.float32)
    y = skinny_linear(x, panels, None, n, best)
    index = np.empty(rows, np.int64)
    first_argmax(y.numpy().reshape(rows, n), best, n, panels.shape[2], index)  # reads only the first n features
    return y, torch.from_numpy(index).view(x.shape[:-1])
