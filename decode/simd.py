"""Sixteen float32 lanes as a Numba value: vector registers a kernel names, not hopes for.

LLVM vectorizes a loop's reduction on its own (``decode.skinny`` relies on that), but a
tile of accumulators that runs along the *outputs* (16 query rows, 64 features of a value)
needs each accumulator to stay one register across the loop over the inner dimension, and
LLVM's vectorizers only manage that for a scalar. ``F32x16`` is a Numba type whose value
is LLVM's ``<16 x float>``: a kernel holds its accumulators in local variables of this
type, so they live in registers (one zmm on AVX-512, two ymm on AVX2) by construction.

The operations are the few a kernel's inner loop needs: load and store 16 consecutive
values of an array (or 64: ``load4``, ``store4``), splat a scalar, fused multiply-add (and
``fma4``, one broadcast row of a tile), max, add, subtract, multiply, an exponential for
softmax, and reading lanes (one, their sum, their largest).
"""

from __future__ import annotations

import math

import numba
from llvmlite import ir
from llvmlite.binding import get_host_cpu_features
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

LANES = 16


def _compiles_for_avx512() -> bool:
    """Whether Numba compiles for AVX-512: the host's features, or those NUMBA_CPU_FEATURES
    names (as for a cache shared by several kinds of machine, or to try AVX2 code here)."""
    if config.CPU_FEATURES is not None:
        return "+avx512f" in config.CPU_FEATURES.split(",")
    return bool(get_host_cpu_features().get("avx512f", False))


# Whether the kernels get AVX-512's 32 vector registers: tiles of 24 accumulators of 16 lanes fit
# there; on AVX2 (16 registers of 8 lanes) they spill, so kernels built on them are used only there.
WIDE_REGISTERS = _compiles_for_avx512()


class F32x16(types.Type):
    """Numba type of sixteen float32 lanes (LLVM ``<16 x float>``)."""

    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()
_VECTOR = ir.VectorType(ir.FloatType(), LANES)


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _pointer(context, builder, array_type, array, index_type, index):
    """Pointer to ``array[index]`` (a tuple of ints, one per dimension), as float32* ."""
    ary = context.make_array(array_type)(context, builder, array)
    indices = cgutils.unpack_tuple(builder, index, len(index_type))
    return cgutils.get_item_pointer(context, builder, array_type, ary, indices, wraparound=False)


def _check_index(arr, index) -> bool:
    return (isinstance(arr, types.Array) and arr.dtype == types.float32 and isinstance(index, types.BaseTuple)
            and len(index) == arr.ndim and all(isinstance(t, types.Integer) for t in index))


@intrinsic
def load(typingctx, arr, index):
    """The 16 values ``arr[index]`` .. along the last axis (which must be contiguous and hold
    them: no bounds check), as one vector."""
    if not _check_index(arr, index):
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        return builder.load(builder.bitcast(ptr, _VECTOR.as_pointer()), align=4)

    return f32x16(arr, index), codegen


@intrinsic
def store(typingctx, arr, index, vec):
    """Write ``vec`` to the 16 values from ``arr[index]`` along the last axis (contiguous; no
    bounds check)."""
    if not _check_index(arr, index) or vec != f32x16:
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        builder.store(args[2], builder.bitcast(ptr, _VECTOR.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(arr, index, vec), codegen


@intrinsic
def splat(typingctx, x):
    """A vector of 16 copies of the scalar ``x``."""
    if not isinstance(x, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[0], signature.args[0], types.float32)
        one = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), value, ir.IntType(32)(0))
        return builder.shuffle_vector(one, ir.Constant(_VECTOR, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))

    return f32x16(x), codegen


def _llvm(builder, name: str, *values):
    """A call of LLVM's lane-by-lane intrinsic ``llvm.<name>.v16f32`` on vector ``values``."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * len(values)),
                                        f"llvm.{name}.v16f32")
    return builder.call(fn, values)


def _lanewise(name: str):
    """An intrinsic applying LLVM's ``llvm.<name>.v16f32`` lane by lane to its vector arguments."""

    def typer(typingctx, *args):
        if not args or any(a != f32x16 for a in args):
            return None

        def codegen(context, builder, signature, values):
            return _llvm(builder, name, *values)

        return f32x16(*args), codegen

    return typer


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c lane by lane, one rounding (``llvm.fma``)."""
    return _lanewise("fma")(typingctx, a, b, c)


@intrinsic
def maximum(typingctx, a, b):
    """The larger of a and b lane by lane (``llvm.maxnum``)."""
    return _lanewise("maxnum")(typingctx, a, b)


@intrinsic
def lane(typingctx, vec, i):
    """Lane ``i`` of ``vec`` as a float32."""
    if vec != f32x16 or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        index = context.cast(builder, args[1], signature.args[1], types.int32)
        return builder.extract_element(args[0], index)

    return types.float32(vec, i), codegen


def _binary(method: str):
    """An intrinsic applying the IR builder's ``method`` (fadd, fsub, fmul) to two vectors."""

    def typer(typingctx, a, b):
        if a != f32x16 or b != f32x16:
            return None

        def codegen(context, builder, signature, args):
            return getattr(builder, method)(args[0], args[1])

        return f32x16(a, b), codegen

    return typer


