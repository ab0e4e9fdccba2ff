"""Drafters: each turns one source of text into a DraftTree for the current context.

A drafter serves one generation call: the engine builds fresh ones per call (structures
shared across calls, such as a datastore's, are passed in and updated in place).
"""

from __future__ import annotations

import heapq
from typing import Protocol, Sequence

import numpy as np

from retrodraft.index import suffix_array
from retrodraft.index.lookup import suffix_occurrences
from retrodraft.index.ngram import NgramTable
from retrodraft.index.recycling import TokenRecycling
from retrodraft.index.suffix_tree import SuffixTree
from retrodraft.index.trie import build_trie
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.tree import DraftTree, depths_of, fuse, prune


class Drafter(Protocol):
    """A source of drafts. ``name`` labels it in stats.

    ``propose`` is called once per step, before verification, with the whole context
    (int32 [L]: prompt + verified output, a view the caller owns and keeps changing: copy
    what you keep). ``observe`` is called after verification with the tokens accepted this
    step (including the bonus token) and, if the drafter's ``needs_topk`` is True, the
    verified tree rows as int32 [rows, 1 + k]: each row's input token, then the target's
    top-k ids after it; otherwise None. A drafter that copies from documents also has
    ``locate(origin) -> (document, token offset)`` for the origins it puts in its trees.
    A drafter that reads the target's hidden state sets ``needs_hidden = True``; its
    ``observe`` then also gets ``hidden=``, float [len(accepted), d]: row j is the final
    hidden state that chose accepted token j, so the last row is the state at the last
    accepted position (the verification forward computed it; no extra forward).
    """

    name: str
    needs_topk: bool

    def propose(self, context: np.ndarray, budget: int) -> DraftTree: ...

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None: ...


def as_token_array(tokens, what: str) -> np.ndarray:
    """A 1-D int32 copy of ``tokens`` (list, numpy array or CPU tensor), or ValueError naming ``what``."""
    a = np.asarray(tokens)
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


def _prior(scores: np.ndarray, parents: np.ndarray, first: float, decay: float) -> np.ndarray:
    """Count-ratio scores times the acceptance prior ``first * decay ** (depth - 1)``."""
    return (scores * first * decay ** (depths_of(parents) - 1)).astype(np.float32)


def _table(values: Sequence[float], n: int) -> float:
    """Entry n of a prior table indexed by match length, the last entry for longer matches."""
    return float(values[min(n, len(values) - 1)])


class _Lookup:
    """Prompt-lookup search of one stream: occurrences of the context's longest suffix
    (min_n..max_n tokens, up to ``max_occurrences``, most recent first) and the counted
    trie of what followed them, scored by the fraction of occurrences through each node
    times the prior for the match length."""

    def __init__(self, min_n: int, max_n: int, max_occurrences: int, depth: int,
                 first: Sequence[float], decay: Sequence[float]):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n} max_n={max_n}")
        self.min_n, self.max_n, self.depth, self.first, self.decay = min_n, max_n, depth, first, decay
        self._starts = np.empty(max_occurrences, np.int64)
        cap = max_occurrences * depth
        self._out = (np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int64))

    def tree(self, stream: np.ndarray, end: int, context: np.ndarray, budget: int, attribute: bool) -> DraftTree:
        count, n = suffix_occurrences(stream, end, context, self.min_n, self.max_n, self._starts)
        if count == 0 or budget <= 0:
            return DraftTree.empty()
        tokens, parents, counts, origins = self._out
        k = build_trie(stream, self._starts[:count], self.depth, tokens, parents, counts, origins)
        scores = _prior(counts[:k] / np.float32(count), parents[:k], _table(self.first, n), _table(self.decay, n))
        tree = DraftTree(tokens[:k].copy(), parents[:k].copy(), scores, np.zeros(k, np.uint8),
                         origins[:k].copy() if attribute else np.full(k, -1, np.int64))
        return prune(tree, budget)


# The lookup drafters' defaults, with the reasons for them, are SpeculationConfig's.
_PROMPT, _REFERENCE = DEFAULT.prompt_lookup, DEFAULT.reference


class PromptLookupDrafter:
    """Copies what followed earlier occurrences of the context's last n tokens in the context.

    Unlike a single-chain prompt lookup, every occurrence of the longest matching suffix
    contributes a branch, and branches that agree share a counted trie.
    """

    name = "prompt_lookup"
    needs_topk = False

    def __init__(self, min_n: int = _PROMPT.min_n, max_n: int = _PROMPT.max_n, max_occurrences: int = _PROMPT.max_occurrences,
                 depth: int = _PROMPT.depth, first: Sequence[float] = _PROMPT.first, decay: Sequence[float] = _PROMPT.decay):
        self._lookup = _Lookup(min_n, max_n, max_occurrences, depth, first, decay)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        return self._lookup.tree(context, context.shape[0], context, budget, attribute=False)

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None:
        """Stateless: the context it searches already holds the accepted tokens."""


