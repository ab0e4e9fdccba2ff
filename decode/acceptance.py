"""Which draft tokens to keep: greedy and lossless speculative sampling over a draft tree.

Both walk down from the root, one tree level at a time. ``logits_at(row)`` returns the
target's logits [vocab] predicting the successor of tree row ``row`` (0 = root, i + 1 =
node i); it is called once per level visited, so the LM head is never applied to rows that
can no longer be accepted. Both return (accepted node indices in path order, next token):
the next token is the target's own choice after the last accepted node (the bonus token).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from retrodraft.retrieval.tree import DraftTree

LogitsAt = Callable[[int], torch.Tensor]


def children_table(tree: DraftTree) -> dict[int, list[int]]:
    """parent node (-1 = root) -> its children in node order."""
    table: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents.tolist()):
        table.setdefault(p, []).append(i)
    return table


def accept_greedy(tree: DraftTree, argmax_rows: np.ndarray) -> tuple[list[int], int]:
    """Longest path whose every token equals the target's argmax at its parent.

    argmax_rows: int [n + 1], the target's argmax at every tree row. Among siblings with
    the same token the first wins, as in ``accept_sampling`` (where a rejected token cannot
    come back), so the accepted path is the one the emitted tokens spell.
    """
    by_token: dict[tuple[int, int], int] = {}
    for i, key in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())):
        by_token.setdefault(key, i)
    path: list[int] = []
    node = -1
    while True:
        t = int(argmax_rows[node + 1])
        child = by_token.get((node, t))
        if child is None:
            return path, t
        path.append(child)
        node = child


def warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Probabilities [vocab] after temperature, top-k and top-p, in transformers' order."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose total mass is <= 1 - top_p; always keep the top token.
        drop = cum <= 1 - top_p
        drop[-1] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), -float("inf"))
    return logits.softmax(-1)


def accept_sampling(
    tree: DraftTree,
    logits_at: LogitsAt,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """Recursive rejection sampling over point-mass drafts; keeps the target's distribution.

    At a node with target distribution p, try its children x in order: accept x with
    probability p(x) (the draft proposed it with certainty, so min(1, p/q) = p(x)); on
    rejection set p(x) = 0 and renormalise. If every child fails, the next token is sampled
    from what is left of p; each token's overall probability is exactly p(token).
    """
    children = children_table(tree)
    tokens = tree.tokens.tolist()
    path: list[int] = []
    node = -1
    while True:
        p = warp(logits_at(node + 1), temperature, top_k, top_p)
        for child in children.get(node, ()):
            t = tokens[child]
            mass = p.sum()
            if torch.rand((), generator=generator) * mass < p[t]:
                path.append(child)
                node = child
                break
            p[t] = 0.0
        else:
            return path, int(torch.multinomial(p, 1, generator=generator))
