"""Online calibration: map each drafter's raw scores to observed acceptance rates.

Drafters score nodes in their own currency (count ratios, copy priors, recycling ranks).
The budget sums scores as probabilities, so they must mean the same thing across sources.
For every (source, depth, raw-score bucket) the calibrator counts how often a proposed
path turned out to be the target's own continuation, and replaces the raw score with a
smoothed rate that starts at the raw score and moves to the observed one.

Outcomes need no verification of the node: the tokens emitted in a step are the target's
own choices, so a path of depth d is right exactly when its tokens equal the first d
emitted ones (known for every d up to the number emitted, accepted or not).

Cells are also split by a verdict of the target's own recent top-k (the token-recycling
matrix) on each node: is the node's token what the target ranked first after the parent's
token the last time it saw it, in its top-k, or not at all (RASD's pruning signal, with the
recycling matrix as the cheap draft distribution). Retrieval branches the target has
recently ranked low thus learn low scores, and the budget drops them, while the threshold
is learned from acceptance instead of fixed.
"""

from __future__ import annotations

import numpy as np

from retrodraft.index import tree_paths
from retrodraft.index.recycling import TokenRecycling
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.tree import DraftTree

# The cell grid below is the shape of persisted calibration state (a datastore keeps it), so
# it is a format, not a setting; the smoothing weight is SpeculationConfig.calibration_weight.
VERDICTS = 4  # of the recycling matrix on a node: no row yet, top-1, in the top-k, absent
DEPTHS = 16  # depths beyond share the last row
BUCKETS = 20  # raw scores in [0, 1] are bucketed in steps of 0.05
BINS = 10  # of calibrated predictions, for the reliability report


def verdicts(tree: DraftTree, last_token: int, recycling: TokenRecycling | None) -> np.ndarray | None:
    """int64 [n]: the recycling matrix's verdict on each node of ``tree``, drafted after
    ``last_token`` (0: no row for the parent token yet, 1: the target's top-1 there, 2: in
    its top-k, 3: absent); None without a matrix."""
    if recycling is None or len(tree) == 0:
        return None
    after = np.where(tree.parents >= 0, tree.tokens[tree.parents], last_token)
    rank = recycling.ranks(after, tree.tokens)
    return (rank >= 0).astype(np.int64) + (rank >= 1) + (rank >= recycling.k)  # the codes above, in order


