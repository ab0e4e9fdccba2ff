"""What verification costs on this hardware, and how many draft nodes are worth it each step.

c(n) is the time of one verification step over the root plus n draft nodes (LM head
included) divided by the time of a step over the root alone. It is measured once per model,
device, dtype, thread count and context bucket (sizes interleaved round-robin, a median per
size, a non-decreasing fit, re-measured while the spread says the machine was busy) and
cached on disk with its spread. On a CPU each size is timed with ``decode.skinny``'s kernel
and with BLAS, and steps of that size then take the faster (which one wins depends on the
machine: ``decode.skinny.KernelSettings``). A cached curve is checked when read and measured
again if it fails. Then every step of ``generate`` is folded in (``CostModel.observe``), so a wrong start
corrects itself and the curve follows the machine's load; the learned part is saved with the
cache. Drafting and other host time per step is learned the same way, in units of a 0-node
forward, and belongs in the step's cost.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from llvmlite.binding import get_host_cpu_name
from numba.core import config as numba_config
from tqdm import tqdm

from retrodraft.decode.costfit import PRIOR_WEIGHT, TRUST, CurveLearner, HostLearner, isotonic, through_pools
from retrodraft.decode.model import cache_dir
from retrodraft.decode.skinny import MAX_ROWS, KernelSettings, linear_argmax, serves
from retrodraft.decode.tree_attention import new_cache, run_prompt, verification_kernels, tree_inputs, truncate_cache
from retrodraft.decode.verifier import TreeVerifier, graph_capacity
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.speculator import choose_budget  # noqa: F401  (numpy only, so it lives with the Speculator)
from retrodraft.retrieval.tree import DraftTree

logger = logging.getLogger(__name__)

SIZES = DEFAULT.cost_sizes  # reasons for both in SpeculationConfig
BUCKETS = DEFAULT.cost_contexts
VERIFY_PATH = 14  # bumped when the verification forward changes, so cached curves are re-measured
CACHE_FORMAT = 3  # the cache file's layout (2: spread, seconds of a 0-node step, the learned state; 3: the path)
ROUNDS = 9  # interleaved rounds over all sizes (after one warm-up round)
SPREAD_LIMIT = 0.10  # median relative interquartile range above which the machine was busy: measure again
RETRIES = 2  # further attempts when busy; the least noisy attempt is kept
SAVE_INTERVAL = 5.0  # seconds between writes of the learned curve


@dataclass(frozen=True)
class CostCurve:
    """c(n) for every n in 0..max_nodes, from measurements at ``sizes`` (linear in between);
    ``seconds0``: the seconds of a 0-node step it was measured with; ``spread``: the median
    relative interquartile range of the timings (0 when unknown); ``kernel``: per size,
    whether ``decode.skinny``'s kernel was faster there than BLAS (empty: the kernel at
    every size)."""

    sizes: tuple[int, ...]
    costs: tuple[float, ...]
    seconds0: float = 1.0
    spread: float = 0.0
    kernel: tuple[bool, ...] = ()

    def table(self) -> np.ndarray:
        """float64 [max_nodes + 1]: c(n) for n = 0 .. max(sizes)."""
        return np.interp(np.arange(self.sizes[-1] + 1), self.sizes, self.costs)

    def kernel_rows(self) -> np.ndarray:
        """bool [MAX_ROWS + 1] for ``KernelSettings.kernel_rows``: whether a forward of r rows
        (r - 1 nodes) runs the kernel, as at the largest measured size up to r - 1."""
        rows = np.ones(MAX_ROWS + 1, bool)
        if self.kernel:
            at = np.searchsorted(self.sizes, np.arange(MAX_ROWS), side="right") - 1  # n = r - 1
            rows[1:] = np.asarray(self.kernel, bool)[at]
        return rows


def _key(model, context: int, threads: int) -> str:
    p = next(model.parameters())
    ident = json.dumps(
        [model.config.to_json_string(), str(p.dtype), str(p.device), _device_name(p.device),
         threads, torch.__version__, context, VERIFY_PATH],
        sort_keys=True,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _device_name(device: torch.device) -> str:
    """The device as the cost cache tells machines apart. On a CPU, the marketing name and
    the core the kernels are compiled for (LLVM's name for the host's, or NUMBA_CPU_NAME's,
    and NUMBA_CPU_FEATURES where set): VMs often show only "AMD EPYC" or "Intel Xeon", and a
    home directory shared across a cluster's nodes must not hand one core's curve to another
    (a Zen 4 and a Zen 5 differ twofold in arithmetic; AVX2 code and AVX-512 code about as
    much in a 17-row forward)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    target = numba_config.CPU_NAME or get_host_cpu_name()
    if numba_config.CPU_FEATURES is not None:
        target += " " + hashlib.sha256(numba_config.CPU_FEATURES.encode()).hexdigest()[:12]
    return f"{name} ({target})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_rounds(model, context: int, sizes: tuple[int, ...] = SIZES, rounds: int = ROUNDS,
                kernel: tuple[bool, ...] = (True,), desc: str | None = None,
                layers: tuple[bool, ...] | None = None, graphs: bool | None = None) -> np.ndarray:
    """float64 [rounds, len(kernel), len(sizes)]: seconds of a verification step of 1 + n
    tokens (a chain of n drafts) over a cache of ``context`` random tokens, within
    ``verification_kernels(model)``. Without ``graphs``, the forward with its tree mask and
    cache as ``generate`` runs them, LM head included, for each path in ``kernel``: True, the
    linear layers run ``decode.skinny``'s kernel where it serves them; False, BLAS; and, per
    path in ``layers`` (default all True), whether the decoder layers run
    ``decode.decoder_layers``' pass where it serves them (on the kernel's paths; off, their
    own forward). With ``graphs`` (None: iff the model is on CUDA), the whole greedy
    ``TreeVerifier.verify`` step as ``generate`` runs it there: static shapes, each size's
    forward replayed from a CUDA graph (captured in the warm-up round), staging, acceptance
    and the copy back included; the eager forward a CUDA step no longer runs took 21-22 ms
    on an H200 against 3.7 for the replayed one. ``kernel`` and ``layers`` are CPU paths,
    not accepted with it. Sizes and paths are interleaved round-robin, so a burst of load hits
    one round of every size rather than all of one size; one warm-up round is dropped.
    ``desc``: label of a progress bar (None: no bar)."""
    if graphs is None:
        graphs = model.device.type == "cuda"
    if graphs and (kernel != (True,) or layers is not None):
        raise ValueError("kernel and layers choose CPU paths of the eager forward; with graphs time one path")
    out = np.empty((rounds + 1, len(kernel), len(sizes)))
    with verification_kernels(model) as settings, tqdm(total=out.size, desc=desc, disable=desc is None,
                                                       leave=False) as bar:
        routed, passing = settings.kernel_rows, settings.layers  # an enclosing generate call's, restored below
        try:
            steps = (_verify_steps(model, context, sizes, settings) if graphs
                     else forward_steps(model, context, sizes, kernel, layers, settings))
            for r in range(rounds + 1):
                for i, row in enumerate(steps):
                    for p, step in enumerate(row):
                        out[r, p, i] = step()
                        bar.update()
        finally:
            settings.kernel_rows, settings.layers = routed, passing
    return out[1:]


