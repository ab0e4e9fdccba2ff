"""Attention for a few query rows on a CPU: one lean pass per key/value head.

A tree forward attends 1 + n query rows per head (packed with their group's other heads:
``tree_attention.packed_sdpa``) over a cache of hundreds to thousands of entries. PyTorch's
CPU SDPA is built for long queries: it splits them into blocks, calls BLAS on each and
threads over (head, block) pairs, which leaves two cores idle at these shapes and calls a
BLAS that runs AVX2 code on AMD CPUs. On a 2-core Zen 5 VM at a 1024-token context it spent
0.39 ms per layer on 9 query rows (27 packed), where the arithmetic is 21 MFLOP. Here the
scores, the softmax and the weighted sum of values run as one Numba pass per (head, 3 query
rows), all tasks in parallel. The sums are the same in another order (and the exponential a
polynomial accurate to a float32 ulp), so results agree with SDPA to float32 rounding.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

MAX_QUERY_ROWS = 512  # above (a prompt's prefill), SDPA: its blocks suit long queries, and the scores would be large
ROWS = 3  # query rows per task: their value accumulators (3 x 64 floats) take 12 of AVX-512's 32 registers
LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)  # ln 2 split so that n * LN2_HI is exact for |n| < 2 ** 11
LN2_LO = np.float32(-2.12194440e-4)
LOWEST = np.float32(-87.0)  # exp(-87) is float32's smallest normal; below it a weight is 0 to rounding
# fast math without "no infinities, no NaNs": a mask's -inf must stay -inf and weigh 0
FAST = {"contract", "reassoc", "nsz", "arcp", "afn"}


@intrinsic
def _bits_to_float32(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a bitcast: no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@numba.njit(cache=True, fastmath=FAST, inline="always")
def exp_nonpositive(x: float) -> float:
    """exp(x) for float32 x <= 0 (0 below LOWEST, -inf included), as straight-line arithmetic that a loop
    vectorizes (``math.exp`` would be a call per value: 2.2 ns each against ~0.2 here).
    2 ** k from its bits; e ** f for |f| <= ln 2 / 2 by a degree-7 Taylor polynomial,
    truncation error below 1e-8 relative."""
    low = x < LOWEST
    x = max(x, LOWEST)
    k = np.floor(x * LOG2E + np.float32(0.5))
    f = x - k * LN2_HI - k * LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * f + np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    e = p * _bits_to_float32((np.int32(k) + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if low else e


def _stack_rows(dim: int):
    """An intrinsic giving a zeroed float32 [ROWS, dim] array on the stack: with its shape a
    constant, LLVM keeps it in vector registers (a heap array, or the output, could alias
    the inputs and would be loaded and stored at every key)."""

    @intrinsic
    def stack_rows(typingctx):
        array_type = types.Array(types.float32, 2, "C")

        def codegen(context, builder, signature, args):
            count = ROWS * dim
            data = cgutils.alloca_once(builder, context.get_value_type(types.float32), size=count)
            cgutils.memset(builder, data, context.get_constant(types.intp, 4 * count), 0)
            array = context.make_array(array_type)(context, builder)
            intp = lambda i: context.get_constant(types.intp, i)  # noqa: E731
            context.populate_array(array, data=data, shape=[intp(ROWS), intp(dim)], strides=[intp(4 * dim), intp(4)],
                                   itemsize=intp(4), meminfo=None)
            return array._getvalue()

        return array_type(), codegen

    return stack_rows


@numba.njit(cache=True, fastmath=FAST, inline="always")
def _task(q, k, v, mask, scale, scores, out, t, dim, acc):
    """Task t of ``few_rows_attention``: its head's ROWS query rows (fewer in the last
    chunk), with ``dim`` a constant once inlined and ``acc`` a [ROWS, dim] stack array."""
    rows = q.shape[1]
    length = mask.shape[1]
    chunks = (rows + ROWS - 1) // ROWS
    h = t // chunks
    r0 = (t % chunks) * ROWS
    n = min(ROWS, rows - r0)
    s = scores[h]
    for i in range(n):  # scores: each query row against every key
        for j in range(length):
            a = np.float32(0.0)
            for d in range(dim):
                a += q[h, r0 + i, d] * k[h, j, d]
            s[r0 + i, j] = a * scale + mask[r0 + i, j]
    totals = (np.float32(0.0), np.float32(0.0), np.float32(0.0))
    for i in range(n):  # softmax numerators in place, and their sums
        r = r0 + i
        top = s[r, 0]
        for j in range(1, length):
            top = max(top, s[r, j])
        total = np.float32(0.0)
        for j in range(length):
            e = exp_nonpositive(s[r, j] - top)
            s[r, j] = e
            total += e
        totals = (total if i == 0 else totals[0], total if i == 1 else totals[1], total if i == 2 else totals[2])
    if n == ROWS:  # the weighted sum of values: each value row read once for the three query rows
        for j in range(length):
            p0, p1, p2 = s[r0, j], s[r0 + 1, j], s[r0 + 2, j]
            for d in range(dim):
                x = v[h, j, d]
                acc[0, d] += p0 * x
                acc[1, d] += p1 * x
                acc[2, d] += p2 * x
    else:
        for i in range(n):
            for j in range(length):
                p = s[r0 + i, j]
                for d in range(dim):
                    acc[i, d] += p * v[h, j, d]
    for i in range(n):
        inv = np.float32(1.0) / totals[i]
        for d in range(dim):
            out[h, r0 + i, d] = acc[i, d] * inv


_stack_rows_64 = _stack_rows(64)
_stack_rows_128 = _stack_rows(128)


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _attention_64(q, k, v, mask, scale, scores, out):
    for t in numba.prange(q.shape[0] * ((q.shape[1] + ROWS - 1) // ROWS)):
        _task(q, k, v, mask, scale, scores, out, t, 64, _stack_rows_64())


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _attention_128(q, k, v, mask, scale, scores, out):
    for t in numba.prange(q.shape[0] * ((q.shape[1] + ROWS - 1) // ROWS)):
        _task(q, k, v, mask, scale, scores, out, t, 128, _stack_rows_128())


# one kernel per head size (loops of a constant length); other head sizes go to SDPA
HEAD_DIMS = {64: _attention_64, 128: _attention_128}


def few_rows_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float,
                       scores: np.ndarray, out: np.ndarray) -> None:
    """out[h, r] = softmax(scale * q[h, r] . k[h, j] + mask[r, j] over j) . v[h, j].

    q [H, R, D] (D in HEAD_DIMS), k and v [H, L, D] C-contiguous (L >= the mask's columns;
    the first mask.shape[1] keys count), mask float32 [R, L'] additive (very negative or
    -inf: masked), scores float32 [H, R, L'] scratch, out float32 [H, R, D]. Every row must
    see at least one key (a tree row always sees the cache and itself). Tasks are (head,
    ROWS query rows), in parallel.
    """
    HEAD_DIMS[q.shape[2]](q, k, v, mask, np.float32(scale), scores, out)


def serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``attend`` takes these inputs: float32 on a CPU, one sequence of at most
    MAX_QUERY_ROWS query rows, a head size in HEAD_DIMS, an additive float32 mask [1, 1, R, L]
    with L at most the keys given."""
    return (query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.float32
            and mask is not None and mask.dtype == torch.float32 and query.dim() == 4 and query.shape[0] == 1
            and query.shape[2] <= MAX_QUERY_ROWS and query.shape[-1] in HEAD_DIMS
            and mask.dim() == 4 and mask.shape[:2] == (1, 1) and mask.shape[2] == query.shape[2]
            and mask.shape[3] <= min(key.shape[2], value.shape[2]))


def _whole(t: torch.Tensor) -> np.ndarray:
    """Keys or values [1, H, L, D] as a C-contiguous array [H, L', D] with L' >= L: the cache
    buffer a view of its first L rows lives in (no copy), else a copy."""
    _, heads, _, dim = t.shape
    stride = t.stride()
    if not t.is_contiguous() and stride[3] == 1 and stride[2] == dim and stride[1] % dim == 0:
        rows = stride[1] // dim
        if (t.storage_offset() + heads * rows * dim) * t.element_size() <= t.untyped_storage().nbytes():
            return t.as_strided((heads, rows, dim), (rows * dim, dim, 1)).numpy()
    return t[0].contiguous().numpy()


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
           scale: float) -> torch.Tensor:
    """SDPA for query [1, H, R, D] over key and value [1, H, L, D] with an additive mask
    [1, 1, R, L'] (L' <= L: the first L' keys count) shared by the heads: [1, H, R, D]. See
    ``serves`` for what it takes."""
    _, heads, rows, dim = query.shape
    length = mask.shape[-1]
    m = mask[0, 0]
    m = (m if m.stride(-1) == 1 else m.contiguous()).numpy()
    scores = np.empty((heads, rows, length), np.float32)
    out = np.empty((heads, rows, dim), np.float32)
    few_rows_attention(query[0].contiguous().numpy(), _whole(key), _whole(value), m, scale, scores, out)
    return torch.from_numpy(out)[None]