@intrinsic
def add(typingctx, a, b):
    """a + b lane by lane."""
    return _binary("fadd")(typingctx, a, b)


@intrinsic
def sub(typingctx, a, b):
    """a - b lane by lane."""
    return _binary("fsub")(typingctx, a, b)


@intrinsic
def mul(typingctx, a, b):
    """a * b lane by lane."""
    return _binary("fmul")(typingctx, a, b)


LOG2E = 1.4426950408889634
LN2_HI = 0.693359375  # ln 2 split so that k * LN2_HI is exact for |k| < 2 ** 11
LN2_LO = -2.12194440e-4
LOWEST = -87.0  # exp(-87) is float32's smallest normal; below it a weight is 0 to rounding
TAYLOR = tuple(1.0 / math.factorial(i) for i in range(7, -1, -1))  # e ** f, highest power first


@intrinsic
def exp_nonpositive(typingctx, x):
    """exp(x) lane by lane for x <= 0 (0 below LOWEST, -inf included): 2 ** k from its bits
    times e ** f for |f| <= ln 2 / 2 by a degree-7 Taylor polynomial (truncation error below
    1e-8 relative), so within a float32 ulp or two of ``math.exp``, as straight-line vector
    arithmetic (a call to ``exp`` per value costs ten times more)."""
    if x != f32x16:
        return None

    def codegen(context, builder, signature, args):
        def const(value: float) -> ir.Constant:
            return ir.Constant(_VECTOR, [value] * LANES)

        def call(name: str, *values):
            return _llvm(builder, name, *values)

        v = args[0]
        low = builder.fcmp_ordered("<", v, const(LOWEST))
        v = builder.select(low, const(LOWEST), v)
        k = call("floor", call("fma", v, const(LOG2E), const(0.5)))
        f = call("fma", k, const(-LN2_HI), v)
        f = call("fma", k, const(-LN2_LO), f)
        p = const(TAYLOR[0])
        for c in TAYLOR[1:]:
            p = call("fma", p, f, const(c))
        ints = ir.VectorType(ir.IntType(32), LANES)
        bits = builder.shl(builder.add(builder.fptosi(k, ints), ir.Constant(ints, [127] * LANES)),
                           ir.Constant(ints, [23] * LANES))
        e = builder.fmul(p, builder.bitcast(bits, _VECTOR))
        return builder.select(low, const(0.0), e)

    return f32x16(x), codegen


@numba.njit(cache=True, fastmath=True, inline="always")
def lanes_sum(vec) -> float:
    """The sum of ``vec``'s lanes."""
    total = lane(vec, 0)
    for i in range(1, LANES):
        total += lane(vec, i)
    return total


@numba.njit(cache=True, fastmath=True, inline="always")
def largest(vec) -> float:
    """The largest of ``vec``'s lanes."""
    top = lane(vec, 0)
    for i in range(1, LANES):
        top = max(top, lane(vec, i))
    return top


@numba.njit(cache=True, inline="always")
def fma4(x, w0, w1, w2, w3, a0, a1, a2, a3):
    """A row of four accumulators plus the scalar ``x`` times four vectors: (a0 + x * w0, ...,
    a3 + x * w3), the step of a tile that broadcasts one value against 64 lanes."""
    p = splat(x)
    return fma(p, w0, a0), fma(p, w1, a1), fma(p, w2, a2), fma(p, w3, a3)


@numba.njit(cache=True, inline="always")
def load4(row):
    """The first 64 values of the contiguous 1-D ``row`` as four vectors."""
    return load(row, (0,)), load(row, (16,)), load(row, (32,)), load(row, (48,))


@numba.njit(cache=True, inline="always")
def store4(row, a, b, c, d):
    """Write four vectors to the first 64 values of the contiguous 1-D ``row``."""
    store(row, (0,), a)
    store(row, (16,), b)
    store(row, (32,), c)
    store(row, (48,), d)
