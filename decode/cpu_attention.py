"""Attention for a few query rows on a CPU: lean Numba passes per key/value head.

A tree forward attends 1 + n query rows per head (packed with their group's other heads:
``tree_attention.packed_sdpa``) over a cache of hundreds to thousands of entries. PyTorch's
CPU SDPA is built for long queries: it splits them into blocks, calls BLAS on each and
threads over (head, block) pairs, which leaves two cores idle at these shapes and calls a
BLAS that runs AVX2 code on AMD CPUs. On a 2-core Zen 5 VM at a 1024-token context it spent
0.39 ms per layer on 9 query rows (27 packed), where the arithmetic is 21 MFLOP.

Two kernels, each one pass of scores, softmax and weighted sum of values per task, all tasks
in parallel:

- few rows (at most FEW per head: a step with no or few drafts): a task is (head, 3 query
  rows); scores are dot products along the head's features, the three rows' value sums
  stay in registers (on AVX-512; AVX2 spills some, and still beats SDPA there);
- row blocks (more rows): a task is (head, 16 query rows), one vector's lanes. Its scores
  run along the rows, keys broadcast against the block's transposed queries, so no dot
  product ends in a horizontal sum; softmax and the value sums are vector code
  (``decode.simd``). It reads the mask transposed ([keys, rows]: ``transposed_mask``, made
  once per forward by the caller). Its tiles take 8 keys of scores and value sums of 4 rows
  by 64 features on AVX-512, 4 keys and 4 rows by 16 features where the registers are
  AVX2's 16 (``narrow_row_block_attention``).

The sums are the same in another order (and the exponential a polynomial accurate to a
float32 ulp), so results agree with SDPA to float32 rounding.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from retrodraft.decode.simd import (LANES, WIDE_REGISTERS, add, exp_nonpositive, fma, fma4, lanes_sum, largest, load,
                                    load4, maximum, mul, splat, store, store4, sub)

# above (a whole prompt in one forward), SDPA: its blocks suit long queries, and the scores would be large
MAX_QUERY_ROWS = 512
ROWS = 3  # query rows per few-rows task: their value accumulators (3 x 64 floats) take 12 of AVX-512's 32 registers
# query rows per head up to which the few-rows kernel runs (Zen 5 VM: the two tie at 9, row blocks lead
# at 15; AVX2 code on a Zen 4 VM: few rows lead at 3 and 6, the narrow row blocks from 9)
FEW = 8
BLOCK = LANES  # query rows per row-block task
KEYS = 8  # keys per score tile of a row block: 8 accumulators, one vector of queries loaded per feature
# fast math without "no infinities, no NaNs": a mask's -inf must stay -inf and weigh 0
FAST = {"contract", "reassoc", "nsz", "arcp", "afn"}


def padded(n: int, multiple: int = LANES) -> int:
    """n rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


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
        for j in range(length, s.shape[1]):  # to whole vectors: padding that weighs 0
            s[r0 + i, j] = -np.inf
    totals = (np.float32(0.0), np.float32(0.0), np.float32(0.0))
    for i in range(n):  # softmax numerators in place, and their sums, a vector at a time
        r = r0 + i
        top = splat(-np.inf)
        for j in range(0, s.shape[1], LANES):
            top = maximum(top, load(s, (r, j)))
        top = splat(largest(top))
        sums = splat(0.0)
        for j in range(0, s.shape[1], LANES):
            e = exp_nonpositive(sub(load(s, (r, j)), top))
            store(s, (r, j), e)
            sums = add(sums, e)
        total = lanes_sum(sums)
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
    -inf: masked), scores float32 [H, R, padded(L')] scratch, out float32 [H, R, D]. Every
    row must see at least one key (a tree row always sees the cache and itself). Tasks are
    (head, ROWS query rows), in parallel.
    """
    HEAD_DIMS[q.shape[2]](q, k, v, mask, np.float32(scale), scores, out)


@numba.njit(cache=True, fastmath=FAST, inline="always")
def _scored(s, mask_t, j, x, scale, top):
    """Row j of the block's scores from its accumulated dot products: scaled, masked, kept,
    and the running maximum per row."""
    x = fma(x, scale, load(mask_t, (j, 0)))
    store(s, (j, 0), x)
    return maximum(top, x)


@numba.njit(cache=True, fastmath=FAST, inline="always")
def _keys4(k, h, j, d, x, a0, a1, a2, a3):
    """Feature d of keys j .. j + 3 of head h, each broadcast against the block's queries'
    ``x``, added to the keys' accumulators."""
    return (fma(splat(k[h, j, d]), x, a0), fma(splat(k[h, j + 1, d]), x, a1),
            fma(splat(k[h, j + 2, d]), x, a2), fma(splat(k[h, j + 3, d]), x, a3))


@numba.njit(cache=True, fastmath=FAST, inline="always")
def _scored4(s, mask_t, j, a0, a1, a2, a3, scale, top):
    """``_scored`` for rows j .. j + 3 of the block's scores."""
    top = _scored(s, mask_t, j, a0, scale, top)
    top = _scored(s, mask_t, j + 1, a1, scale, top)
    top = _scored(s, mask_t, j + 2, a2, scale, top)
    return _scored(s, mask_t, j + 3, a3, scale, top)


@numba.njit(cache=True, fastmath=FAST, inline="always")
def _normalized(out, h, r, c, totals, q, y0, y1, y2, y3):
    """Store 64 features of block row q (row r of the output, if it is one) over its total."""
    if r < out.shape[1]:
        inv = splat(np.float32(1.0) / totals[q])
        store4(out[h, r, c:], mul(y0, inv), mul(y1, inv), mul(y2, inv), mul(y3, inv))


@numba.njit(cache=True, fastmath=FAST, inline="always")
def _block(q, k, v, mask_t, scale, s, out, h, r0, narrow):
    """Rows r0 .. r0 + BLOCK of head h (fewer real ones in the last block; the rest are
    computed on zero queries and not stored). ``s``: the block's scores [L, BLOCK], keys
    by rows, a view of the scratch. ``narrow`` (a constant once inlined): tiles that fit
    AVX2's 16 registers, 4 keys of scores and value sums of 4 rows by 16 features."""
    rows, dim = q.shape[1:]
    length = mask_t.shape[0]
    qt = np.zeros((dim, BLOCK), np.float32)  # the block's queries, transposed: a vector per feature
    for i in range(min(BLOCK, rows - r0)):
        for d in range(dim):
            qt[d, i] = q[h, r0 + i, d]
    top = splat(-np.inf)
    j = 0
    # scores, a tile of keys at a time: each key's features broadcast against the queries
    while narrow and j + 4 <= length:
        a0 = a1 = a2 = a3 = splat(0.0)
        for d in range(dim):
            a0, a1, a2, a3 = _keys4(k, h, j, d, load(qt, (d, 0)), a0, a1, a2, a3)
        top = _scored4(s, mask_t, j, a0, a1, a2, a3, scale, top)
        j += 4
    while not narrow and j + KEYS <= length:
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = splat(0.0)
        for d in range(dim):
            x = load(qt, (d, 0))
            a0, a1, a2, a3 = _keys4(k, h, j, d, x, a0, a1, a2, a3)
            a4, a5, a6, a7 = _keys4(k, h, j + 4, d, x, a4, a5, a6, a7)
        top = _scored4(s, mask_t, j, a0, a1, a2, a3, scale, top)
        top = _scored4(s, mask_t, j + 4, a4, a5, a6, a7, scale, top)
        j += KEYS
    for j in range(j, length):
        a0 = splat(0.0)
        for d in range(dim):
            a0 = fma(splat(k[h, j, d]), load(qt, (d, 0)), a0)
        top = _scored(s, mask_t, j, a0, scale, top)
    sums = splat(0.0)
    for j in range(length):  # softmax numerators in place, and their sums
        e = exp_nonpositive(sub(load(s, (j, 0)), top))
        store(s, (j, 0), e)
        sums = add(sums, e)
    totals = np.empty(BLOCK, np.float32)
    store(totals, (0,), sums)
    for b in range(0, min(BLOCK, rows - r0) if narrow else 0, 4):  # weighted sums of values: 4 rows by 16 features
        for c in range(0, dim, LANES):
            y0 = y1 = y2 = y3 = splat(0.0)
            for j in range(length):
                x = load(v[h, j], (c,))
                y0 = fma(splat(s[j, b]), x, y0)
                y1 = fma(splat(s[j, b + 1]), x, y1)
                y2 = fma(splat(s[j, b + 2]), x, y2)
                y3 = fma(splat(s[j, b + 3]), x, y3)
            for i, y in ((0, y0), (1, y1), (2, y2), (3, y3)):
                if r0 + b + i < out.shape[1]:
                    store(out[h, r0 + b + i], (c,), mul(y, splat(np.float32(1.0) / totals[b + i])))
    for b in range(0, 0 if narrow else min(BLOCK, rows - r0), 4):  # weighted sums of values: 4 rows by 64 features
        for c in range(0, dim, 64):
            y00 = y01 = y02 = y03 = y10 = y11 = y12 = y13 = splat(0.0)
            y20 = y21 = y22 = y23 = y30 = y31 = y32 = y33 = splat(0.0)
            for j in range(length):
                x0, x1, x2, x3 = load4(v[h, j, c:])
                y00, y01, y02, y03 = fma4(s[j, b], x0, x1, x2, x3, y00, y01, y02, y03)
                y10, y11, y12, y13 = fma4(s[j, b + 1], x0, x1, x2, x3, y10, y11, y12, y13)
                y20, y21, y22, y23 = fma4(s[j, b + 2], x0, x1, x2, x3, y20, y21, y22, y23)
                y30, y31, y32, y33 = fma4(s[j, b + 3], x0, x1, x2, x3, y30, y31, y32, y33)
            _normalized(out, h, r0 + b, c, totals, b, y00, y01, y02, y03)
            _normalized(out, h, r0 + b + 1, c, totals, b + 1, y10, y11, y12, y13)
            _normalized(out, h, r0 + b + 2, c, totals, b + 2, y20, y21, y22, y23)
            _normalized(out, h, r0 + b + 3, c, totals, b + 3, y30, y31, y32, y33)


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def row_block_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask_t: np.ndarray, scale: float,
                        scores: np.ndarray, out: np.ndarray) -> None:
    """``few_rows_attention``'s result with tasks of (head, BLOCK query rows), in parallel:
    q [H, R, D] (D a multiple of 64), k and v as there, mask_t float32 [L', padded(R)] (the
    mask transposed, zero in its padding: ``transposed_mask``), scores float32
    [H, padded(R) / BLOCK, L', BLOCK] scratch, out float32 [H, R, D]."""
    blocks = scores.shape[1]
    scale = splat(scale)
    for t in numba.prange(q.shape[0] * blocks):
        h, b = t // blocks, t % blocks
        _block(q, k, v, mask_t[:, b * BLOCK : (b + 1) * BLOCK], scale, scores[h, b], out, h, b * BLOCK, False)


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def narrow_row_block_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask_t: np.ndarray, scale: float,
                               scores: np.ndarray, out: np.ndarray) -> None:
    """``row_block_attention`` in tiles that fit AVX2's 16 registers (its own spill there). With
    AVX2 code on a 2-core Zen 4 VM, 3 heads over 1024 keys, interleaved: 0.095 / 0.178 /
    0.359 ms at 9 / 27 / 51 query rows against SDPA's 0.115 / 0.248 / 0.415 (torch's AVX2
    kernels) and the AVX-512 tiles' 0.152 / 0.263 / 0.519."""
    blocks = scores.shape[1]
    scale = splat(scale)
    for t in numba.prange(q.shape[0] * blocks):
        h, b = t // blocks, t % blocks
        _block(q, k, v, mask_t[:, b * BLOCK : (b + 1) * BLOCK], scale, scores[h, b], out, h, b * BLOCK, True)


