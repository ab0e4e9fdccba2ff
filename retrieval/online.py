"""What drafting learns while the target runs: past outputs and the target's recent top-k."""

from __future__ import annotations

import numpy as np

from retrodraft.index.recycling import TokenRecycling
from retrodraft.index.suffix_tree import SuffixTree
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.drafters import Drafter, RecyclingDrafter, SuffixDrafter

OUTPUT_TOKENS = 1 << 18  # past-output tokens kept (oldest evicted): ~250 MB of tree at depth 32
OUTPUT_DEPTH = 32


class OnlineState:
    """A suffix tree over past outputs, the token-recycling matrix and the score
    calibration, shared by the calls of one process (in memory) or of one datastore
    (persisted by it)."""

    def __init__(self, vocab_size: int, max_tokens: int = OUTPUT_TOKENS, max_depth: int = OUTPUT_DEPTH,
                 outputs: list[np.ndarray] | None = None, recycling_rows: np.ndarray | None = None,
                 calibration: dict[str, np.ndarray] | None = None, topk: int = DEFAULT.topk):
        self.calibrator = Calibrator.from_state(calibration) if calibration else Calibrator()
        self.output_tree = SuffixTree(max_depth=max_depth, max_tokens=max_tokens)
        for seq in outputs or ():
            self.output_tree.add_sequence(seq)
        self.recycling = (TokenRecycling(vocab_size, k=topk) if recycling_rows is None
                          else TokenRecycling.from_state({"rows": np.asarray(recycling_rows, np.int32)}))
        if self.recycling.vocab_size != vocab_size:
            raise ValueError(f"recycling matrix has {self.recycling.vocab_size} rows, the model's vocabulary {vocab_size}")

    def drafters(self) -> list[Drafter]:
        """Fresh per-call drafters over the shared structures."""
        return [SuffixDrafter(self.output_tree), RecyclingDrafter(self.recycling)]