class ReferenceDrafter:
    """LLMA-style copying from reference documents handed to the call.

    Same search as prompt lookup, over the references (joined with separators), and every
    node remembers the reference position it was copied from, for attribution.
    """

    name = "reference"
    needs_topk = False

    def __init__(self, references: Sequence[Sequence[int]], names: Sequence[str] | None = None,
                 min_n: int = _REFERENCE.min_n, max_n: int = _REFERENCE.max_n, max_occurrences: int = _REFERENCE.max_occurrences,
                 depth: int = _REFERENCE.depth, first: Sequence[float] = _REFERENCE.first, decay: Sequence[float] = _REFERENCE.decay):
        docs = [as_token_array(r, "a reference") for r in references]
        self.names = list(names) if names is not None else [f"reference {i}" for i in range(len(docs))]
        if len(self.names) != len(docs):
            raise ValueError(f"{len(docs)} references but {len(self.names)} names")
        self.stream, self.starts = join_documents(docs)
        self._lookup = _Lookup(min_n, max_n, max_occurrences, depth, first, decay)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        return self._lookup.tree(self.stream, self.stream.shape[0], context, budget, attribute=True)

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None:
        """Stateless."""

    def locate(self, origin: int) -> tuple[str, int]:
        """(reference name, token offset in it) of a position in the joined stream."""
        doc = int(np.searchsorted(self.starts, origin, side="right")) - 1
        return self.names[doc], origin - int(self.starts[doc])


# Suffix-tree priors per match length, fitted on the same traces.
SUFFIX_FIRST = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9)
SUFFIX_DECAY = (0.0, 0.7, 0.75, 0.8, 0.85, 0.9, 0.9, 0.92, 0.95)


class SuffixDrafter:
    """SuffixDecoding: a suffix tree over this request's context, plus a shared one over
    past outputs (``output_tree``, e.g. a datastore's), which this drafter also feeds.

    Scores are the trees' count ratios times a prior for the matched length.
    """

    name = "suffix"
    needs_topk = False

    def __init__(self, output_tree: SuffixTree | None = None, max_depth: int = 32,
                 first: Sequence[float] = SUFFIX_FIRST, decay: Sequence[float] = SUFFIX_DECAY):
        self.request = SuffixTree(max_depth=max_depth, max_tokens=1 << 24)
        self._seq = self.request.add_sequence()
        self._seen = 0
        self.output_tree = output_tree
        self._output_seq: int | None = None
        self.first, self.decay = first, decay

    def _tree(self, tree: SuffixTree, context: np.ndarray, budget: int) -> DraftTree:
        tokens, parents, scores, m = tree.draft(context, budget)
        if m == 0:
            return DraftTree.empty()
        scores = _prior(scores, parents, _table(self.first, m), _table(self.decay, m))
        return DraftTree(tokens, parents, scores, np.zeros(len(tokens), np.uint8), np.full(len(tokens), -1, np.int64))

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if budget <= 0:
            return DraftTree.empty()
        # The request tree holds the context minus its last token: a suffix must have a
        # continuation to be worth matching.
        self.request.append(self._seq, context[self._seen : context.shape[0] - 1])
        self._seen = context.shape[0] - 1
        trees = [self._tree(self.request, context, budget)]
        if self.output_tree is not None and len(self.output_tree):
            trees.append(self._tree(self.output_tree, context, budget))
        return fuse(trees, budget)

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None:
        if self.output_tree is None:
            return
        if self._output_seq is None or self._output_seq not in self.output_tree:
            self._output_seq = self.output_tree.add_sequence()
        self.output_tree.append(self._output_seq, accepted)


# N-gram priors per matched context length (index = n): set by hand between the suffix
# tree's and the corpus's (calibration learns the real rates per call).
NGRAM_FIRST = (0.0, 0.1, 0.3, 0.45, 0.6)
NGRAM_DECAY = (0.0, 0.5, 0.7, 0.8, 0.85)


