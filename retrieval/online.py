"""What drafting learns while the target runs: past outputs (a recent window in a suffix
tree, the long tail in an n-gram table), the target's recent top-k and the score calibration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrodraft.index.ngram import NgramTable
from retrodraft.index.recycling import TokenRecycling
from retrodraft.index.suffix_tree import SuffixTree
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.drafters import Drafter, NgramDrafter, RecyclingDrafter, SuffixDrafter

OUTPUT_DEPTH = 32
NGRAM_N = 4  # longest context an n-gram drafts from
NGRAM_TOP_K = 8  # continuations counted per n-gram
# Measured peak bytes of the depth-32 output tree per live token (its arrays double when
# full): 856 on a 64k window and 1,703 on a 16k one, over GSM8K answers in the default
# tokenizer. A byte budget buys that many tokens at 2 KiB each, so the tree stays under it.
SUFFIX_BYTES_PER_TOKEN = 2048
MIB = 1 << 20


@dataclass(frozen=True)
class LearnedMemory:
    """Bytes the learned past outputs may take: ``suffix_bytes`` for the suffix tree over the
    recent window (exact, any length of match), ``ngram_bytes`` for the n-gram table that
    keeps the long tail (contexts of up to 4 tokens, fixed memory). The recycling matrix
    (vocab x 8 int32) and the calibration counts come on top, fixed by the vocabulary."""

    suffix_bytes: int = 128 * MIB
    ngram_bytes: int = 64 * MIB

    def __post_init__(self):
        if self.suffix_bytes < SUFFIX_BYTES_PER_TOKEN:
            raise ValueError(f"suffix_bytes must be at least {SUFFIX_BYTES_PER_TOKEN} (one token), got {self.suffix_bytes}")
        NgramTable.ngrams_for(self.ngram_bytes, NGRAM_N, NGRAM_TOP_K)  # ValueError if too small

    @classmethod
    def of(cls, memory: LearnedMemory | int | None) -> LearnedMemory:
        """``memory`` as a LearnedMemory: None is the default, an int a total split 2:1
        between the suffix tree and the n-gram table as in the default."""
        if memory is None:
            return cls()
        if isinstance(memory, cls):
            return memory
        if isinstance(memory, (int, np.integer)) and not isinstance(memory, bool):
            return cls(suffix_bytes=int(memory) * 2 // 3, ngram_bytes=int(memory) // 3)
        raise ValueError(f"memory must be a byte count or a LearnedMemory, got {memory!r}")

    @property
    def window_tokens(self) -> int:
        """Past-output tokens the suffix tree keeps (the newest)."""
        return self.suffix_bytes // SUFFIX_BYTES_PER_TOKEN

    @property
    def max_ngrams(self) -> int:
        return NgramTable.ngrams_for(self.ngram_bytes, NGRAM_N, NGRAM_TOP_K)


class OnlineState:
    """A suffix tree over recent past outputs, an n-gram table over all of them, the
    token-recycling matrix and the score calibration, shared by the calls of one process (in
    memory) or of one datastore scope (persisted by ``retrieval.learned``)."""

    def __init__(self, vocab_size: int, memory: LearnedMemory | int | None = None, max_depth: int = OUTPUT_DEPTH,
                 outputs: list[np.ndarray] | None = None, recycling_rows: np.ndarray | None = None,
                 calibration: dict[str, np.ndarray] | None = None, ngram: dict[str, np.ndarray] | None = None,
                 topk: int = DEFAULT.topk):
        """``outputs`` (oldest first) fill the suffix tree's window and, unless ``ngram`` (an
        ``NgramTable.state()``) already counts them, the n-gram table."""
        self.memory = LearnedMemory.of(memory)
        self.calibrator = Calibrator.from_state(calibration) if calibration else Calibrator()
        self.output_tree = SuffixTree(max_depth=max_depth, max_tokens=self.memory.window_tokens)
        self.ngram = (NgramTable(NGRAM_N, NGRAM_TOP_K, max_ngrams=self.memory.max_ngrams) if ngram is None
                      else NgramTable.from_state(ngram, max_ngrams=self.memory.max_ngrams))
        for seq in outputs or ():
            self.add_output(seq, ngram=ngram is None)
        self.recycling = (TokenRecycling(vocab_size, k=topk) if recycling_rows is None
                          else TokenRecycling.from_state({"rows": np.asarray(recycling_rows, np.int32)}))
        if self.recycling.vocab_size != vocab_size:
            raise ValueError(f"recycling matrix has {self.recycling.vocab_size} rows, the model's vocabulary {vocab_size}")

    def add_output(self, tokens: np.ndarray, ngram: bool = True) -> None:
        """Learn a whole past output (one generated elsewhere, or loaded)."""
        self.output_tree.add_sequence(tokens)
        if ngram:
            self.ngram.update(np.concatenate(([-1], tokens)).astype(np.int32))

    @property
    def nbytes(self) -> int:
        """Bytes of the learned structures' arrays now (suffix tree, n-gram table, recycling, calibration)."""
        c = self.calibrator
        return (self.output_tree.nbytes + self.ngram.nbytes + self.recycling.state()["rows"].nbytes
                + c.seen.nbytes + c.hits.nbytes + c.raw.nbytes)

    def drafters(self) -> list[Drafter]:
        """Fresh per-call drafters over the shared structures."""
        return [SuffixDrafter(self.output_tree), NgramDrafter(self.ngram), RecyclingDrafter(self.recycling)]