ROW_BLOCK_KERNEL = row_block_attention if WIDE_REGISTERS else narrow_row_block_attention


def transposed_mask(mask: torch.Tensor) -> np.ndarray:
    """An additive mask [1, 1, R, L] as ``row_block_attention`` reads it: float32
    [L, padded(R)], keys by rows, zero in the padding. Every layer of a forward attends with
    the same mask: make it once (``tree_attention.packed_sdpa`` does)."""
    rows, length = mask.shape[-2:]
    out = np.zeros((length, padded(rows)), np.float32)
    out[:, :rows] = mask[0, 0].numpy().T
    return out


def uses_row_blocks(rows: int) -> bool:
    """Whether ``attend`` runs the row-block kernel for ``rows`` query rows per head (and so
    reads the mask transposed)."""
    return rows > FEW


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


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float,
           mask_t: np.ndarray | None = None) -> torch.Tensor:
    """SDPA for query [1, H, R, D] over key and value [1, H, L, D] with an additive mask
    [1, 1, R, L'] (L' <= L: the first L' keys count) shared by the heads: [1, H, R, D]. See
    ``serves`` for what it takes. Where ``uses_row_blocks`` it runs the row-block kernel, on ``mask_t``
    (``transposed_mask``: of this mask, or of one with more columns, the first L' counting)
    or, if None, on the mask transposed here."""
    _, heads, rows, dim = query.shape
    length = mask.shape[-1]
    q = query[0].contiguous().numpy()
    out = np.empty((heads, rows, dim), np.float32)
    if uses_row_blocks(rows):
        mask_t = transposed_mask(mask) if mask_t is None else mask_t[:length]
        scores = np.empty((heads, padded(rows) // BLOCK, length, BLOCK), np.float32)
        ROW_BLOCK_KERNEL(q, _whole(key), _whole(value), mask_t, np.float32(scale), scores, out)
    else:
        m = mask[0, 0]
        m = (m if m.stride(-1) == 1 else m.contiguous()).numpy()
        scores = np.empty((heads, rows, padded(length)), np.float32)
        few_rows_attention(q, _whole(key), _whole(value), m, scale, scores, out)
    return torch.from_numpy(out)[None]
