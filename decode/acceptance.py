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


def accept_greedy(tree: DraftTree, argmax_at: Callable[[int], int]) -> tuple[list[int], int]:
    """Longest path whose every token equals the target's argmax at its parent.

    argmax_at(row): the target's argmax at tree row ``row`` (e.g. ``argmax_rows.__getitem__``
    over an int [n + 1] array), called once per level visited. Among siblings with the same
    token the first wins, as in ``accept_sampling`` (where a rejected token cannot come
    back), so the accepted path is the one the emitted tokens spell.
    """
    by_token: dict[tuple[int, int], int] = {}
    for i, key in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())):
        by_token.setdefault(key, i)
    path: list[int] = []
    node = -1
    while True:
        t = int(argmax_at(node + 1))
        child = by_token.get((node, t))
        if child is None:
            return path, t
        path.append(child)
        node = child


def accept_greedy_on_device(argmax_rows: torch.Tensor, tokens: torch.Tensor, parent_rows: torch.Tensor,
                            ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``accept_greedy`` as a few tensor operations on the rows' device, with no sync, so
    it can run inside a captured CUDA graph and only its answer crosses to the host.

    argmax_rows: int64 [r], the target's argmax at every row (r = nodes + 1, rows as in
    ``accept_greedy``); tokens: int64 [r - 1], each node's token, or -1 for a node never to
    accept: a padding node, or a node repeating an earlier sibling's token (see
    ``first_of_siblings``); parent_rows: int64 [r - 1], each node's parent row (0 = root);
    ancestors: bool [r, r], (i, j) True if row j is row i or one of its ancestors.
    Returns (best, order): best, int64 [], the row of the last accepted node (0: none);
    order, int64 [r], the accepted rows in path order (root first), then the others.
    A node is accepted when it and all its ancestors match; siblings left with distinct
    tokens, the accepted nodes form one chain, ending where ``accept_greedy`` ends.
    """
    r = argmax_rows.shape[0]
    ok = torch.ones(r, dtype=torch.bool, device=argmax_rows.device)
    ok[1:] = tokens == argmax_rows[parent_rows]
    accepted = ~(ancestors & ~ok).any(1)  # [r]
    depth = ancestors.sum(1)
    best = torch.where(accepted, depth, 0).argmax()
    index = torch.arange(r, device=argmax_rows.device)
    return best, path_first(ancestors, best, index)


def first_of_siblings(tree: DraftTree) -> np.ndarray:
    """bool [n]: False for a node whose parent has an earlier child with the same token
    (``accept_greedy`` takes the first)."""
    key = (tree.parents.astype(np.int64) + 1) * (int(tree.tokens.max(initial=0)) + 1) + tree.tokens
    first = np.zeros(len(tree), bool)
    first[np.unique(key, return_index=True)[1]] = True
    return first


def path_first(ancestors: torch.Tensor, row: torch.Tensor | int, index: torch.Tensor) -> torch.Tensor:
    """int64 [r]: the rows on the path to ``row`` (root first, in order), then the others.
    ``index`` is arange(r) on the device. A tensor ``row`` is read on the device: indexing
    by a 0-d tensor would read it on the host (``.item()``), a sync that a CUDA graph
    capture refuses."""
    chosen = ancestors.index_select(0, row.view(1))[0] if isinstance(row, torch.Tensor) else ancestors[row]
    return torch.where(chosen, index, index + index.shape[0]).argsort()


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