class NgramDrafter:
    """The most frequent continuations of the longest context (up to the table's max_n
    tokens) in a shared n-gram table over past outputs (``table``, which it also feeds), as
    a tree: each node is expanded by looking up its own context, best first by the product
    of count ratios along its path times the prior for the root's match length.

    The table keeps the long tail the suffix tree's window has forgotten, in fixed memory,
    at the price of short contexts.
    """

    name = "ngram"
    needs_topk = False

    def __init__(self, table: NgramTable, min_n: int = 2, depth: int = 8,
                 first: Sequence[float] = NGRAM_FIRST, decay: Sequence[float] = NGRAM_DECAY):
        if not 1 <= min_n <= table.max_n:
            raise ValueError(f"need 1 <= min_n <= the table's max_n {table.max_n}, got {min_n}")
        self.table, self.min_n, self.depth, self.first, self.decay = table, min_n, depth, first, decay
        self._started = False

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if budget <= 0 or len(self.table) == 0:
            return DraftTree.empty()
        k = self.table.max_n
        tail = context[-k:]
        m, toks, cnts = self.table.lookup(tail)
        if m < self.min_n:
            return DraftTree.empty()
        # heap entries: (-score, push order, token, parent node, that node's context, depth)
        heap: list = []
        pushes = 0

        def push(parent: int, ctx: np.ndarray, toks: np.ndarray, cnts: np.ndarray, score: float, depth: int) -> None:
            nonlocal pushes
            total = float(cnts.sum())
            for t, c in zip(toks.tolist(), cnts.tolist()):
                heapq.heappush(heap, (-score * c / total, pushes, t, parent, ctx, depth))
                pushes += 1

        push(-1, tail, toks, cnts, 1.0, 1)
        tokens, parents, scores = [], [], []
        while heap and len(tokens) < budget:
            neg, _, t, parent, ctx, depth = heapq.heappop(heap)
            tokens.append(t)
            parents.append(parent)
            scores.append(-neg)
            if depth < self.depth:
                child = np.append(ctx, np.int32(t))[-k:]
                n, toks, cnts = self.table.lookup(child)
                if n >= self.min_n:
                    push(len(tokens) - 1, child, toks, cnts, -neg, depth + 1)
        parents_a = np.array(parents, np.int32)
        scores_a = _prior(np.array(scores, np.float32), parents_a, _table(self.first, m), _table(self.decay, m))
        n = len(tokens)
        return DraftTree(np.array(tokens, np.int32), parents_a, scores_a, np.zeros(n, np.uint8), np.full(n, -1, np.int64))

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None:
        """Count the accepted tokens, the call's output beginning a new document."""
        if not self._started:
            self._started = True
            accepted = np.concatenate(([-1], accepted)).astype(np.int32)
        self.table.update(accepted)


# Corpus priors per match length (REST): short matches in a large corpus say little.
CORPUS_FIRST = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
CORPUS_DECAY = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.9, 0.92)


class CorpusDrafter:
    """REST: continuations of the context's longest suffix found in a corpus suffix array.

    ``tokens``/``sa`` are typically a datastore's memory-mapped stream and suffix array
    (read, never written). ``locate`` maps a stream position to (document, offset).
    """

    name = "corpus"
    needs_topk = False

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, locate=None, max_len: int = 16, min_len: int = 2,
                 max_positions: int = 256, depth: int = 12,
                 first: Sequence[float] = CORPUS_FIRST, decay: Sequence[float] = CORPUS_DECAY):
        self.tokens, self.sa, self._locate = tokens, sa, locate
        self.max_len, self.min_len, self.max_positions, self.depth = max_len, min_len, max_positions, depth
        self.first, self.decay = first, decay

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        found = self._continuations(context, budget) if budget > 0 else None
        if found is None:
            return DraftTree.empty()
        (tokens, parents, scores, origins), m = found
        scores = _prior(scores, parents, _table(self.first, m), _table(self.decay, m))
        return DraftTree(tokens, parents, scores, np.zeros(len(tokens), np.uint8), origins)

    def _continuations(self, context: np.ndarray, budget: int) -> tuple[tuple, int] | None:
        """The counted continuation trie (tokens, parents, scores, origins) of the context's
        longest suffix in the corpus, and that suffix's length; None below ``min_len``."""
        if self.tokens.shape[0] == 0:
            return None
        lo, hi, m = suffix_array.longest_match(self.tokens, self.sa, context, self.max_len)
        if m < self.min_len:
            return None
        return suffix_array.continuations(self.tokens, self.sa, lo, hi, m, self.max_positions, self.depth,
                                          budget), m

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None:
        """Static: the corpus does not learn from outputs (the suffix drafter does)."""

    def locate(self, origin: int) -> tuple[str, int]:
        if self._locate is None:
            return "corpus", origin
        return self._locate(origin)


class RecyclingDrafter:
    """Token Recycling: the target's own most recent top-k after each token, as a tree.

    ``matrix`` is shared (a datastore keeps one per model); every verified row updates it.
    """

    name = "recycling"
    needs_topk = True

    def __init__(self, matrix: TokenRecycling):
        self.matrix = matrix

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        last = int(context[-1])
        if budget <= 0 or not 0 <= last < self.matrix.vocab_size:
            return DraftTree.empty()
        tokens, parents, scores = self.matrix.draft(last, budget)
        n = len(tokens)
        return DraftTree(tokens, parents, scores, np.zeros(n, np.uint8), np.full(n, -1, np.int64))

    def observe(self, context: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None:
        if topk is not None and len(topk):
            self.matrix.update(topk[:, 0], topk[:, 1:])
