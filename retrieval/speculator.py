"""Speculator: the model-free half of a speculative step, for any verify loop.

``propose(context)`` asks every drafter for a tree, calibrates each tree's scores to
acceptance rates, fuses the trees, calibrates the fused nodes again per set of agreeing
sources and cuts the result to the size the cost of verification pays for.
``observe(context, emitted, ...)`` hands the verified step back: drafters learn from the new
tokens (and the target's top-k and hidden states where they ask for them), the calibrator
scores every proposal, accepted nodes are credited to their drafters and copied spans grow.

``decode.generate`` and ``decode.replay`` drive one; so can a serving engine or a
transformers candidate generator that owns its own verification. numpy only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from retrodraft.retrieval.calibration import Calibrator, verdicts
from retrodraft.retrieval.config import DEFAULT, SpeculationConfig
from retrodraft.retrieval.drafters import Drafter, RecyclingDrafter
from retrodraft.retrieval.tree import DraftTree, exclusive, fuse, prune

# c(n) for n = 0.. (float [N]), or a function of the context length giving one.
CostTable = Union[np.ndarray, Callable[[int], np.ndarray]]
SOURCE_BITS = 8  # DraftTree.sources is uint8: one bit per drafter
TIE = 1e-9  # relative difference of two step costs that ``choose_budget`` counts as equal


def choose_budget(scores: np.ndarray, curve: np.ndarray, overhead: float | np.ndarray = 0.0) -> int:
    """Number of nodes to verify: argmax over n of (1 + sum of the n best scores) / (c(n) + d(n)).

    scores: path scores of the candidate tree (any order); curve: c(n) for n = 0.. (see
    decode.budget.CostCurve.table; ``CostModel.step_table`` has d folded in already);
    overhead: d(n), the step's host time (drafting, fusion, bookkeeping) in units of a
    0-node forward, a number or one per n like ``curve``. A fixed d makes larger trees
    relatively cheaper; a d that grows with n makes them dearer. A tree of n nodes can
    always be padded with further candidates, so the cost of n is the cheapest over m >= n;
    when a larger m is that cheap, the best m candidates are sent rather than n, since they
    come at no extra cost.
    """
    n_max = min(len(scores), len(curve) - 1)
    if n_max == 0:
        return 0
    cost = curve[: n_max + 1] + (overhead[: n_max + 1] if np.ndim(overhead) else overhead)
    gain = 1.0 + np.concatenate(([0.0], np.cumsum(np.sort(scores)[::-1][:n_max])))
    cheapest_from = np.minimum.accumulate(cost[::-1])[::-1]  # min cost(m), m >= n
    n = int(np.argmax(gain / cheapest_from))
    tail = cost[n:]
    # costs that differ in their last bits are a tie (curves are interpolated), so padding
    # does not hang on rounding: a curve cheaper everywhere must not pad less
    return n + int(np.flatnonzero(tail <= tail.min() * (1 + TIE))[-1]) if n else 0


@dataclass
class Span:
    """Output tokens [start, start + length) (indices among the new tokens) copied from
    ``document`` at token ``offset``, as drafted by ``source``."""

    start: int
    length: int
    source: str
    document: str
    offset: int


@dataclass
class _Proposal:
    """A tree to learn calibration from: as scored when proposed, with its source (one
    name, or one per node), the recycling matrix's verdict on its nodes, and the scores the
    budget saw (the fused tree's only, so the calibration error counts each node once)."""

    tree: DraftTree
    name: str | list[str]
    verdict: np.ndarray | None
    calibrated: np.ndarray | None


class Speculator:
    """Drafters, a calibrator and a cost table turned into one draft tree per step.

    drafters:   the sources (at most 8: a node's sources are a uint8 bit mask). A
                Speculator serves one generation, like its drafters.
    calibrator: maps raw scores to acceptance rates and learns from every step (None:
                raw scores, nothing learned).
    budget:     nodes per step, fixed; or None to choose each step's size on ``cost``.
    cost:       c(n), the cost of verifying n nodes relative to none: an array for n =
                0.., or a function of the context length returning one (e.g.
                ``decode.budget.CostModel.of(model).table``). Required when budget is None.
    config:     the knobs (``SpeculationConfig``); topk must match a recycling drafter's.

    Call ``propose`` then ``observe`` once per step. ``accepted`` (drafter name -> accepted
    nodes) and ``spans`` (copied spans, positions counted from the first observed step's
    first new token) accumulate over the steps.
    """

    def __init__(self, drafters: Sequence[Drafter], calibrator: Calibrator | None = None, *,
                 budget: int | None = None, cost: CostTable | None = None,
                 config: SpeculationConfig = DEFAULT):
        if len(drafters) > SOURCE_BITS:
            raise ValueError(f"{len(drafters)} drafters: at most {SOURCE_BITS} fit a node's source bits")
        if budget is None and cost is None:
            raise ValueError("pass a budget (nodes per step), or a cost table for the automatic budget")
        if budget is not None and (not isinstance(budget, (int, np.integer)) or budget < 0):
            raise ValueError(f"budget must be an int >= 0 or None, got {budget!r}")
        self.drafters, self.calibrator, self.budget, self.config = list(drafters), calibrator, budget, config
        self._cost = cost
        self._recycling = next((d.matrix for d in self.drafters if isinstance(d, RecyclingDrafter)), None)
        if self._recycling is not None and self._recycling.k != config.topk:
            raise ValueError(f"the recycling drafter's matrix keeps the top-{self._recycling.k} but "
                             f"config.topk is {config.topk}: build its OnlineState with topk={config.topk}")
        self.needs_topk = any(d.needs_topk for d in self.drafters)
        self.needs_hidden = any(getattr(d, "needs_hidden", False) for d in self.drafters)
        self.accepted: dict[str, int] = {d.name: 0 for d in self.drafters}
        self.spans: list[Span] = []
        self._tree: DraftTree | None = None
        self._proposed: list[_Proposal] = []
        self._first: int | None = None  # context length before the first observed step
        self._agree: dict[int, str] = {}  # source bit mask -> its calibration source name

    @property
    def max_nodes(self) -> int:
        """The most nodes a proposed tree can have (verification buffers are sized by it)."""
        return self.config.max_nodes if self.budget is None else self.budget

    def propose(self, context: np.ndarray, room: int | None = None) -> DraftTree:
        """The tree to verify after ``context`` (int32 [L]: prompt + verified output; read,
        not kept). ``room``: tokens the caller may still emit; accepted drafts plus the
        bonus token must fit, so the tree is cut to depth room - 1 (None: no limit).

        Each drafter's tree is calibrated, stamped with its source bit and origin tag; the
        trees are fused, cut to the depth and to ``budget`` nodes, or, with budget None, to
        the size ``choose_budget`` picks on the cost table from ``max_nodes`` candidates.
        """
        limit = self.max_nodes
        max_depth = limit if room is None else room - 1
        self._tree, self._proposed = DraftTree.empty(), []
        if limit <= 0 or max_depth <= 0 or not self.drafters:
            return self._tree
        trees = [self._draft(k, d, context, limit) for k, d in enumerate(self.drafters)]
        tree = fuse(trees, limit)
        if self.calibrator is not None and len(tree):
            # Each source was calibrated alone; whether a node's acceptance holds up depends on
            # which sources agree on it (and so, which disagree), so fused nodes are calibrated
            # again per set of agreeing sources.
            agree = [self._agreeing(m) for m in tree.sources.tolist()]
            fused = tree
            tree = exclusive(self.calibrator.calibrate(fused, agree, weight=self.config.calibration_weight))
            self._proposed.append(_Proposal(fused, agree, None, tree.scores))
        depths = tree.depths()
        if depths.max(initial=0) > max_depth:
            tree = tree.subset(np.flatnonzero(depths <= max_depth))
        if self.budget is None and len(tree):
            tree = prune(tree, choose_budget(tree.scores, self._cost_table(context.shape[0])))
        self._tree = tree
        return tree

    def _draft(self, k: int, d: Drafter, context: np.ndarray, limit: int) -> DraftTree:
        """Drafter ``k``'s tree, calibrated, with its source bit and its index in the origins."""
        raw = t = d.propose(context, limit)
        if not isinstance(t, DraftTree):
            raise TypeError(f"drafter {d.name!r} proposed a {type(t).__name__}, not a DraftTree")
        try:  # the walks over it are Numba passes, which do not check indices
            t.validate()
        except ValueError as e:
            raise ValueError(f"drafter {d.name!r} proposed an invalid tree: {e}") from None
        verdict = None
        if self.calibrator is not None:
            verdict = verdicts(t, int(context[-1]), self._recycling)
            t = self.calibrator.calibrate(t, d.name, verdict, weight=self.config.calibration_weight)
        self._proposed.append(_Proposal(raw, d.name, verdict, None))
        origins = np.where(t.origins >= 0, t.origins | (k << self.config.origin_bits), -1)
        return dataclasses.replace(t, sources=np.full(len(t), 1 << k, np.uint8), origins=origins)

    def _agreeing(self, mask: int) -> str:
        """The calibration source of a fused node proposed by the drafters in ``mask``."""
        name = self._agree.get(mask)
        if name is None:
            name = self._agree[mask] = "fused:" + "+".join(d.name for k, d in enumerate(self.drafters) if mask >> k & 1)
        return name

    def _cost_table(self, length: int) -> np.ndarray:
        return self._cost(length) if callable(self._cost) else self._cost

    def prime(self, context: np.ndarray, hidden: np.ndarray) -> None:
        """Before the first step: ``hidden`` (float [1, d]) is the prefill's last hidden state
        at the prompt's second-to-last position, the one that predicted ``context``'s (the
        prompt's) last token; drafters with ``needs_hidden`` observe it as if that token had
        just been emitted, so their first step has a query (no extra forward: the prefill
        computed it)."""
        for d in self.drafters:
            if getattr(d, "needs_hidden", False):
                d.observe(context, context[context.shape[0] - 1:], None, hidden=hidden)

    def observe(self, context: np.ndarray, emitted: int, topk_rows: np.ndarray | None = None,
                hidden: np.ndarray | None = None) -> None:
        """After verifying the last proposed tree: ``context`` (int32 [L]) now ends with the
        ``emitted`` tokens this step produced (accepted drafts, then the target's own token,
        unless the caller stopped early, e.g. at EOS).

        topk_rows: int32 [rows, 1 + config.topk], every verified tree row (0 = root, i + 1 =
                   node i): its input token, then the target's top-k after it; required if
                   ``needs_topk``, else ignored.
        hidden:    float [rows, d], the verify forward's last hidden state at the same rows;
                   drafters with ``needs_hidden`` get the rows whose successor was emitted,
                   [emitted, d], row j predicting new token j (None where not available).
        Accepted nodes are the tree path the emitted tokens follow.
        """
        if self._tree is None:
            raise RuntimeError("observe() follows propose(): no tree was proposed since the last observe")
        tree, self._tree = self._tree, None
        new = context[context.shape[0] - emitted:]
        path = _follow(tree, new)
        if self._first is None:
            self._first = context.shape[0] - emitted
        self._credit(tree, path, context.shape[0] - emitted - self._first)
        followed = None
        if hidden is not None:
            followed = hidden[[0] + [i + 1 for i in path]][: len(new)]
        for d in self.drafters:
            rows = topk_rows if d.needs_topk else None
            if getattr(d, "needs_hidden", False):
                d.observe(context, new, rows, hidden=followed)
            else:
                d.observe(context, new, rows)
        if self.calibrator is not None:
            for p in self._proposed:
                self.calibrator.observe(p.tree, p.name, new, p.verdict, p.calibrated)

    def _credit(self, tree: DraftTree, path: list[int], start: int) -> None:
        """Credit accepted nodes to their drafters and extend the copied spans; ``start`` is
        the index, among the new tokens, of the first accepted node."""
        if not path:
            return
        bits = tree.sources[path]
        for k, d in enumerate(self.drafters):
            self.accepted[d.name] += int(np.count_nonzero(bits & (1 << k)))
        low = (1 << self.config.origin_bits) - 1
        spans = self.spans
        for i, origin in enumerate(tree.origins[path].tolist()):
            if origin < 0:
                continue
            drafter = self.drafters[origin >> self.config.origin_bits]
            document, offset = drafter.locate(origin & low)
            at = start + i
            last = spans[-1] if spans else None
            # A gap of one is the previous step's bonus token: the next copy matched it in the
            # document, so the document goes on through it.
            if (last is not None and last.document == document and last.source == drafter.name
                    and at - (last.start + last.length) in (0, 1)
                    and offset - (last.offset + last.length) == at - (last.start + last.length)):
                last.length = at - last.start + 1
            else:
                spans.append(Span(at, 1, drafter.name, document, offset))


def _follow(tree: DraftTree, tokens: np.ndarray) -> list[int]:
    """Node indices of the longest tree path spelling a prefix of ``tokens``; among siblings
    with the same token the first wins, as in ``decode.acceptance``."""
    first: dict[tuple[int, int], int] = {}
    for i, key in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())):
        first.setdefault(key, i)
    path: list[int] = []
    node = -1
    for t in tokens.tolist():
        child = first.get((node, t))
        if child is None:
            break
        path.append(child)
        node = child
    return path
