"""Tree attention: one forward of the target over a whole draft tree, and KV-cache compaction.

Convention for one step: the cache holds every verified token but the last one (the
root). The forward's inputs are [root, node_0, ..., node_{n-1}]; row 0 of the output
predicts the root's successor, row i + 1 the successor of node i.
"""

from __future__ import annotations

import numpy as np
import torch

from retrieval.tree import DraftTree


def ancestor_matrix(parents: np.ndarray) -> np.ndarray:
    """bool [n + 1, n + 1]: entry (i, j) is True if row j is row i or one of its ancestors.

    Row 0 is the root; row i + 1 is node i. Parents come before children, so each row is its
    parent's row plus itself.
    """
    n = parents.shape[0]
    anc = np.eye(n + 1, dtype=bool)
    anc[1:, 0] = True
    for i in range(n):
        p = parents[i]
        if p >= 0:
            anc[i + 1] |= anc[p + 1]
    return anc


def tree_inputs(
    root: int, tree: DraftTree, past: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input_ids [1, n+1], position_ids [1, n+1] and the additive mask [1, 1, n+1, past+n+1].

    Each row sees the whole cache, its ancestors and itself; positions are past + depth.
    With no draft nodes the mask is None (a single query attends to everything).
    """
    n = len(tree)
    ids = torch.from_numpy(np.concatenate(([root], tree.tokens)).astype(np.int64)).view(1, -1)
    if n == 0:
        return ids.to(device), torch.tensor([[past]], device=device), None
    depth = np.concatenate(([0], tree.depths())).astype(np.int64)
    positions = torch.from_numpy(depth + past).view(1, -1)
    blocked = torch.from_numpy(~ancestor_matrix(tree.parents))  # bool [n+1, n+1]
    mask = torch.zeros(1, 1, n + 1, past + n + 1, dtype=dtype)
    mask[0, 0, :, past:].masked_fill_(blocked, torch.finfo(dtype).min)
    return ids.to(device), positions.to(device), mask.to(device)


def compact_cache(cache, past: int, rows: list[int]) -> None:
    """Keep only the cache entries of the accepted path.

    After a tree forward the cache holds [past verified entries, root, node_0 .. node_{n-1}].
    ``rows`` are the accepted tree rows (0 = root, i + 1 = node i) in path order; their entries
    are moved to past, past + 1, ... and everything after them is dropped.
    """
    keep = past + len(rows)
    # The root is row 0 and a path visits rows in increasing order, so rows[i] >= i; if they
    # are exactly 0..k-1 the entries are already in place.
    moved = rows[-1] != len(rows) - 1
    src = torch.tensor([past + r for r in rows]) if moved else None
    if moved:
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # [batch, heads, seq, head_dim]
            src = src.to(k.device)
            k[:, :, past:keep] = k.index_select(2, src)
            v[:, :, past:keep] = v.index_select(2, src)
    truncate_cache(cache, keep)


def truncate_cache(cache, length: int) -> None:
    """Drop every cache entry from ``length`` on (a view: no copy)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they have seen
            layer.cumulative_length = length
