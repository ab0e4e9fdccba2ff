"""Fitting cost curves to noisy timings: a non-decreasing fit, and online learners that fold
each generation step's size and wall time into the curve (numpy only, no torch).

Timings on a shared machine come with outliers (a neighbour's burst, a page fault) and with
drift (the load changes over minutes). Everything here works on log seconds, uses medians
of recent observations rather than means, and separates the two: a per-size median says
what a forward of that size costs relative to the others (the curve's shape), one level
says how fast the machine runs right now (the same for all sizes).
"""

from __future__ import annotations

from collections import deque

import numpy as np

WINDOW = 16  # recent observations per size bin: their median follows a change within ~8 steps at that size
PRIOR_WEIGHT = 2  # copies of a measured prior among each size's observations (1 for a noisy measurement)
AGREE = 0.1  # log-seconds correction within which an unobserved size's prior keeps its full weight
TRUST = float(np.log(1.5))  # how far another run's learned shape may move the measured curve, per size
CARRY = WINDOW // 2  # steps timed at a size before they overrule its prior, move other sizes or carry to the next run
LEVEL_STEPS = 5  # recent steps whose median reading is the machine's level (load changes within seconds)
MAX_COUNT = 1000  # evidence counted per bin, so a long history still yields to a changed machine within WINDOW
HOST_WINDOW = 64  # recent (nodes, host time) pairs per drafter set
HOST_REFIT = 4  # steps between fits of the host-time line, once its window has filled a little
CURVE_REFIT = 4  # steps between fits of a cost curve's shape, once it has seen CURVE_EARLY steps
CURVE_EARLY = 16  # steps that each refit the shape: a wrong prior is corrected from the first ones