def _chains(model, context: int, sizes: tuple[int, ...]) -> tuple[torch.Tensor, list[DraftTree]]:
    """Random context ids [1, context + 1] and a chain of random drafts per size."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context + 1), generator=gen)
    return ids, [DraftTree.build(torch.randint(0, vocab, (n,), generator=gen).numpy(), np.arange(n) - 1, np.ones(n))
                 for n in sizes]


def forward_steps(model, context: int, sizes: tuple[int, ...], kernel: tuple[bool, ...],
                  layers: tuple[bool, ...] | None, settings: KernelSettings) -> list[list]:
    """Per size, per path (``time_rounds``' ``kernel`` and ``layers``): a call running one
    eager verification forward of 1 + n tokens after ``context`` random ones and returning its
    seconds; within ``verification_kernels(model)``, whose ``settings`` these are."""
    device = model.device
    ids, chains = _chains(model, context, sizes)
    cache = new_cache(model, context + max(sizes) + 1)
    head = model.get_output_embeddings()
    routes = [np.full(MAX_ROWS + 1, use) for use in kernel]
    layers = (True,) * len(kernel) if layers is None else layers
    run_prompt(model, ids[:, :-1].to(device), cache, settings)

    def step(inputs: tuple, route: np.ndarray, passing: bool) -> float:
        ids, positions, mask = inputs
        settings.kernel_rows, settings.layers = route, passing
        _sync(device)
        t = time.perf_counter()
        h = model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                             use_cache=True).last_hidden_state
        linear_argmax(head, h)  # as the verifier picks its tokens
        _sync(device)
        seconds = time.perf_counter() - t
        truncate_cache(cache, context)
        return seconds

    return [[functools.partial(step, tree_inputs(0, chain, context, device, model.dtype), route, passing)
             for route, passing in zip(routes, layers)] for chain in chains]


def _verify_steps(model, context, sizes, settings) -> list[list]:
    """Per size: a call timing one greedy ``TreeVerifier.verify`` step with static shapes
    (``time_rounds``)."""
    ids, chains = _chains(model, context, sizes)
    # a verifier of its own, as large as the one generate will share: a cost bucket is measured
    # when a call first reaches it, while that call's verifier holds its cache
    verifier = TreeVerifier(model, graph_capacity(context + max(sizes) + 1), max(sizes), True)
    verifier.prefill(ids, settings=settings)

    def step(chain: DraftTree) -> float:
        t = time.perf_counter()
        verifier.verify(chain, 0, context, None, False)  # ends with the copy back: no sync needed
        seconds = time.perf_counter() - t
        truncate_cache(verifier.cache, context)
        return seconds

    return [[functools.partial(step, chain)] for chain in chains]


def forward_seconds(model, context: int, sizes: tuple[int, ...] = SIZES, reps: int = ROUNDS,
                    kernel: tuple[bool, ...] = (True,), layers: tuple[bool, ...] | None = None) -> list[list[float]]:
    """Seconds of a verification forward for each path in ``kernel`` (and ``layers``) and n in
    ``sizes`` (see ``time_rounds``: on CUDA the whole replayed verify step): the median of
    ``reps`` interleaved rounds."""
    return np.median(time_rounds(model, context, sizes, reps, kernel, layers=layers), axis=0).tolist()


def spread(seconds: np.ndarray) -> float:
    """How busy the machine was while ``seconds`` [rounds, sizes] were timed: the median over
    sizes of each size's interquartile range relative to its median."""
    q1, med, q3 = np.percentile(seconds, [25, 50, 75], axis=0)
    return float(np.median((q3 - q1) / med))


def fit(seconds: np.ndarray, blas: np.ndarray | None = None) -> CostCurve:
    """The cost curve of timings [rounds, len(SIZES)] with the kernel and, if given, with BLAS:
    per size the faster path's median, fitted non-decreasing in log seconds (pools read at
    their centres: ``costfit.through_pools``), relative to the 0-node fit."""
    medians = np.median(seconds, axis=0)
    kernel = np.ones(len(SIZES), bool)
    if blas is not None:
        kernel = medians <= np.median(blas, axis=0)
        seconds = np.where(kernel, seconds, blas)
        medians = np.median(seconds, axis=0)
    s = through_pools(np.asarray(SIZES), isotonic(np.log(medians)))
    return CostCurve(SIZES, tuple(np.exp(s - s[0]).tolist()), float(np.exp(s[0])), spread(seconds),
                     tuple(kernel.tolist()))


def measure(model, context: int, rounds: int | None = None) -> CostCurve:
    """c(n) at ``SIZES`` over a cache of ``context`` tokens, in ``rounds`` rounds (None:
    ROUNDS, read now). Timed again (at most RETRIES more times) while the spread exceeds
    SPREAD_LIMIT; the least noisy attempt is returned."""
    rounds = ROUNDS if rounds is None else rounds
    logger.info("measuring the cost of verification at a %d-token context (%d rounds of %d sizes, once per "
                "machine; cached under %s)", context, rounds, len(SIZES), cache_dir() / "cost")
    best = None
    paths = (True, False) if serves(model) else (True,)
    for attempt in range(1 + RETRIES):
        curve = fit(*time_rounds(model, context, SIZES, rounds, paths, desc=f"cost curve @ {context} tokens"
                                 ).transpose(1, 0, 2))
        if best is None or curve.spread < best.spread:
            best = curve
        if curve.spread <= SPREAD_LIMIT:
            break
        logger.warning("cost curve at %d tokens: spread %.0f%% > %.0f%%, the machine is busy%s", context,
                       100 * curve.spread, 100 * SPREAD_LIMIT,
                       ": measuring again" if attempt < RETRIES else "; keeping the least noisy attempt, "
                       "steps will correct it")
    blas = [n for n, k in zip(SIZES, best.kernel) if not k]
    logger.info("cost curve at %d tokens: c(1) = %.2f, c(16) = %.2f, c(64) = %.2f, 0-node step %.1f ms, "
                "spread %.0f%%%s", context, best.costs[1], best.costs[SIZES.index(16)], best.costs[-1],
                1000 * best.seconds0, 100 * best.spread,
                f"; BLAS was faster than the few-rows kernel at n = {blas}" if blas else "")
    return best


def validated(data: dict) -> CostCurve:
    """The curve a cache file holds; ValueError naming what is wrong if it cannot be trusted
    (another format, other sizes, non-finite, c(0) != 1, decreasing, absurd). A noisy but
    well-formed curve is kept: its spread lowers its weight against the steps observed."""
    if data.get("format") != CACHE_FORMAT:
        raise ValueError(f"format {data.get('format')!r}, expected {CACHE_FORMAT}")
    if tuple(data.get("sizes", ())) != SIZES:
        raise ValueError(f"sizes {data.get('sizes')} are not {list(SIZES)}")
    c = np.asarray(data.get("costs", ()), np.float64)
    s0, sp = data.get("seconds0"), data.get("spread")
    if c.shape != (len(SIZES),) or not np.all(np.isfinite(c)):
        raise ValueError(f"costs are not {len(SIZES)} finite numbers")
    if abs(c[0] - 1.0) > 1e-6:
        raise ValueError(f"c(0) = {c[0]}, must be 1")
    if np.any(np.diff(c) < 0):
        n = int(np.flatnonzero(np.diff(c) < 0)[0])
        raise ValueError(f"decreasing: c({SIZES[n + 1]}) = {c[n + 1]:.2f} < c({SIZES[n]}) = {c[n]:.2f}")
    if np.any(c > 4 * (np.asarray(SIZES) + 1)):
        raise ValueError(f"absurd: c(n) above 4 (n + 1) (c = {np.round(c, 2).tolist()})")
    if not isinstance(s0, (int, float)) or not 0 < s0 < 60 or not isinstance(sp, (int, float)) or not 0 <= sp < math.inf:
        raise ValueError(f"seconds0 {s0!r} or spread {sp!r} out of range")
    kernel = data.get("kernel")
    if not isinstance(kernel, list) or len(kernel) != len(SIZES) or not all(isinstance(k, bool) for k in kernel):
        raise ValueError(f"kernel {kernel!r} is not {len(SIZES)} booleans")
    return CostCurve(SIZES, tuple(c.tolist()), float(s0), float(sp), tuple(kernel))


def bucket(context: int) -> int:
    """The measured context length standing for ``context`` (nearest on a log scale)."""
    at = math.log(max(context, 1))
    return min(BUCKETS, key=lambda b: abs(math.log(b) - at))


def _check_step(context, nodes, seconds, what: str = "seconds") -> None:
    if not isinstance(context, (int, np.integer)) or context < 1:
        raise ValueError(f"context must be a positive token count, got {context!r}")
    if not isinstance(nodes, (int, np.integer)) or nodes < 0:
        raise ValueError(f"nodes must be an int >= 0 (draft nodes verified), got {nodes!r}")
    if not isinstance(seconds, (int, float, np.floating)) or not 0 <= seconds < math.inf:
        raise ValueError(f"{what} must be a finite time >= 0, got {seconds!r}")


class CostModel:
    """The cost of a generation step for one model, per context bucket: the measured curve
    (read from the disk cache, or measured and written there: logged, with a progress bar;
    ``warm()`` or the command ``retrodraft-measure-cost`` does it ahead of the first
    ``generate``), corrected by every step ``observe`` is told of. ``CostModel.of(model)``
    shares one instance per model object.

    Units: c(n) and d(n) are relative to the current time of a 0-node forward; seconds are
    absolute predictions at the machine's current speed.
    """

    _instances: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model) -> CostModel:
        if model not in cls._instances:
            cls._instances[model] = cls(model)
        return cls._instances[model]

    def __init__(self, model):
        self.model = model
        # The caller's threads name the cache file: inside a call they follow the free cores
        # (decode.skinny.KernelSettings), and a neighbour must not move the state elsewhere.
        self.threads = torch.get_num_threads()
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 4096)
        self.longest = max(1, limit - SIZES[-1] - 1)  # measuring must stay inside the context window
        self._priors: dict[int, CostCurve] = {}
        self._learners: dict[int, CurveLearner] = {}
        self._hosts: dict[str, HostLearner] = {}
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # bucket -> (the fit it read, c(n))
        self._routes: dict[int, np.ndarray] = {}
        self._dirty: set[int] = set()
        self._saved_at = 0.0

    def _bucket(self, context: int) -> int:
        return min(bucket(context), self.longest)

    def path(self, context: int) -> Path:
        """The cache file of ``context``'s bucket."""
        return cache_dir() / "cost" / f"{_key(self.model, self._bucket(context), self.threads)}.json"

    def curve(self, context: int) -> CostCurve:
        """The measured curve (the prior) of ``context``'s bucket: from the cache if it passes
        ``validated``, else measured now and written there."""
        b = self._bucket(context)
        if b not in self._priors:
            self._load(b)
        return self._priors[b]

    def _load(self, b: int) -> None:
        path = self.path(b)
        curve, learned = None, None
        if path.exists():
            try:
                data = json.loads(path.read_text())
                curve, learned = validated(data), data.get("learned")
            except (ValueError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
                logger.warning("cached cost curve %s is not trusted (%s): measuring again", path, e)
        learner = self._learner_for(curve, learned, path) if curve is not None else None
        fresh = learner is None
        if fresh:
            curve = measure(self.model, b)
            learner = self._learner_for(curve, None, path)
        self._priors[b], self._learners[b] = curve, learner
        if fresh:
            self._write(b)

    @staticmethod
    def _learner_for(curve: CostCurve, learned: dict | None, path: Path) -> CurveLearner | None:
        """A learner starting from ``curve`` and what earlier runs learned; None when they
        learned a shape so far from the measured one that the measurement is in doubt."""
        weight = PRIOR_WEIGHT if curve.spread <= SPREAD_LIMIT else 1  # a noisy prior yields sooner
        learner = CurveLearner(SIZES, np.log(curve.seconds0 * np.asarray(curve.costs)), weight)
        if learned is None:
            return learner
        try:
            departure = learner.restore(learned)
        except (ValueError, TypeError, AttributeError) as e:
            logger.warning("learned cost state in %s is not trusted (%s): starting from the measured curve", path, e)
            return learner
        if departure > TRUST:
            logger.warning("steps timed by an earlier run put the cost curve %.1fx away from the one measured in %s: "
                           "measuring again", math.exp(departure), path)
            return None
        return learner

    def _learner(self, context: int) -> tuple[int, CurveLearner]:
        b = self._bucket(context)
        if b not in self._learners:
            self._load(b)
        return b, self._learners[b]

    def table(self, context: int) -> np.ndarray:
        """float64 [max(SIZES) + 1]: c(n) for n = 0..max(SIZES) at this context length, as learned so far
        (c(0) = 1, non-decreasing). Memoised until the learner fits its curve again."""
        b, learner = self._learner(context)
        fit = learner.fitted()
        memo = self._tables.get(b)
        if memo is None or memo[0] is not fit:
            memo = self._tables[b] = (fit, np.interp(np.arange(SIZES[-1] + 1), SIZES, learner.costs()))
        return memo[1]

    def kernel_rows(self, context: int) -> np.ndarray:
        """bool [MAX_ROWS + 1]: the row counts at which ``decode.skinny``'s kernel was faster
        than BLAS at this context length (``CostCurve.kernel_rows``)."""
        b = self._bucket(context)
        if b not in self._routes:
            self._routes[b] = self.curve(b).kernel_rows()
        return self._routes[b]

    def overhead(self, drafting: str) -> np.ndarray:
        """float64 [max(SIZES) + 1]: d(n), host time per step of the drafter set named ``drafting`` in units
        of a 0-node forward (zeros until it has been observed)."""
        host = self._hosts.get(drafting)
        return host.overhead(SIZES[-1]) if host else np.zeros(SIZES[-1] + 1)

    def step_table(self, context: int, drafting: str) -> np.ndarray:
        """float64 [max(SIZES) + 1]: c(n) + d(n), a whole step's cost, what ``choose_budget`` weighs."""
        return self.table(context) + self.overhead(drafting)

    def predict_seconds(self, context: int, nodes: int, drafting: str | None = None) -> float:
        """Seconds a step of ``nodes`` nodes should take now: the verification step, plus the
        host time of ``drafting`` when given."""
        _, learner = self._learner(context)
        forward = math.exp(learner.log_seconds(nodes))
        host = self.overhead(drafting)[min(nodes, SIZES[-1])] * math.exp(learner.log_seconds(0)) if drafting else 0.0
        return forward + host

    def observe(self, context: int, nodes: int, seconds: float, host_seconds: float | None = None,
                drafting: str = "") -> None:
        """Fold in one step of ``generate``: ``nodes`` draft nodes verified after ``context``
        tokens in ``seconds`` (tree inputs, forward, LM head, acceptance, cache compaction) and,
        if given, ``host_seconds`` of everything else in the step for the drafter set ``drafting``."""
        _check_step(context, nodes, seconds)
        if host_seconds is not None:
            _check_step(context, nodes, host_seconds, "host_seconds")
        b, learner = self._learner(context)
        if host_seconds is not None:
            self.observe_host(context, nodes, host_seconds, drafting)
        learner.observe(nodes, seconds)
        self._dirty.add(b)

    def host_units(self, context: int, seconds: float) -> float:
        """``seconds`` of host time in units of a 0-node forward at ``context``, now."""
        _, learner = self._learner(context)
        return seconds / math.exp(learner.log_seconds(0))

    def observe_host(self, context: int, nodes: int, seconds: float, drafting: str) -> float:
        """Fold in ``seconds`` of host time of one step of ``nodes`` nodes for the drafter set
        ``drafting``; returns it in units of a 0-node forward at ``context`` (d of this step)."""
        _check_step(context, nodes, seconds, "host seconds")
        units = self.host_units(context, seconds)
        self._hosts.setdefault(drafting, HostLearner()).observe(nodes, units)
        return units

    def report(self) -> dict:
        """What the model holds now, for benchmark records: per bucket loaded, the measured
        curve, the learned one and the machine's level; per drafter set, d(n) = d0 + d1 n."""
        return {
            "sizes": list(SIZES),
            "buckets": {str(b): {"measured": [round(c, 4) for c in self._priors[b].costs],
                                 "measured_spread": round(self._priors[b].spread, 4),
                                 "seconds0_measured": self._priors[b].seconds0,
                                 "learned": [round(c, 4) for c in learner.costs().tolist()],
                                 "seconds0_now": math.exp(learner.log_seconds(0)),
                                 "observations": int(learner.counts.sum())}
                        for b, learner in sorted(self._learners.items())},
            "overhead": {k: dict(zip(("d0", "d1"), h.line())) for k, h in sorted(self._hosts.items())},
        }

    def save(self, force: bool = False) -> None:
        """Write the learned state of every bucket observed since the last write to the cache
        (atomically; at most once per SAVE_INTERVAL seconds unless ``force``)."""
        if not self._dirty or (not force and time.monotonic() - self._saved_at < SAVE_INTERVAL):
            return
        for b in sorted(self._dirty):
            self._write(b)
        self._dirty.clear()
        self._saved_at = time.monotonic()

    def _write(self, b: int) -> None:
        curve, learner = self._priors[b], self._learners[b]
        data = {"format": CACHE_FORMAT, "context": b, "sizes": list(curve.sizes), "costs": list(curve.costs),
                "seconds0": curve.seconds0, "spread": curve.spread, "kernel": list(curve.kernel),
                "learned": learner.state(),
                "learned_costs": [round(c, 4) for c in learner.costs().tolist()]}
        path = self.path(b)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)

    def warm(self, longest: int | None = None) -> None:
        """Load or measure every bucket now, so no later call pays for a measurement; with
        ``longest`` (a bound on the contexts, prompt and output, that the calls to come will
        reach), only the buckets those contexts use: a workload of short prompts is spared
        measuring the longest bucket (a minute on a 2-core CPU)."""
        if longest is not None and (not isinstance(longest, (int, np.integer)) or isinstance(longest, bool)
                                    or longest < 1):
            raise ValueError(f"longest must be a positive token count or None, got {longest!r}")
        needed = [b for b in BUCKETS if longest is None or b <= bucket(longest)]
        if len(needed) < len(BUCKETS):
            logger.info("contexts up to %d tokens: cost curves at %s tokens only", longest,
                        ", ".join(map(str, needed)))
        for b in needed:
            self.table(b)
