"""Online calibration: map each drafter's raw scores to observed acceptance rates.

Drafters score nodes in their own currency (count ratios, copy priors, recycling ranks).
The budget sums scores as probabilities, so they must mean the same thing across sources.
For every (source, depth, raw-score bucket) the calibrator counts how often a proposed
path turned out to be the target's own continuation, and replaces the raw score with a
smoothed rate that starts at the raw score and moves to the observed one.

Outcomes need no verification of the node: the tokens emitted in a step are the target's
own choices, so a path of depth d is right exactly when its tokens equal the first d
emitted ones (known for every d up to the number emitted, accepted or not).
"""

from __future__ import annotations

import numpy as np

from retrieval.tree import DraftTree

DEPTHS = 16  # depths beyond share the last row
BUCKETS = 20  # raw scores in [0, 1] are bucketed in steps of 0.05
PRIOR_WEIGHT = 8.0  # pseudo-observations at the raw score: how slowly evidence takes over


class Calibrator:
    """Acceptance counts per source (drafter name), depth and raw-score bucket: float64
    arrays [sources, DEPTHS, BUCKETS] ``seen``, ``hits`` and ``raw`` (the sum of raw scores
    seen, so a bucket's prior is its mean raw score). ``state()``/``from_state`` persist them."""

    def __init__(self, names: tuple[str, ...] = ()):
        self.names: list[str] = []
        self.seen = self.hits = self.raw = np.zeros((0, DEPTHS, BUCKETS))
        for name in names:
            self._index(name)

    def _index(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
            grow = np.zeros((1, DEPTHS, BUCKETS))
            self.seen, self.hits, self.raw = (np.concatenate([a, grow]) for a in (self.seen, self.hits, self.raw))
        return self.names.index(name)

    @staticmethod
    def _cells(tree: DraftTree) -> tuple[np.ndarray, np.ndarray]:
        depth = np.minimum(tree.depths(), DEPTHS) - 1
        bucket = np.minimum((tree.scores * BUCKETS).astype(np.int64), BUCKETS - 1)
        return depth, bucket

    def calibrate(self, tree: DraftTree, name: str) -> DraftTree:
        """``tree`` with scores replaced by smoothed acceptance rates; a child never scores
        above its parent (each node takes the minimum along its path)."""
        if len(tree) == 0:
            return tree
        source = self._index(name)
        d, b = self._cells(tree)
        seen, hits = self.seen[source, d, b], self.hits[source, d, b]
        prior = np.where(seen > 0, self.raw[source, d, b] / np.maximum(seen, 1), tree.scores)
        rate = (hits + PRIOR_WEIGHT * prior) / (seen + PRIOR_WEIGHT)
        scores = rate.astype(np.float32)
        for i, p in enumerate(tree.parents.tolist()):
            if p >= 0 and scores[i] > scores[p]:
                scores[i] = scores[p]
        return DraftTree(tree.tokens, tree.parents, scores, tree.sources, tree.origins)

    def observe(self, tree: DraftTree, name: str, emitted: np.ndarray) -> None:
        """Count the outcome of every node of ``tree`` (as proposed, raw scores) whose
        outcome ``emitted`` (the tokens the step produced) decides."""
        n = len(tree)
        if n == 0 or len(emitted) == 0:
            return
        depth = tree.depths()
        right = np.zeros(n, bool)
        known = np.zeros(n, bool)
        for i, p in enumerate(tree.parents.tolist()):
            parent_right = True if p < 0 else right[p]
            parent_known = True if p < 0 else known[p]
            if not parent_known or (parent_right and depth[i] > len(emitted)):
                continue  # the path reaches past what was emitted: undecided
            known[i] = True
            right[i] = parent_right and tree.tokens[i] == emitted[depth[i] - 1]
        source = self._index(name)
        d, b = self._cells(tree)
        np.add.at(self.seen[source], (d[known], b[known]), 1.0)
        np.add.at(self.hits[source], (d[known], b[known]), right[known].astype(np.float64))
        np.add.at(self.raw[source], (d[known], b[known]), tree.scores[known].astype(np.float64))

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
        c = cls()
        c.names = [str(n) for n in arrays["names"]]
        c.seen, c.hits, c.raw = (np.array(arrays[k], np.float64) for k in ("seen", "hits", "raw"))
        return c
