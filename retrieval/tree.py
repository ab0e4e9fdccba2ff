"""DraftTree: the one currency between drafters and the verifier.

A tree of draft tokens hanging below the root, which is the last verified token and is not
a node. Nodes are stored in topological order (a parent's index is smaller than its
child's) as flat numpy arrays, so drafters can fill them from Numba kernels and the
verifier can turn them into an attention mask without walking Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrodraft.index import tree_paths


def depths_of(parents: np.ndarray) -> np.ndarray:
    """int32[n] node depths (1 = child of the root) from topologically ordered parents."""
    return tree_paths.depths(np.asarray(parents))


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens as a tree in flat arrays (all of length n).

    tokens  int32[n]    draft token ids
    parents int32[n]    parent node index, -1 for children of the root
    scores  float32[n]  estimated probability that the whole path to the node is accepted;
                        never larger than the parent's score
    sources uint8[n]    bit mask of the drafters that proposed the node (bit k: drafter k)
    origins int64[n]    position in the datastore/reference the token was copied from, -1 if none
    """

    tokens: np.ndarray
    parents: np.ndarray
    scores: np.ndarray
    sources: np.ndarray
    origins: np.ndarray

    @classmethod
    def empty(cls) -> DraftTree:
        """The tree with no nodes: the one way to say "no draft"."""
        return cls(
            np.empty(0, np.int32),
            np.empty(0, np.int32),
            np.empty(0, np.float32),
            np.empty(0, np.uint8),
            np.empty(0, np.int64),
        )

    @classmethod
    def build(
        cls,
        tokens,
        parents,
        scores=None,
        sources=None,
        origins=None,
    ) -> DraftTree:
        """Coerce array-likes to the canonical dtypes and validate.

        Missing scores default to 1.0, sources to 0 and origins to -1.
        Raises ValueError if the result is not a valid tree (see ``validate``).
        """
        tokens = np.ascontiguousarray(tokens, np.int32)
        n = tokens.shape[0] if tokens.ndim == 1 else -1
        tree = cls(
            tokens,
            np.ascontiguousarray(parents, np.int32),
            np.ascontiguousarray(np.ones(n, np.float32) if scores is None else scores, np.float32),
            np.ascontiguousarray(np.zeros(n, np.uint8) if sources is None else sources, np.uint8),
            np.ascontiguousarray(np.full(n, -1, np.int64) if origins is None else origins, np.int64),
        )
        tree.validate()
        return tree

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def validate(self) -> None:
        """Raise ValueError unless the arrays describe a tree in topological order."""
        n = self.tokens.shape[0]
        for name in ("tokens", "parents", "scores", "sources", "origins"):
            a = getattr(self, name)
            if a.ndim != 1 or a.shape[0] != n:
                raise ValueError(
                    f"DraftTree.{name} must be 1-D of length {n} (len(tokens)), got shape {a.shape}"
                )
        for name, kinds in (("tokens", "iu"), ("parents", "iu"), ("scores", "f")):
            if getattr(self, name).dtype.kind not in kinds:
                raise ValueError(f"DraftTree.{name} must hold {'integers' if kinds == 'iu' else 'floats'}, "
                                 f"got {getattr(self, name).dtype}")
        if n == 0:
            return
        rule, i = tree_paths.first_fault(self.tokens, self.parents, self.scores)  # one pass: it runs every step
        if rule == 1:
            raise ValueError(
                f"DraftTree node {i} has parent {int(self.parents[i])}: a parent must come "
                "before its child (parents[i] < i, or -1 for the root)"
            )
        if rule == 2:
            raise ValueError("DraftTree.tokens must be non-negative token ids")
        if rule == 3:
            raise ValueError(
                f"DraftTree node {i} scores {self.scores[i]:.4f}, more than its parent "
                f"{int(self.parents[i])}: a path can't be likelier than its prefix"
            )

    def depths(self) -> np.ndarray:
        """int32[n]: 1 for children of the root, parent's depth + 1 below."""
        return depths_of(self.parents)

    def path(self, i: int) -> np.ndarray:
        """Node indices from the root's child down to node ``i`` (inclusive)."""
        out = []
        while i >= 0:
            out.append(i)
            i = int(self.parents[i])
        return np.array(out[::-1], np.int64)

    def subset(self, keep: np.ndarray) -> DraftTree:
        """The tree restricted to ``keep`` (sorted node indices, closed under parent)."""
        keep = np.asarray(keep, np.int64)
        remap = np.full(len(self) + 1, -1, np.int32)  # remap[-1] stays -1 for the root
        remap[keep] = np.arange(keep.shape[0], dtype=np.int32)
        return DraftTree(
            self.tokens[keep],
            remap[self.parents[keep]],
            self.scores[keep],
            self.sources[keep],
            self.origins[keep],
        )


def prune(tree: DraftTree, budget: int, min_score: float = 0.0) -> DraftTree:
    """Keep the ``budget`` nodes with the highest path scores (and score >= min_score).

    The expected number of accepted tokens of a tree is the sum of its nodes' path scores,
    so this is the best tree of that size drawn from ``tree``.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    n = len(tree)
    # score[child] <= score[parent] and ties go to the lower index (the parent), so every
    # top-budget set is closed under parent and stays a tree.
    order = np.lexsort((np.arange(n), -tree.scores))
    keep = order[:budget]
    keep = keep[tree.scores[keep] >= min_score]
    if keep.shape[0] == n:
        return tree
    return tree.subset(np.sort(keep))


def fuse(trees: list[DraftTree], budget: int | None = None) -> DraftTree:
    """Merge trees by longest common prefix, then prune to ``budget`` nodes.

    Paths with the same token prefix share nodes. A shared node takes the highest score
    among its proposers (the sources often see the same text, so their estimates are not
    independent evidence), the union of their source bits, and the origin of the best
    scoring proposer that has one.
    """
    trees = [t for t in trees if len(t)]
    if not trees:
        return DraftTree.empty()
    if len(trees) == 1:
        fused = trees[0]
    else:
        starts = np.cumsum([0] + [len(t) for t in trees])
        m, *merged = tree_paths.merge(*(np.concatenate([getattr(t, f) for t in trees])
                                        for f in ("tokens", "parents", "scores", "sources", "origins")), starts)
        fused = DraftTree(*(a[:m] for a in merged))
    return fused if budget is None else prune(fused, budget)


def exclusive(tree: DraftTree) -> DraftTree:
    """``tree`` with scores made consistent as path probabilities: siblings are different
    tokens, so at most one is the target's next, and their scores may sum to no more than
    their parent's (1 under the root). Where they do, they are scaled down together with
    their subtrees. Fused trees need it: each source is calibrated alone, and two sources
    confidently proposing different tokens cannot both be right."""
    if len(tree) == 0:
        return tree
    scores = tree_paths.exclusive_scores(tree.scores.astype(np.float64), tree.parents)
    return DraftTree(tree.tokens, tree.parents, scores.astype(np.float32), tree.sources, tree.origins)
