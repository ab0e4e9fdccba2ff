"""Tree attention: one forward of the target over a whole draft tree, and KV-cache compaction.

Convention for one step: the cache holds every verified token but the last one (the
root). The forward's inputs are [root, node_0, ..., node_{n-1}]; row 0 of the output
predicts the root's successor, row i + 1 the successor of node i.

Two things make a tree forward cheaper than transformers' defaults would (each about 10% of
a small tree's forward on a 2-core CPU): attention that packs grouped query heads onto their
key/value head instead of copying the cache once per head (transformers only does so for a
single query), and a cache that writes into a preallocated buffer instead of concatenating.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from retrodraft.decode import cpu_attention
from retrodraft.decode.decoder_layers import PACKED_SDPA, decoder_layers, stack_projections
from retrodraft.decode.forward_memo import once_per_forward
from retrodraft.decode.norms import rms_norms
from retrodraft.decode.skinny import MAX_ROWS, KernelSettings, skinny_linears
from retrodraft.retrieval.tree import DraftTree


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA with grouped query heads packed onto their key/value head for a masked
    multi-token query: query [b, heads, q, d] -> [b, kv_heads, groups * q, d] against the
    cache as it is, the mask tiled once per group. The same arithmetic as repeating the
    cache per head, without the copies. In float32 on a CPU it runs ``cpu_attention``'s
    kernel where that serves (its row blocks read the mask transposed, made once per forward:
    ``_transposed``); anything else goes to transformers' SDPA.

    The mask may come tiled already ([.., groups * q, kv], row g * q + i = query i; see
    ``mask_groups``), so that one tiling serves every layer; an untiled one ([.., q, kv]) is
    tiled here, once per forward (``_tiled``).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q, d = query.shape
    special = dropout or any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "cache"))
    if attention_mask is None or attention_mask.dim() != 4 or special or (groups == 1 and query.device.type != "cpu"):
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] != q:
            attention_mask = attention_mask[:, :, :q]  # tiled: every group's rows are the same
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask.dtype == torch.bool:  # transformers' own causal mask (a prompt's later chunks): True attends
        attention_mask = _additive(attention_mask, query.dtype)
    if attention_mask.shape[-2] != groups * q:  # not tiled by the caller (decode.verifier tiles)
        attention_mask = _tiled(attention_mask, groups)
    whole, attention_mask = attention_mask, attention_mask[..., : key.shape[-2]]
    packed = query.reshape(b, heads // groups, groups * q, d)
    if cpu_attention.serves(packed, key, value, attention_mask):
        mask_t = _transposed(whole) if cpu_attention.uses_row_blocks(groups * q) else None
        out = cpu_attention.attend(packed, key, value, attention_mask, d**-0.5 if scaling is None else scaling, mask_t)
    else:
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


def attention_shape(config) -> tuple[int, int, int]:
    """(key/value heads, query heads per key/value head, head size) of a model's config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_heads, heads // kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def mask_groups(model) -> int:
    """How many times a tree mask's rows are tiled for ``model`` under ``verification_kernels``:
    its query heads per key/value head when ``packed_sdpa`` packs them, else 1."""
    config = model.config
    if config._attn_implementation not in ("sdpa", PACKED_SDPA):
        return 1
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads // kv_heads if heads and kv_heads else 1


_last_additive: list = [None]
_last_tiled: list = [None]
_last_transposed: list = [None]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as an additive one of ``dtype`` (0 or its lowest value),
    once per forward: what ``cpu_attention`` takes. transformers hands a prompt's chunks after
    the first such a mask (``run_prompt``); SDPA over it, per layer, was 40% of a 1024-token
    prefill on a 2-core Zen 5 VM."""
    return once_per_forward(_last_additive, mask, dtype,
                            lambda: torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                                ~mask, torch.finfo(dtype).min))


def _tiled(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``mask`` [1, 1, q, k] tiled to [1, 1, groups * q, k], once per forward (the copy in
    every layer was ~7% of a 16-node forward at a 1024-token context)."""
    return once_per_forward(_last_tiled, mask, groups, lambda: mask.repeat(1, 1, groups, 1))