class Calibrator:
    """Acceptance counts per source (drafter name), verdict (see ``verdicts``), depth and
    raw-score bucket: float64 arrays [sources, VERDICTS, DEPTHS, BUCKETS] ``seen``, ``hits``
    and ``raw`` (the sum of raw scores seen, so a bucket's prior is its mean raw score).
    ``state()``/``from_state`` persist them."""

    def __init__(self, names: tuple[str, ...] = ()):
        self.names: list[str] = []
        self._ids: dict[str, int] = {}  # position of each name in ``names``
        self.seen = self.hits = self.raw = np.zeros((0, VERDICTS, DEPTHS, BUCKETS))
        # per prediction bin: decided nodes, sum of their calibrated scores, accepted ones
        self.reliability = np.zeros((BINS, 3))
        for name in names:
            self._index(name)

    def _index(self, name: str) -> int:
        k = self._ids.get(name)
        if k is None:
            k = self._ids[name] = len(self.names)
            self.names.append(name)
            grow = np.zeros((1, VERDICTS, DEPTHS, BUCKETS))
            self.seen, self.hits, self.raw = (np.concatenate([a, grow]) for a in (self.seen, self.hits, self.raw))
        return k

    def _cells(self, tree: DraftTree, name: str | list[str], verdict: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """(source, verdict, depth, score bucket) of every node; ``name`` is the source of
        all of them, or one per node."""
        if isinstance(name, str):
            source = np.full(len(tree), self._index(name), np.int64)
        else:
            source = np.array([self._index(n) for n in name], np.int64)
        depth = np.minimum(tree.depths(), DEPTHS) - 1
        bucket = np.minimum((tree.scores * BUCKETS).astype(np.int64), BUCKETS - 1)
        return source, (np.zeros(len(tree), np.int64) if verdict is None else verdict), depth, bucket

    def calibrate(self, tree: DraftTree, name: str | list[str], verdict: np.ndarray | None = None,
                  weight: float = DEFAULT.calibration_weight) -> DraftTree:
        """``tree`` with scores replaced by smoothed acceptance rates; a child never scores
        above its parent (each node takes the minimum along its path). ``name``: the source
        of the nodes, or one per node; ``verdict``: the recycling matrix's on each node
        (``verdicts``), None for no opinion; ``weight``: pseudo-observations at the raw
        score per cell (``SpeculationConfig.calibration_weight``)."""
        if len(tree) == 0:
            return tree
        cell = self._cells(tree, name, verdict)
        seen, hits = self.seen[cell], self.hits[cell]
        prior = np.where(seen > 0, self.raw[cell] / np.maximum(seen, 1), tree.scores)
        rate = (hits + weight * prior) / (seen + weight)
        scores = rate.astype(np.float32)
        tree_paths.path_minimum(scores, tree.parents)
        return DraftTree(tree.tokens, tree.parents, scores, tree.sources, tree.origins)

    def observe(self, tree: DraftTree, name: str | list[str], emitted: np.ndarray, verdict: np.ndarray | None = None,
                predicted: np.ndarray | None = None) -> None:
        """Count the outcome of every node of ``tree`` (as proposed, raw scores, with the
        ``verdict`` it was calibrated with) whose outcome ``emitted`` (the tokens the step
        produced) decides. ``predicted``: the scores ``calibrate`` gave those nodes, for the
        reliability report."""
        n = len(tree)
        if n == 0 or len(emitted) == 0:
            return
        known, right = tree_paths.outcomes(tree.tokens, tree.parents, np.asarray(emitted))
        cell = tuple(c[known] for c in self._cells(tree, name, verdict))
        np.add.at(self.seen, cell, 1.0)
        np.add.at(self.hits, cell, right[known].astype(np.float64))
        np.add.at(self.raw, cell, tree.scores[known].astype(np.float64))
        if predicted is not None:
            p = predicted[known].astype(np.float64)
            bins = np.minimum((p * BINS).astype(np.int64), BINS - 1)
            np.add.at(self.reliability, bins, np.stack([np.ones_like(p), p, right[known]], axis=1))

    def calibration_error(self) -> tuple[float, list[tuple[float, float, int]]]:
        """Predicted against observed acceptance of the nodes observed with ``predicted``
        scores: the expected calibration error (mean |predicted - observed| over prediction
        bins, weighted by nodes) and, per non-empty bin, (mean predicted, observed rate, nodes)."""
        n, p, hits = self.reliability.T
        rows = [(float(p[i] / n[i]), float(hits[i] / n[i]), int(n[i])) for i in np.flatnonzero(n)]
        total = n.sum()
        return (float(np.abs(p - hits).sum() / total) if total else 0.0), rows

    def report(self) -> list[tuple[str, float, float, int]]:
        """(source name, mean raw score, observed acceptance rate, observations) per source."""
        out = []
        for k, name in enumerate(self.names):
            seen = self.seen[k].sum()
            if seen:
                out.append((name, float(self.raw[k].sum() / seen), float(self.hits[k].sum() / seen), int(seen)))
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The counts, and the source names as a fixed-width string array (no pickling)."""
        return {"names": np.array(self.names, dtype="U64"), "seen": self.seen, "hits": self.hits, "raw": self.raw}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray]) -> Calibrator:
        """A calibrator from ``state()`` arrays; ValueError if they are not well-formed counts."""
        c = cls()
        c.names = [str(n) for n in arrays["names"]]
        c._ids = {n: k for k, n in enumerate(c.names)}
        c.seen, c.hits, c.raw = (np.array(arrays[k], np.float64) for k in ("seen", "hits", "raw"))
        if c.seen.ndim == 3:  # saved before verdicts: what was learned seeds every verdict
            c.seen, c.hits, c.raw = (np.repeat(a[:, None], VERDICTS, axis=1) for a in (c.seen, c.hits, c.raw))
        shape = (len(c.names), VERDICTS, DEPTHS, BUCKETS)
        if any(a.shape != shape or not np.isfinite(a).all() or (a < 0).any() for a in (c.seen, c.hits, c.raw)) \
                or (c.hits > c.seen).any():
            raise ValueError(f"calibration state must be finite counts >= 0 (hits <= seen) of shape {list(shape)}, got "
                             f"shapes {[list(a.shape) for a in (c.seen, c.hits, c.raw)]} with NaN, inf or bad counts")
        return c
