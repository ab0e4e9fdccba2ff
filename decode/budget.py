"""What verification costs on this hardware, and how many draft nodes are worth it each step.

c(n) is the time of one forward over the root plus n draft nodes (LM head included) divided
by the time of a forward over the root alone. It is measured once per model, device, dtype,
thread count and context bucket, then cached on disk, because on a CPU it is far from linear
or even monotone (small matrix shapes hit slow kernels).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from retrodraft.decode.model import cache_dir
from retrodraft.decode.tree_attention import new_cache, verification_kernels, tree_inputs, truncate_cache
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.speculator import choose_budget  # noqa: F401  (numpy only, so it lives with the Speculator)
from retrodraft.retrieval.tree import DraftTree

SIZES = DEFAULT.cost_sizes  # reasons for both in SpeculationConfig
BUCKETS = DEFAULT.cost_contexts
VERIFY_PATH = 3  # bumped when the verification forward changes, so cached curves are re-measured


@dataclass(frozen=True)
class CostCurve:
    """c(n) for every n in 0..max_nodes, from measurements at ``SIZES`` (linear in between)."""

    sizes: tuple[int, ...]
    costs: tuple[float, ...]

    def table(self) -> np.ndarray:
        """float64 [max_nodes + 1]: c(n) for n = 0 .. max(sizes)."""
        return np.interp(np.arange(self.sizes[-1] + 1), self.sizes, self.costs)


def _key(model, context: int) -> str:
    p = next(model.parameters())
    ident = json.dumps(
        [model.config.to_json_string(), str(p.dtype), str(p.device), _device_name(p.device),
         torch.get_num_threads(), torch.__version__, context, VERIFY_PATH],
        sort_keys=True,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_seconds(model, context: int, sizes: tuple[int, ...] = SIZES, reps: int = 5,
                    kernels: Callable = verification_kernels) -> list[float]:
    """Seconds of a verification forward of 1 + n tokens for each n in ``sizes`` (a chain of
    n drafts, with its tree mask and cache as ``generate`` runs them, LM head included) over
    a cache of ``context`` random tokens, within ``kernels(model)``; the median of ``reps``."""
    device = model.device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    cache = new_cache(model, context + max(sizes) + 1)
    head = model.get_output_embeddings()
    seconds = []
    with kernels(model):
        model.base_model(input_ids=torch.randint(0, vocab, (1, context), generator=gen).to(device),
                         cache=cache, use_cache=True)
        for n in sizes:
            chain = DraftTree.build(torch.randint(0, vocab, (n,), generator=gen).numpy(), np.arange(n) - 1,
                                    np.ones(n))
            ids, positions, mask = tree_inputs(0, chain, context, device, model.dtype)
            times = []
            for r in range(reps + 2):  # two warm-ups
                _sync(device)
                t = time.perf_counter()
                h = model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                     cache=cache, use_cache=True).last_hidden_state
                head(h).argmax(-1)
                _sync(device)
                times.append(time.perf_counter() - t)
                truncate_cache(cache, context)
            seconds.append(float(np.median(times[2:])))
    return seconds


def measure(model, context: int, reps: int = 5) -> CostCurve:
    """c(n) at ``SIZES`` over a cache of ``context`` tokens, from ``forward_seconds``."""
    seconds = forward_seconds(model, context, SIZES, reps)
    return CostCurve(SIZES, tuple(s / seconds[0] for s in seconds))


def bucket(context: int) -> int:
    """The measured context length standing for ``context`` (nearest on a log scale)."""
    return min(BUCKETS, key=lambda b: abs(np.log(b) - np.log(max(context, 1))))


class CostModel:
    """c(n) tables for one model, per context bucket: read from the disk cache, or measured
    (a few seconds, once per model, device, dtype and bucket) and written there.
    ``CostModel.of(model)`` shares one instance per model object."""

    _instances: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model) -> CostModel:
        if model not in cls._instances:
            cls._instances[model] = cls(model)
        return cls._instances[model]

    def __init__(self, model):
        self.model = model
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 4096)
        self.longest = max(1, limit - SIZES[-1] - 1)  # measuring must stay inside the context window
        self._tables: dict[int, np.ndarray] = {}

    def curve(self, context: int) -> CostCurve:
        b = min(bucket(context), self.longest)
        path = cache_dir() / "cost" / f"{_key(self.model, b)}.json"
        if path.exists():
            data = json.loads(path.read_text())
            return CostCurve(tuple(data["sizes"]), tuple(data["costs"]))
        curve = measure(self.model, b)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"sizes": curve.sizes, "costs": curve.costs, "context": b}))
        tmp.replace(path)
        return curve

    def warm(self) -> None:
        """Load or measure every bucket now, so no later call pays for a measurement."""
        for b in BUCKETS:
            self.table(b)

    def table(self, context: int) -> np.ndarray:
        """c(n) for n = 0..max(SIZES) at this context length (memoised per bucket)."""
        b = min(bucket(context), self.longest)
        if b not in self._tables:
            self._tables[b] = self.curve(context).table()
        return self._tables[b]
