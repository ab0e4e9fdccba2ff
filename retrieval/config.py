"""SpeculationConfig: every tunable of one speculative step, once, with the reason for its value.

Values derived from others are properties, never separate settings. The format constants
of persisted state (the calibrator's cell grid in ``retrieval.calibration``, the recycling
matrix's shape, the cost-curve file key) are not settings: changing them would orphan what
a datastore or the cost cache already holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LookupSettings:
    """One copy-by-lookup drafter (prompt lookup, references): keyword arguments of
    ``PromptLookupDrafter`` / ``ReferenceDrafter``.

    min_n, max_n:     suffix lengths searched (the longest that occurs wins).
    max_occurrences:  occurrences of that suffix whose continuations form the tree.
    depth:            tokens copied after each occurrence.
    first, decay:     acceptance prior per matched suffix length (index = length, the last
                      entry for longer matches): first node ``first``, each deeper one
                      ``decay`` times its parent. Raw scores; calibration corrects them.
    """

    min_n: int
    max_n: int
    max_occurrences: int
    depth: int
    first: tuple[float, ...]
    decay: tuple[float, ...]


@dataclass(frozen=True)
class SpeculationConfig:
    """Every knob of ``Speculator`` and ``decode.generate``; ``SpeculationConfig()`` is what
    they use by default. Frozen: a run's settings cannot drift while it runs, and
    ``as_dict()`` records them (tools/bench.py stores it with its results)."""

    # Tree sizes n whose verification cost c(n) is measured (linear in between). The largest
    # bounds the candidates considered per step (see max_nodes); finer steps where c(n) bends
    # on a CPU (small matrix shapes hit different kernels), coarser above.
    cost_sizes: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    # Context lengths at which c(n) is measured; a call uses the nearest on a log scale.
    # Attention's share of a forward grows with the context, so one curve does not fit all.
    cost_contexts: tuple[int, ...] = (256, 1024, 4096)
    # Top-k ids per verified row handed to drafters that learn from them (token recycling):
    # 8 is Token Recycling's own choice and what the recorded traces hold (``top8``). The
    # recycling matrix of an ``OnlineState`` is built with this k.
    topk: int = 8
    # A fused node's origin (a position in a document stream) carries its drafter's index
    # above this many bits: streams up to 2**48 tokens, drafter indices up to 2**15, in int64.
    origin_bits: int = 48
    # Pseudo-observations at a drafter's raw score in each calibration cell: how slowly
    # evidence takes over. At 8, a cell follows observed acceptance after a few dozen nodes
    # and one lucky step moves it by at most 1/9.
    calibration_weight: float = 8.0
    # Prompt lookup over the context. Priors fitted by replaying the recorded SmolLM2 greedy
    # traces of ../shared/data/traces (Spec-Bench, all categories).
    prompt_lookup: LookupSettings = field(default_factory=lambda: LookupSettings(
        min_n=1, max_n=4, max_occurrences=8, depth=10,
        first=(0.0, 0.42, 0.55, 0.6, 0.93), decay=(0.0, 0.6, 0.7, 0.85, 0.95)))
    # References handed to the call: a match needs 2 tokens (documents are long, one token
    # matches anywhere) and copies run longer (a reference is meant to be copied from).
    reference: LookupSettings = field(default_factory=lambda: LookupSettings(
        min_n=2, max_n=8, max_occurrences=8, depth=16,
        first=(0.0, 0.0, 0.55, 0.6, 0.93), decay=(0.0, 0.0, 0.7, 0.85, 0.95)))

    def __post_init__(self) -> None:
        s = self.cost_sizes
        if not s or s[0] != 0 or any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"cost_sizes must start at 0 and increase, got {s}")
        if not self.cost_contexts or min(self.cost_contexts) < 1:
            raise ValueError(f"cost_contexts must be positive context lengths, got {self.cost_contexts}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if not 16 <= self.origin_bits <= 48:
            raise ValueError(f"origin_bits must be in [16, 48] (drafter index above, int64), got {self.origin_bits}")
        if self.calibration_weight <= 0:
            raise ValueError(f"calibration_weight must be > 0, got {self.calibration_weight}")
        for name in ("prompt_lookup", "reference"):
            lk = getattr(self, name)
            if not 1 <= lk.min_n <= lk.max_n or lk.max_occurrences < 1 or lk.depth < 1:
                raise ValueError(f"{name}: need 1 <= min_n <= max_n and max_occurrences, depth >= 1, got {lk}")

    @property
    def max_nodes(self) -> int:
        """Candidates considered per step with the automatic budget: the largest measured size."""
        return self.cost_sizes[-1]

    def as_dict(self) -> dict:
        """Plain JSON-ready values, derived ones included, to store with results."""
        return {**dataclasses.asdict(self), "max_nodes": self.max_nodes}


DEFAULT = SpeculationConfig()
