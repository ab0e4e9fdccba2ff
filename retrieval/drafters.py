"""Drafters: each turns one source of text into a DraftTree for the current context."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from index.lookup import suffix_occurrences
from index.trie import build_trie
from retrieval.tree import DraftTree, fuse, prune


class Drafter(Protocol):
    """A source of drafts. ``name`` labels it in stats.

    ``propose`` is called once per step, before verification, with the whole context
    (int32 [L]: prompt + verified output, a view the caller owns and keeps changing: copy
    what you keep). ``observe`` is called after verification with the tokens accepted this
    step (including the bonus token) and, if the drafter's ``needs_topk`` is True, the
    target's top-k ids at every verified row (int32 [rows, k]); otherwise None.
    """

    name: str
    needs_topk: bool

    def propose(self, context: np.ndarray, budget: int) -> DraftTree: ...

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None: ...


def as_token_array(tokens, what: str) -> np.ndarray:
    """A 1-D int32 copy of ``tokens`` (list, numpy array or tensor), or ValueError naming ``what``."""
    a = np.asarray(tokens.tolist() if hasattr(tokens, "tolist") and not isinstance(tokens, np.ndarray) else tokens)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got {a.dtype} {list(a.shape)}")
    return a.astype(np.int32)


def join_documents(docs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One stream with a -1 separator after each document, and int64 [len(docs) + 1] starts."""
    starts = np.zeros(len(docs) + 1, np.int64)
    for i, d in enumerate(docs):
        starts[i + 1] = starts[i] + len(d) + 1
    stream = np.full(int(starts[-1]), -1, np.int32)
    for i, d in enumerate(docs):
        stream[starts[i] : starts[i] + len(d)] = d
    return stream, starts


class PromptLookupDrafter:
    """Copies what followed earlier occurrences of the context's last n tokens.

    Searches the context itself (prompt + output so far) and, if given, reference token
    streams. Unlike a single-chain prompt lookup, every occurrence of the longest matching
    suffix (up to ``max_occurrences``, most recent first) contributes a branch, and branches
    that agree share a counted trie. A node's score is the fraction of occurrences that
    continue through it, times ``confidence[n]`` per token of depth (longer matched
    suffixes are likelier to go on the same way).
    """

    name = "prompt_lookup"
    needs_topk = False

    def __init__(
        self,
        references: Sequence[np.ndarray] = (),
        min_n: int = 1,
        max_n: int = 4,
        max_occurrences: int = 8,
        depth: int = 10,
        confidence: Sequence[float] = (0.0, 0.5, 0.65, 0.75, 0.8),
    ):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n} max_n={max_n}")
        if len(confidence) <= max_n:
            raise ValueError(f"confidence needs an entry for each n up to {max_n}, got {len(confidence)}")
        self.min_n, self.max_n, self.depth = min_n, max_n, depth
        self.confidence = np.asarray(confidence, np.float32)
        self.references, self.doc_starts = join_documents([as_token_array(r, "a reference") for r in references])
        self._starts = np.empty(max_occurrences, np.int64)
        cap = max_occurrences * depth
        self._tokens = np.empty(cap, np.int32)
        self._parents = np.empty(cap, np.int32)
        self._counts = np.empty(cap, np.int32)
        self._origins = np.empty(cap, np.int64)

    def _lookup(self, stream: np.ndarray, end: int, context: np.ndarray, budget: int, attribute: bool) -> DraftTree:
        count, n = suffix_occurrences(stream, end, context, self.min_n, self.max_n, self._starts)
        if count == 0:
            return DraftTree.empty()
        k = build_trie(stream, self._starts[:count], self.depth, self._tokens, self._parents, self._counts, self._origins)
        parents = self._parents[:k]
        depth = np.ones(k, np.int32)
        for i in range(k):
            if parents[i] >= 0:
                depth[i] = depth[parents[i]] + 1
        scores = self._counts[:k] / np.float32(count) * self.confidence[n] ** depth
        origins = self._origins[:k].copy() if attribute else np.full(k, -1, np.int64)
        tree = DraftTree(self._tokens[:k].copy(), parents.copy(), scores.astype(np.float32), np.zeros(k, np.uint8), origins)
        return prune(tree, budget)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if budget <= 0:
            return DraftTree.empty()
        trees = [self._lookup(context, context.shape[0], context, budget, attribute=False)]
        if self.references.shape[0]:
            trees.append(self._lookup(self.references, self.references.shape[0], context, budget, attribute=True))
        return fuse(trees, budget)

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None:
        """Stateless: the context it searches already holds the accepted tokens."""

    def document_of(self, origin: int) -> tuple[int, int]:
        """(reference index, token offset in it) of a reference stream position."""
        doc = int(np.searchsorted(self.doc_starts, origin, side="right")) - 1
        return doc, origin - int(self.doc_starts[doc])