def _transposed(mask: torch.Tensor) -> np.ndarray:
    """``cpu_attention.transposed_mask(mask)``, once per forward."""
    return once_per_forward(_last_transposed, mask, None, lambda: cpu_attention.transposed_mask(mask))


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


@contextlib.contextmanager
def packed_attention(model) -> Iterator[None]:
    """Within the block, a model that uses SDPA attends with ``packed_sdpa``."""
    config = model.config
    if config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation = PACKED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


@contextlib.contextmanager
def verification_kernels(model) -> Iterator[KernelSettings]:
    """Within the block, the model attends with ``packed_sdpa`` and, in float32 on a CPU,
    multiplies a few rows by its weights with ``decode.skinny``'s kernel, for the row counts
    and on the threads of the yielded ``KernelSettings`` (call its ``update()`` once per step),
    and normalises them with ``decode.norms``' pass; its Llama-style decoder layers run as
    ``decode.decoder_layers``' plain calls on those kernels.

    All are patches of the model object (its config's attention implementation, its linear,
    norm and decoder layers' ``forward``), undone when the block exits, also on an exception. Not
    thread-safe: while a ``generate`` call runs, another thread using the same model object
    runs through the patched layers too, and an inner block leaves the restoring to the
    outermost one. Use one model object per thread."""
    stack_projections(model)  # before skinny_linears takes the layers' weights: views into the stacks
    with (packed_attention(model), skinny_linears(model) as threads, rms_norms(model, threads),
          decoder_layers(model, threads)):
        yield threads


def prompt_rows(model, settings: KernelSettings | None) -> int | None:
    """Rows per forward in which ``run_prompt`` feeds a prompt to ``model``: the most that
    ``decode.skinny``'s kernel and ``cpu_attention`` both take (MAX_ROWS rows; their query
    heads packed, at most MAX_QUERY_ROWS), where ``settings`` (from ``verification_kernels``)
    route that many rows through the kernel; None (the whole prompt in one forward, BLAS and
    SDPA) elsewhere: on a GPU, in another dtype, or where BLAS measured faster."""
    rows = min(MAX_ROWS, cpu_attention.MAX_QUERY_ROWS // mask_groups(model))
    if settings is None or not settings.active or not settings.kernel_rows[rows]:
        return None
    return rows


def run_prompt(model, input_ids: torch.Tensor, cache, settings: KernelSettings | None = None) -> torch.Tensor:
    """Run ``input_ids`` [1, L] into ``cache`` after the entries it holds, in forwards of
    ``prompt_rows`` rows where that is not None (else one): the last row's last hidden
    state, [1, d].

    The same causal attention either way (each forward attends over the cache and its own
    rows), so outputs agree to float32 rounding, as a tree forward's agree with BLAS's. On a
    2-core Zen 5 VM a 767-token prompt took 0.99 s in forwards of 128 rows against 1.66 s
    in one (BLAS there runs AVX2 code, about half the kernel's rate): the prefill is most of
    a long prompt's answer time, for every method alike."""
    rows = prompt_rows(model, settings) or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], rows):
        hidden = model.base_model(input_ids=input_ids[:, start:start + rows], cache=cache,
                                  use_cache=True).last_hidden_state
    return hidden[0, -1:]


class Writes:
    """Where the next forward writes its keys and values, shared by a cache's layers: None
    appends after the cached entries; a LongTensor [rows] on the cache's device names the
    positions, and attention then runs over the whole buffer (static shapes: the mask says
    which entries count). The positions are a tensor so a captured CUDA graph reads them
    from a fixed address."""

    def __init__(self):
        self.slots: torch.Tensor | None = None


