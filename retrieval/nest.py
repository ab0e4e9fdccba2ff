"""NEST (Li et al. 2024): corpus spans found by the target's own hidden state, verified losslessly.

Stage 1, once per request: BM25 picks the documents most relevant to the prompt, and their
keys are gathered (``NestIndex.rows``). Stage 2, every step: exact kNN (``index.knn``) over
those keys with the hidden state of the last accepted position, projected like the keys.

A key at stream position p is the hidden state that predicts token p + 1, and the query is
the hidden state that predicted the context's last token, so a hit at p aligns corpus token
p + 1 with that last token and proposes the corpus tokens from p + 2 on. Where the corpus's
p + 1 differs from the last token (the paraphrase case NEST is for) the span still goes in,
at a lower weight. The hits' spans are fused into one trie by prefix; a node's score is the
share of the hits' similarity weight (softmax of -distance over the hits) that passes through
it, times a depth prior; the engine's calibrator then maps it to an acceptance rate, as for
every source. Nodes carry their stream position, so accepted spans cite (document, offset).
"""

from __future__ import annotations

import numpy as np

from retrodraft.index import knn
from retrodraft.retrieval.keys_store import Encoder, NestIndex
from retrodraft.retrieval.tree import DraftTree, depths_of, prune

MAX_ROWS = 16384  # key rows stage 1 gathers per request (stage 2's cost per step is linear in it)


class NestDrafter:
    """Drafts corpus spans whose hidden-state keys are nearest to the current one.

    index:       the datastore's ``NestIndex``
    encoder:     hidden states for documents without keys yet (lazy keys), or None
    k:           hits per step
    depth:       tokens per span
    max_rows:    key rows stage 1 gathers per request
    mismatch:    weight of a hit whose next corpus token is not the context's last token
    first/decay: depth prior first * decay ** (depth - 1)
    Each step's query is the last row of the ``hidden`` that ``observe`` gets (the engine
    passes it to drafters whose ``needs_hidden`` is True): the state at the last accepted
    position; before the first step, the prefill's (``Speculator.prime``). Without either
    it proposes nothing.
    """

    name = "nest"
    needs_topk = False
    needs_hidden = True

    def __init__(self, index: NestIndex, encoder: Encoder | None = None, k: int = 16, depth: int = 10,
                 max_rows: int = MAX_ROWS, mismatch: float = 0.3, first: float = 0.5, decay: float = 0.85):
        if k < 1 or depth < 1 or max_rows < 1:
            raise ValueError(f"k, depth and max_rows must be >= 1, got {k}, {depth}, {max_rows}")
        self.index, self.encoder = index, encoder
        self.k, self.depth, self.max_rows, self.mismatch, self.first, self.decay = k, depth, max_rows, mismatch, first, decay
        self.tokens = index.datastore.tokens
        self.documents: np.ndarray | None = None  # stage 1's choice, set on the first propose
        self._keys = np.empty((0, index.dims), np.float16)
        self._positions = np.empty(0, np.int64)
        self._query: np.ndarray | None = None

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None,
                hidden: np.ndarray | None = None) -> None:
        """Keeps the projected last row of ``hidden`` (float [len(accepted), h]) as the next
        query; nothing else to learn."""
        self._query = None if hidden is None or not len(hidden) else self.index.projection(
            np.asarray(hidden[-1], np.float32))

    def search(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream positions int64 [<= k], squared distances float32) of this step's hits,
        nearest first; stage 1 runs on the first call, over ``context`` (the prompt)."""
        if self.documents is None:
            self.documents = self.index.documents(context, self.max_rows)
            self._keys, self._positions = self.index.rows(self.documents, self.encoder)
        if self._query is None or not len(self._positions):
            return np.empty(0, np.int64), np.empty(0, np.float32)
        # one thread: a parallel launch per step costs more than the scan (see knn.search)
        ids, dist = knn.search(self._keys, self._query[None], self.k, "l2", parallel=False)
        return self._positions[ids[0]], dist[0]

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if budget <= 0:
            return DraftTree.empty()
        hits, dist = self.search(context)
        if not len(hits):
            return DraftTree.empty()
        # softmax of -distance, on the scale of the hits' own spread
        w = np.exp(-(dist - dist[0]) / max(float(np.median(dist - dist[0])), 1e-6))
        w = np.where(self.tokens[hits + 1] == context[-1], w, w * self.mismatch)
        return prune(self._trie(hits + 2, w / w.sum()), budget)

    def _trie(self, starts: np.ndarray, weights: np.ndarray) -> DraftTree:
        """The spans tokens[s : s + depth] (cut at a separator) fused by prefix; a node's raw
        score is the weight of the spans through it (so never above its parent's)."""
        tokens, parents, scores, origins = [], [], [], []
        children: dict[tuple[int, int], int] = {}
        stream = self.tokens
        for s, w in zip(starts.tolist(), weights.tolist()):
            node = -1
            for p in range(s, min(s + self.depth, stream.shape[0])):
                t = int(stream[p])
                if t < 0:
                    break
                c = children.get((node, t))
                if c is None:
                    c = children[(node, t)] = len(tokens)
                    tokens.append(t)
                    parents.append(node)
                    scores.append(0.0)
                    origins.append(p)
                scores[c] += w
                node = c
        if not tokens:
            return DraftTree.empty()
        parents_a = np.asarray(parents, np.int32)
        prior = self.first * self.decay ** (depths_of(parents_a) - 1)
        return DraftTree(np.asarray(tokens, np.int32), parents_a, (np.asarray(scores) * prior).astype(np.float32),
                         np.zeros(len(tokens), np.uint8), np.asarray(origins, np.int64))

    def locate(self, origin: int) -> tuple[str, int]:
        return self.index.datastore._source(origin)  # the corpus drafter's attribution, shared
