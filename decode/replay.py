"""Replay recorded greedy traces through the drafters, without the model.

A trace holds a prompt, the target's greedy output and the target's top-k ids at every
output position. At each step the drafters propose exactly as in ``generate``; the
accepted path is the longest tree path that matches the recorded continuation (for greedy
decoding that is what verification would accept), plus the bonus token. Replay therefore
predicts a real run's mean accepted tokens exactly, for any budget, in seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from retrodraft.decode.acceptance import accept_greedy
from retrodraft.decode.budget import CostModel
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT, SpeculationConfig
from retrodraft.retrieval.drafters import Drafter
from retrodraft.retrieval.speculator import Speculator


@dataclass
class Trace:
    """One recorded generation: prompt and output ids, and top-k int32 [len(output), k]."""

    qid: str
    category: str
    prompt: np.ndarray
    output: np.ndarray
    topk: np.ndarray


def load_traces(path: str | Path) -> list[Trace]:
    """Traces from a JSONL file with fields qid, cat, prompt, output, top8 (as recorded by
    ``tools/bench.py record`` or found in ../shared/data/traces)."""
    out = []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        out.append(Trace(str(r["qid"]), r["cat"], np.asarray(r["prompt"], np.int32),
                         np.asarray(r["output"], np.int32), np.asarray(r["top8"], np.int32)))
    return out


def replay(trace: Trace, drafters: Sequence[Drafter], budget: int | None = None,
           cost_table: np.ndarray | None = None, calibrator: Calibrator | None = None,
           config: SpeculationConfig = DEFAULT, costs: CostModel | None = None,
           hidden: np.ndarray | None = None) -> tuple[int, int, float]:
    """(steps, new tokens, step cost) of greedy speculative decoding of ``trace``.

    budget: fixed nodes per step, or None with ``cost_table`` (c(n), as
    ``CostModel.table``) or ``costs`` to choose per step like ``generate`` does. With
    ``costs`` (a ``CostModel``, the one ``generate`` uses) each step weighs c(n) + d(n) as
    ``generate`` does, d learned from this replay's own drafting time per step, and the cost
    is the sum over steps of c(n) plus the step's measured drafting time, both in units of a
    0-node forward; with ``cost_table`` only, the sum of c(n); else 0. New tokens / cost is
    the predicted speedup over one token per 0-node forward with no host time.
    ``calibrator`` calibrates and learns as in ``generate`` with its default drafters.
    Drafters that need top-k learn from the recorded top-k of the accepted rows only (the
    trace has no top-k for rejected nodes, which a real run also feeds them). ``hidden``:
    float32 [len(prompt) + len(output), d], the target's final hidden state at every
    position (``decode.keys.sequence_hidden``; traces hold none): drafters that need it get
    the accepted rows' states, and before the first step the prompt's (``Speculator.prime``),
    as in ``generate``; without it they get none.
    """
    drafting = "replay:" + "+".join(d.name for d in drafters)
    if costs is not None:
        cost_table = None  # the model's, per context length, is used instead

        def step_cost(length: int) -> np.ndarray:
            return costs.step_table(length, drafting)

    spec = Speculator(drafters, calibrator, budget=budget, cost=step_cost if costs is not None else cost_table,
                      config=config)
    tokens = np.concatenate([trace.prompt, trace.output])
    prompt_len, end = len(trace.prompt), len(tokens)
    length, steps, cost = prompt_len, 0, 0.0
    if hidden is not None and spec.needs_hidden and prompt_len > 1:
        spec.prime(tokens[:prompt_len], hidden[prompt_len - 2 : prompt_len - 1])  # as generate's prefill
    while length < end:
        t0 = time.perf_counter()
        tree = spec.propose(tokens[:length], room=end - length)
        if costs is not None:
            table = costs.table(length)
            cost += float(table[min(len(tree), len(table) - 1)])
        elif cost_table is not None:
            cost += float(cost_table[min(len(tree), len(cost_table) - 1)])
        truth = tokens[length:]
        # The target's argmax at each tree row is the recorded token at that depth.
        argmax_rows = truth[np.concatenate(([0], np.minimum(tree.depths(), len(truth) - 1)))]
        path, _ = accept_greedy(tree, argmax_rows.__getitem__)
        rows, states = None, None
        if hidden is not None and spec.needs_hidden:
            # verified rows as generate's forward has them; only the root's and the accepted
            # nodes' are read, and those are the states at positions length - 1 ...
            states = np.zeros((len(tree) + 1, hidden.shape[1]), np.float32)
            states[[0] + [i + 1 for i in path]] = hidden[length - 1 : length + len(path)]
        if spec.needs_topk:
            # rows: the root and the accepted nodes; topk[i] is what the target ranked for output[i]
            at = np.arange(length, length + len(path) + 1) - prompt_len
            rows = np.concatenate([tokens[length - 1 : length + len(path), None], trace.topk[at]], axis=1)
        context = length
        length += len(path) + 1
        steps += 1
        spec.observe(tokens[:length], len(path) + 1, rows, states)
        if costs is not None:  # the first step indexes the prompt: counted, not taught (see generation._time_step)
            host = time.perf_counter() - t0
            cost += (costs.observe_host(context, len(tree), host, drafting) if steps > 1
                     else costs.host_units(context, host))
    return steps, end - prompt_len, cost


def replay_all(traces: Sequence[Trace], make_drafters: Callable[[], Sequence[Drafter]],
               budget: int | None = None, cost_table: np.ndarray | None = None,
               calibrator: Calibrator | None = None, costs: CostModel | None = None,
               hidden: Callable[[Trace], np.ndarray] | None = None) -> dict[str, tuple[float, float]]:
    """Per category and ``overall``: (mean accepted tokens per step, predicted speedup =
    tokens / summed cost, or 0 without a cost table or model), pooled over traces.
    ``hidden(trace)`` gives a trace's hidden states for drafters that need them (see ``replay``)."""
    totals: dict[str, list[float]] = {}
    for t in traces:
        steps, new, cost = replay(t, make_drafters(), budget, cost_table, calibrator, costs=costs,
                                  hidden=hidden(t) if hidden is not None else None)
        for key in (t.category, "overall"):
            s = totals.setdefault(key, [0, 0, 0.0])
            s[0] += steps
            s[1] += new
            s[2] += cost
    return {k: (new / steps, new / cost if cost else 0.0) for k, (steps, new, cost) in totals.items()}