class _BufferedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of a buffer of
    ``capacity`` positions (doubled when outgrown, unless writes are static), so appending
    copies only the new rows. ``truncate_cache`` and ``compact_cache`` keep working on the
    views."""

    def __init__(self, capacity: int, writes: Writes):
        super().__init__()
        self.capacity = capacity
        self.writes = writes
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        slots = self.writes.slots
        new = old + key_states.shape[-2]
        if self.buffers is None or (slots is None and new > self.buffers[0].shape[-2]):
            size = self.capacity if new <= self.capacity else 2 * new
            grown = tuple(s.new_zeros(*s.shape[:2], size, s.shape[-1]) for s in (key_states, value_states))
            if old:
                grown[0][:, :, :old], grown[1][:, :, :old] = self.keys, self.values
            self.buffers = grown
        k, v = self.buffers
        if slots is not None:
            k.index_copy_(2, slots, key_states)
            v.index_copy_(2, slots, value_states)
            return k, v
        k[:, :, old:new], v[:, :, old:new] = key_states, value_states
        self.keys, self.values = k[:, :, :new], v[:, :, :new]
        return self.keys, self.values


def new_cache(model, capacity: int, static: bool = False) -> DynamicCache:
    """A cache for ``model`` whose full-attention layers hold ``capacity`` positions without
    reallocating (sliding-window layers stay transformers' own). ``static``: every layer is
    buffered, sliding-window ones too (``generate`` never goes past the window), so that a
    forward can write at ``cache.writes.slots`` and attend over whole buffers."""
    cache = DynamicCache(config=model.config)
    cache.writes = Writes()
    kinds = (DynamicLayer, DynamicSlidingWindowLayer) if static else (DynamicLayer,)
    cache.layers = [_BufferedLayer(capacity, cache.writes) if type(layer) in kinds else layer
                    for layer in cache.layers]
    return cache


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [1, n+1], position_ids [1, n+1] and the additive mask [1, 1, n+1, past+n+1].

    Each row sees the whole cache, its ancestors and itself; positions are past + depth.
    With no draft nodes the mask is all zeros, as the verifier's: a 0-node step is timed on
    the path ``generate`` takes (the masked one).
    """
    n = len(tree)
    ids = torch.from_numpy(np.concatenate(([root], tree.tokens)).astype(np.int64)).view(1, -1)
    depth = np.concatenate(([0], tree.depths())).astype(np.int64)
    positions = torch.from_numpy(depth + past).view(1, -1)
    blocked = torch.from_numpy(~ancestor_matrix(tree.parents))  # bool [n+1, n+1]
    mask = torch.zeros(1, 1, n + 1, past + n + 1, dtype=dtype)
    mask[0, 0, :, past:].masked_fill_(blocked, torch.finfo(dtype).min)
    return ids.to(device), positions.to(device), mask.to(device)


def compact_cache(cache, past: int, rows: list[int] | torch.Tensor) -> None:
    """Keep only the cache entries of the accepted path.

    After a tree forward the cache holds [past verified entries, root, node_0 .. node_{n-1}].
    ``rows`` are the accepted tree rows (0 = root, i + 1 = node i) in path order, a list or
    a LongTensor on the cache's device (then always moved: no host round trip to check);
    their entries are moved to past, past + 1, ... and everything after them is dropped.
    """
    keep = past + len(rows)
    if torch.is_tensor(rows):
        src = rows + past
    # The root is row 0 and a path visits rows in increasing order, so rows[i] >= i; if they
    # are exactly 0..k-1 the entries are already in place.
    elif rows[-1] != len(rows) - 1:
        src = torch.tensor([past + r for r in rows])
    else:
        src = None
    if src is not None:
        for layer in cache.layers:
            k, v = _storage(layer)  # [batch, heads, seq, head_dim]
            src = src.to(k.device)
            k[:, :, past:keep] = k.index_select(2, src)
            v[:, :, past:keep] = v.index_select(2, src)
    truncate_cache(cache, keep)


def _storage(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entry a layer holds: a buffered layer's whole buffers (a static forward wrote
    past its views), else its keys and values."""
    buffers = getattr(layer, "buffers", None)
    return buffers if buffers is not None else (layer.keys, layer.values)


def truncate_cache(cache, length: int) -> None:
    """Drop every cache entry from ``length`` on (a view: no copy)."""
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        k, v = _storage(layer)
        layer.keys, layer.values = k[:, :, :length], v[:, :, :length]
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they have seen
            layer.cumulative_length = length
