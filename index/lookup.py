"""Prompt lookup: where in a stream did the end of the context occur before?"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def suffix_occurrences(
    stream: np.ndarray,
    end: int,
    context: np.ndarray,
    min_n: int,
    max_n: int,
    out: np.ndarray,
) -> tuple[int, int]:
    """Continuation starts of the longest context suffix (min_n..max_n tokens) in stream[:end].

    An occurrence of ``context[-n:]`` at ``stream[c - n : c]`` yields the continuation start
    ``c``; only c < end count, so with ``stream is context`` and ``end = len(context)`` the
    context's own tail never matches itself. Matches never cover a negative (separator)
    token. Only occurrences of the longest matched length n are kept, most recent first, at
    most ``out.shape[0]`` of them, written to ``out`` (int64).
    Returns (count, n); (0, 0) when no suffix of length >= min_n occurs.
    """
    m = context.shape[0]
    if m == 0:
        return 0, 0
    cap = out.shape[0]
    best = 0
    count = 0
    for c in range(min(end, stream.shape[0]) - 1, 0, -1):
        n = 0
        while n < max_n and n < m and c - 1 - n >= 0:
            t = stream[c - 1 - n]
            if t < 0 or t != context[m - 1 - n]:
                break
            n += 1
        if n < min_n or n < best:
            continue
        if n > best:
            best = n
            count = 0
        if count < cap:
            out[count] = c
            count += 1
    return count, best