def _median(values) -> float:
    """np.median of a few numbers, without numpy's per-call overhead (it runs every step)."""
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def isotonic(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in weighted least squares
    (pool-adjacent-violators). y, w: float [m], w > 0; returns float64 [m]."""
    y = np.asarray(y, np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, np.float64)
    values: list[float] = []
    weights: list[float] = []
    counts: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist()):
        values.append(yi)
        weights.append(wi)
        counts.append(1)
        # invariant: values is strictly increasing except possibly at its last pair
        while len(values) > 1 and values[-2] > values[-1]:
            v, wt, c = values.pop(), weights.pop(), counts.pop()
            total = weights[-1] + wt
            values[-1] = (values[-1] * weights[-1] + v * wt) / total
            weights[-1] = total
            counts[-1] += c
    return np.repeat(np.array(values), counts)


def through_pools(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    """The non-decreasing fit ``f`` at increasing ``x``, with each pool (a run of equal values)
    read as its value at the pool's centre and straight lines through the centres, continued
    past the first and the last (flat only when ``f`` is one pool).

    A pool is where noisy timings disagreed with the order of sizes, not evidence that the
    sizes cost the same: a cost curve flat from 12 to 16 nodes makes the budget send 16 nodes
    whenever it would send 12, the extra four at no predicted cost, while on a CPU each node
    costs a few percent of a step; at the ends too (a flat 48-64 sends 64 whenever 48 pays).
    Non-decreasing still; rising wherever the pools differ. Its own output, which has no
    pools, comes back unchanged: a curve read from the cache and fitted again stays put."""
    x = np.asarray(x, np.float64)
    f = np.asarray(f, np.float64)
    starts = np.flatnonzero(np.r_[True, np.diff(f) != 0])
    ends = np.r_[starts[1:], len(f)]
    centres = np.add.reduceat(x, starts) / (ends - starts)
    values = f[starts]
    if len(centres) == 1:
        return np.full(len(x), values[0])
    g = np.interp(x, centres, values)
    lo, hi = x < centres[0], x > centres[-1]
    g[lo] = values[0] + (x[lo] - centres[0]) * (values[1] - values[0]) / (centres[1] - centres[0])
    g[hi] = values[-1] + (x[hi] - centres[-1]) * (values[-1] - values[-2]) / (centres[-1] - centres[-2])
    return g


class CurveLearner:
    """Log seconds of a verification step at each of ``sizes`` nodes, learned online.

    The prior (a measurement, log seconds per size) counts as PRIOR_WEIGHT observations in
    each size's median, so a wrong prior is overruled after a few steps at that size.
    Observations are stored relative to ``level``, the machine's current speed: each step
    whose size bin has history reads the level off that history, and the level is the median
    of the last LEVEL_STEPS readings, so a load that comes and goes within seconds slows
    every size alike instead of distorting the shape, and one outlier moves nothing.

    The level follows every step; the shape is fitted again after every step for the first
    CURVE_EARLY, then after every CURVE_REFIT (and by ``state``): a window of 16 moves little
    in a few steps, and the fit, every step, took a tenth of a millisecond of host time.
    """

    def __init__(self, sizes: tuple[int, ...], prior: np.ndarray, prior_weight: int = PRIOR_WEIGHT):
        self.sizes = np.asarray(sizes, np.int64)
        self.measured = np.asarray(prior, np.float64)
        self.prior = self.measured.copy()
        self.prior_weight = prior_weight
        self.windows = [deque(maxlen=WINDOW) for _ in sizes]
        self.counts = np.zeros(len(sizes), np.int64)
        self.level = 0.0
        self._levels: deque[float] = deque(maxlen=LEVEL_STEPS)
        self._fit: np.ndarray | None = None
        self._since = 0  # observations since the last fit
        self._mid = (self.sizes[1:] + self.sizes[:-1]) / 2  # bin boundaries: nearest size

    def fitted(self) -> np.ndarray:
        """float64 [len(sizes)]: non-decreasing log seconds per size, at level 0.

        An observed size takes the median of its recent observations and copies of the prior:
        CARRY less its count while it has few (so a few steps timed in a burst of load move
        nothing), at least PRIOR_WEIGHT (then they only break ties). An unobserved one takes
        the prior moved by the correction the sizes timed at least CARRY times needed
        (interpolated), so a prior that is wrong everywhere is not kept where no step happened
        to land, and a few unlucky steps at one size do not make every larger size dear: the
        budget would then never send those sizes, and never learn otherwise. The weighted
        non-decreasing fit of those estimates is read through its pools' centres
        (``through_pools``)."""
        if self._fit is None:
            seen = np.flatnonzero(self.counts > 0)
            sure = np.flatnonzero(self.counts >= CARRY)  # timed often enough to speak for other sizes
            shift = np.zeros(len(self.sizes))
            if len(sure):
                medians = np.array([_median(self.windows[b]) for b in sure])
                shift = np.interp(self.sizes, self.sizes[sure], medians - self.prior[sure])
            guess = self.prior + shift  # the prior, moved as far as the well-observed sizes say it is off
            est = guess.copy()
            weight = self.prior_weight * np.minimum(1.0, AGREE / np.maximum(np.abs(shift), 1e-12))
            for b in seen:
                copies = max(self.prior_weight, CARRY - int(self.counts[b]))
                est[b] = _median([*self.windows[b], *[float(guess[b])] * copies])
                weight[b] = self.prior_weight + min(int(self.counts[b]), MAX_COUNT)
            self._fit = through_pools(self.sizes, isotonic(est, weight))
            self._since = 0
        return self._fit

    def costs(self) -> np.ndarray:
        """c at ``sizes``: fitted seconds relative to a 0-node step (c[0] = 1, non-decreasing)."""
        f = self.fitted()
        return np.exp(f - f[0])

    def log_seconds(self, nodes: int) -> float:
        """Predicted log seconds of a step of ``nodes`` nodes at the machine's current level."""
        return self.level + float(np.interp(nodes, self.sizes, self.fitted()))

    def observe(self, nodes: int, seconds: float) -> None:
        """Fold in one step of ``nodes`` nodes that took ``seconds``."""
        if not (seconds > 0 and np.isfinite(seconds)):
            return
        b = int(np.searchsorted(self._mid, nodes))
        f = self.fitted()
        # the observation restated at the bin's size, along the current curve
        x = np.log(seconds) - (float(np.interp(nodes, self.sizes, f)) - f[b])
        win = self.windows[b]
        if len(win) >= 3:
            # where this step puts the machine's level; the median of the last few such readings
            # follows a lasting change within LEVEL_STEPS // 2 + 1 steps and ignores one outlier
            self._levels.append(x - _median(win))
            self.level = _median(self._levels)
        win.append(x - self.level)
        self.counts[b] += 1
        self._since += 1
        if self._since >= CURVE_REFIT or self.counts.sum() <= CURVE_EARLY:
            self._fit = None

    def state(self) -> dict:
        """What to persist: the prior this run started from (log seconds per size), the
        machine's level when it ended, each bin's recent observations and its evidence count.
        The shape is fitted again to all of them (what is saved is what this run now predicts)."""
        self._fit = None
        return {"prior": self.prior.tolist(), "level": round(self.level, 6),
                "windows": [[round(v, 6) for v in w] for w in self.windows], "counts": self.counts.tolist()}

    def restore(self, state: dict) -> float:
        """Start from another run's ``state()``: the prior becomes the measured curve moved
        by what that run learned at the sizes it timed at least CARRY times (interpolated
        between them and 0 nodes, held past the largest, at most TRUST at any size: that run
        timed its steps under another load; this run's steps overrule it within a few steps
        per size), and its last level (how fast the machine ran) is this run's first. A size
        that run timed a few times, or never, is not carried: a short burst of load there
        would otherwise make that size and every larger one dear in every later run, which
        would then never try them and so never learn otherwise. Returns how far, in log
        units, the restored shape departed from the measured one at the sizes that run timed
        at least CARRY times: past TRUST, the measurement itself is in doubt. Raises
        ValueError (and changes nothing) if the state does not fit."""
        windows, counts = state.get("windows"), state.get("counts")
        prior = state.get("prior", self.measured.tolist())
        if not all(isinstance(v, list) and len(v) == len(self.sizes) for v in (windows, counts, prior)):
            raise ValueError(f"learned state does not hold {len(self.sizes)} bins")
        values = [np.asarray(w, np.float64) for w in [prior, *windows]]
        if any(v.ndim != 1 or not np.all(np.isfinite(v)) or np.any(np.abs(v) > 20) for v in values) or any(
                len(v) > WINDOW for v in values[1:]):
            raise ValueError("learned state holds non-finite or absurd log seconds")
        if any(not isinstance(c, int) or c < len(v) for c, v in zip(counts, values[1:])):
            raise ValueError("learned state's counts do not match its observations")
        level = state.get("level", 0.0)  # absent: saved before levels were
        if not isinstance(level, (int, float)) or not abs(level) <= 20:
            raise ValueError(f"learned state's level {level!r} is not a finite log ratio")
        then = CurveLearner(tuple(self.sizes), values[0], self.prior_weight)
        for win, v in zip(then.windows, values[1:]):
            win.extend(v.tolist())
        then.counts = np.asarray(counts, np.int64)
        f = then.fitted()
        departure = (f - f[0]) - (self.measured - self.measured[0])
        timed = np.flatnonzero((then.counts >= CARRY) | (self.sizes == self.sizes[0]))  # 0 nodes: the reference
        carried = np.interp(self.sizes, self.sizes[timed], departure[timed])
        self.prior = isotonic(self.measured + np.clip(carried, -TRUST, TRUST))
        for win in self.windows:
            win.clear()
        self.counts = np.zeros(len(self.sizes), np.int64)
        self._levels.clear()
        # the speed that run last saw, against this measurement: a machine slower now than
        # when it was measured predicts its first steps right, before this run's own readings
        self.level = float(level + f[0] - self.measured[0])
        self._fit = None
        return float(np.max(np.abs(departure[timed]), initial=0.0))


class HostLearner:
    """Host time per step (drafting, fusion, bookkeeping: everything but the verification
    step) in units of a 0-node forward, as d(n) = d0 + d1 * n with d0, d1 >= 0: a robust
    line (median of pairwise slopes) through the last HOST_WINDOW steps, fitted again after
    every HOST_REFIT steps once the window holds HOST_REFIT * 4 (each step before): the
    window moves little in a few steps, and the fit, every step, cost as much as the rest of
    the cost model."""

    def __init__(self):
        self.window: deque[tuple[int, float]] = deque(maxlen=HOST_WINDOW)
        self._line: tuple[float, float] | None = None
        self._since = 0  # steps observed since the last fit
        self._table: dict[int, np.ndarray] = {}  # n_max -> d(0..n_max) of the current fit

    def observe(self, nodes: int, units: float) -> None:
        if units >= 0 and np.isfinite(units):
            self.window.append((nodes, units))
            self._since += 1
            if len(self.window) < 4 * HOST_REFIT or self._since >= HOST_REFIT:
                self._line = None

    def line(self) -> tuple[float, float]:
        """(d0, d1); (0, 0) before any observation."""
        if self._line is None:
            self._since, self._table = 0, {}
            if not self.window:
                self._line = (0.0, 0.0)
            else:
                n, u = (np.array(v, np.float64) for v in zip(*self.window))
                dn, du = n[None, :] - n[:, None], u[None, :] - u[:, None]
                apart = dn > 0
                slope = max(0.0, float(np.median(du[apart] / dn[apart]))) if apart.any() else 0.0
                self._line = (max(0.0, float(np.median(u - slope * n))), slope)
        return self._line

    def overhead(self, n_max: int) -> np.ndarray:
        """float64 [n_max + 1]: d(n) for n = 0 .. n_max (read-only: shared until the next fit)."""
        d0, d1 = self.line()
        table = self._table.get(n_max)
        if table is None:
            table = self._table[n_max] = d0 + d1 * np.arange(n_max + 1)
            table.flags.writeable = False
        return table
