"""One verification step on the target's own device: stage the tree, one forward, accept, compact.

Written once for every device. Per step the host fills two small staging buffers (pinned
on CUDA) with the tree's ids, positions, cache slots, parents and ancestor matrix, and
copies them to the device in one go; the additive tree mask is written on the device into
a preallocated buffer; the forward, the LM head, the argmax and greedy acceptance
(``accept_greedy_on_device``) run there; the cache is compacted with an index made there.
What crosses back is one small int64 tensor: the last accepted node, the bonus token and,
when a drafter asks, every row's top-k. That copy is the step's only wait for the device.

The mask follows what PyTorch's fused SDPA kernels accept (read in torch 2.13's
aten/src/ATen/native/transformers: sdp_utils_cpp.h, cuda/sdp_utils.cpp, attention.cpp,
cuda/mem_eff_attention/kernel_forward.h): Flash attention takes no mask at all, so an
additive mask means the memory-efficient kernel or the math fallback. The memory-efficient
kernel takes a mask of the query's dtype, last dimension contiguous, 4-D shape
broadcastable to [batch, heads, q, kv]; it has no grouped-query support, hence
``packed_sdpa``'s layout (query [1, kv_heads, groups * q, d], mask [1, 1, groups * q, kv],
tiled once per step here, not per layer). Its bias pointer and row strides must be aligned
to 8 elements, else ``preprocess_mask`` pads a copy of the mask in every layer: the mask
buffer's rows are therefore padded to a multiple of 8 and each step's mask is a view of it.

Static shapes (``cuda_graphs``): trees are padded to the next size bucket with dummy nodes
that see only themselves and that no real node sees, the forward writes its keys and
values at slots given by a device tensor and attends over the whole preallocated cache
(the mask hides the rest), so each bucket's forward can be captured once in a CUDA graph
and replayed, as gpt-fast does. On a CPU the same static path runs without capture.
"""

from __future__ import annotations

import logging
import time
import weakref

from typing import Callable

import numpy as np
import torch

from retrodraft.decode.acceptance import accept_greedy_on_device, accept_sampling, first_of_siblings, path_first
from retrodraft.decode.skinny import KernelSettings, linear_argmax
from retrodraft.retrieval.config import DEFAULT
from retrodraft.decode.tree_attention import (ancestor_matrix, attention_shape, compact_cache, mask_groups, new_cache,
                                              run_prompt, truncate_cache, verification_kernels)
from retrodraft.index.recycling import top_k_rows
from retrodraft.retrieval.tree import DraftTree

logger = logging.getLogger(__name__)

ALIGN = 8  # mask row stride, in elements, that the memory-efficient SDPA kernel takes without a copy
IDS, POSITIONS, SLOTS, TOKENS, PARENTS = range(5)  # rows of the staged int64 [5, rows] block


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def graph_capacity(capacity: int) -> int:
    """The capacity ``TreeVerifier.of`` gives a verifier with graphs for ``capacity``
    positions: a power of two, at least 512, so that calls of similar lengths share one (its
    static attention spans all of it)."""
    return 1 << max(9, (capacity - 1).bit_length())


class TreeVerifier:
    """Verifies draft trees for one ``generate`` call: owns its KV cache (``capacity``
    positions, preallocated on the model's device), the staging buffers and the mask.

    max_nodes:   the largest tree ``verify`` will get.
    sizes:       the tree sizes a static forward pads to (the cost curve's: each is a size
                 the budget may pick; ``max_nodes`` is added).
    topk:        top-k ids per row that ``verify`` returns when asked.
    cuda_graphs: None: on iff the model is on CUDA. True: static shapes (trees padded to
                 the next of ``sizes``, attention over the whole cache) and, on CUDA,
                 each bucket's forward captured in a CUDA graph on first use and replayed
                 after; on a CPU the static path runs without capture (to test it).
    Use ``TreeVerifier.of`` to reuse one verifier, and its captured graphs, across calls.
    Call ``prefill`` once, then ``verify`` once per step, within ``verification_kernels``.
    """

    _shared: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> TreeVerifier with graphs

    @classmethod
    def of(cls, model, capacity: int, max_nodes: int, cuda_graphs: bool | None = None,
           sizes: tuple[int, ...] = DEFAULT.cost_sizes, topk: int = DEFAULT.topk) -> TreeVerifier:
        """A verifier for ``model`` with room for ``capacity`` positions, emptied. With CUDA
        graphs the last one is reused when large enough, so its graphs are captured once
        per process (its capacity rounded up by ``graph_capacity``); otherwise a new one."""
        graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if not (graphs and model.device.type == "cuda"):
            return cls(model, capacity, max_nodes, cuda_graphs, sizes, topk)
        old = cls._shared.get(model)
        if (old is not None and old.capacity >= capacity and old.max_rows == max_nodes + 1 and old.topk == topk
                and old.sizes == sizes):
            old.reset()
            return old
        if old is not None:
            del cls._shared[model]
            del old
            torch.cuda.empty_cache()
        cls._shared[model] = verifier = cls(model, graph_capacity(capacity), max_nodes, True, sizes, topk)
        return verifier

    def __init__(self, model, capacity: int, max_nodes: int, cuda_graphs: bool | None = None,
                 sizes: tuple[int, ...] = DEFAULT.cost_sizes, topk: int = DEFAULT.topk):
        device = model.device
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        self.model = model
        self.device = device
        self.static = cuda_graphs
        self.capture = cuda_graphs and device.type == "cuda"
        self.sizes, self.topk = sizes, topk
        self.buckets = tuple(s for s in sizes if s < max_nodes) + (max_nodes,)
        self.max_rows = max_nodes + 1
        self.capacity = capacity
        self.groups = mask_groups(model)
        self.cache = new_cache(model, capacity, static=self.static)
        self.min = torch.finfo(model.dtype).min
        # additive mask, [groups * rows, capacity rounded up to ALIGN]: zero outside the
        # current step's block (dynamic shapes) or rebuilt whole each step (static)
        self._mask = torch.zeros(self.groups * self.max_rows, _round_up(capacity, ALIGN), dtype=model.dtype,
                                 device=device)
        pin = device.type == "cuda"
        self._ints = torch.zeros(5, self.max_rows, dtype=torch.int64, pin_memory=pin)
        self._anc = torch.zeros(self.max_rows * self.max_rows, dtype=torch.bool, pin_memory=pin)
        on_host = device.type == "cpu"
        self._ints_d = self._ints if on_host else self._ints.to(device)
        self._anc_d = self._anc if on_host else self._anc.to(device)
        self._index = torch.arange(self.max_rows, device=device)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.wait_seconds = 0.0  # time blocked on the device's answer, summed over steps

    def warm(self) -> TreeVerifier:
        """Capture every size bucket's forward now, with and without top-k rows, so that no
        step of a timed or served call pays for a capture (each is a few forwards); a no-op
        without capture. Returns the verifier, emptied."""
        if self.capture:
            with verification_kernels(self.model), torch.inference_mode():  # as generate captures them
                for b in self.buckets:
                    r = b + 1
                    self._stage(DraftTree.build(np.zeros(b, np.int32), np.arange(b) - 1), 0, 0, r)
                    mask = self._write_mask(0, r)
                    for want_topk in (False, True):
                        if self.capture and (r, want_topk) not in self._graphs:  # off after a failed capture
                            self._run(r, mask, True, want_topk)
            logger.info("captured the verify forward for %d tree sizes", len(self.buckets))
        self.reset()
        return self

    def reset(self) -> None:
        """Empty the cache (buffers, mask and graphs stay)."""
        self.cache.writes.slots = None
        truncate_cache(self.cache, 0)
        self.wait_seconds = 0.0

    def rows(self, n: int) -> int:
        """Rows of the forward for a tree of ``n`` nodes: n + 1, or with static shapes the
        next bucket's size + 1."""
        if not self.static:
            return n + 1
        return next(b for b in self.buckets if b >= n) + 1

    def prefill(self, input_ids: torch.Tensor, want_hidden: bool = False,
                settings: KernelSettings | None = None) -> np.ndarray | None:
        """Run the prompt but its last token (the first step's root) into the cache, in
        forwards of ``prompt_rows(model, settings)`` rows (``run_prompt``; ``settings``: the
        enclosing ``verification_kernels``', None for one forward). With ``want_hidden``, the
        last hidden state of the last row run, float32 [1, d]: the state that predicted the
        prompt's last token (None for a one-token prompt)."""
        self.cache.writes.slots = None
        if input_ids.shape[1] <= 1:
            return None
        hidden = run_prompt(self.model, input_ids[:, :-1].to(self.device), self.cache, settings)
        return hidden.float().cpu().numpy() if want_hidden else None

    def verify(self, tree: DraftTree, root: int, past: int, sampling: dict | None, want_topk: bool,
               want_hidden: bool = False, accept: Callable | None = None
               ) -> tuple[list[int], int, np.ndarray | None, np.ndarray | None]:
        """One forward of the target over [root + tree] after ``past`` cached tokens: the
        accepted path (node indices), the bonus token, if ``want_topk`` int32
        [n + 1, 1 + topk]: each verified row's input token, then the target's top-k after it,
        and if ``want_hidden`` every row's last hidden state, float32 [n + 1, d] (a second
        copy back). The cache is compacted to the accepted path. ``sampling``:
        accept_sampling's settings, None for greedy (decided on the device). ``accept``:
        (tree, logits_at) -> (path, bonus), an acceptance of its own over the rows' logits
        (``logits_at(row)`` float [vocab] on the host), replacing greedy and sampling."""
        n = len(tree)
        if n + 1 > self.max_rows:
            raise ValueError(f"a tree of {n} nodes exceeds this verifier's max_nodes ({self.max_rows - 1})")
        r = self.rows(n)
        self._stage(tree, root, past, r)
        # on a CPU a 0-node step is masked too (all zeros), so that it takes cpu_attention's kernel,
        # which serves masked attention only: unmasked, it went to SDPA, 2.3 ms slower at 1024
        # cached tokens and 9.9 at 4016 (24.1 against 21.7 and 45.9 against 36.0 ms a step)
        mask = self._write_mask(past, r) if self.static or n or self.device.type == "cpu" else None
        greedy = sampling is None and accept is None  # decided on the device
        heads = greedy or want_topk or self.static
        hidden, logits, best, order, packed = self._run(r, mask, heads, want_topk)
        if greedy or want_topk:
            t = time.perf_counter()
            answer = packed.cpu()  # the one wait for the device
            self.wait_seconds += time.perf_counter() - t
        if greedy:
            last = int(answer[0]) - 1
            path, bonus = (tree.path(last).tolist() if last >= 0 else []), int(answer[1])
        else:
            head = self.model.get_output_embeddings()
            logits_at = (lambda row: logits[row].float().cpu()) if logits is not None else (
                lambda row: head(hidden[row]).float().cpu())
            path, bonus = accept(tree, logits_at) if accept is not None else accept_sampling(tree, logits_at,
                                                                                             **sampling)
            order = path_first(self._anc_d[: r * r].view(r, r), path[-1] + 1 if path else 0, self._index[:r])
        keep = len(path) + 1
        if path and path[-1] != len(path) - 1:  # else the accepted rows are in place already
            compact_cache(self.cache, past, order[:keep])
        else:
            truncate_cache(self.cache, past + keep)
        if mask is not None and not self.static:
            self._block(past, r).zero_()
        rows = None
        if want_topk:
            top = answer[2:].view(r, self.topk)[: n + 1]
            rows = torch.cat([self._ints[IDS, : n + 1, None], top], dim=1).numpy().astype(np.int32)
        states = hidden[: n + 1].float().cpu().numpy() if want_hidden else None
        return path, bonus, rows, states

    def _stage(self, tree: DraftTree, root: int, past: int, r: int) -> None:
        """Fill the host staging buffers for rows 0..r-1 and copy them to the device."""
        n = len(tree)
        ints = self._ints.numpy()  # [5, max_rows], the staging buffer itself
        ints.fill(0)
        ints[IDS, 0], ints[IDS, 1 : n + 1] = root, tree.tokens
        ints[POSITIONS, :r] = past
        ints[POSITIONS, 1 : n + 1] += tree.depths()
        ints[SLOTS, :r] = past + np.arange(r)
        ints[TOKENS, : r - 1] = -1  # padding nodes match nothing, nor repeats of a sibling's token
        ints[TOKENS, :n] = np.where(first_of_siblings(tree), tree.tokens, -1)
        ints[PARENTS, :n] = tree.parents + 1
        anc = self._anc[: r * r].numpy().reshape(r, r)
        anc.fill(False)
        anc[: n + 1, : n + 1] = ancestor_matrix(tree.parents)
        anc[np.arange(n + 1, r), np.arange(n + 1, r)] = True  # a padding node sees only itself
        if self._ints_d is not self._ints:
            self._ints_d.copy_(self._ints, non_blocking=True)
            self._anc_d[: r * r].copy_(self._anc[: r * r], non_blocking=True)

    def _block(self, past: int, r: int) -> torch.Tensor:
        """The mask's tree block, [groups, r, r]: columns past..past+r-1 of every group's rows."""
        return self._mask[: self.groups * r, past : past + r].view(self.groups, r, r)

    def _write_mask(self, past: int, r: int) -> torch.Tensor:
        """The additive mask [1, 1, groups * r, kv] on the device, a view of the padded
        buffer: every row sees the cache and its tree ancestors and itself; kv is past + r,
        or with static shapes the whole cache."""
        rows = self._mask[: self.groups * r]
        if self.static:
            rows.fill_(self.min)
            rows[:, :past].zero_()
        block = self._block(past, r)
        block.fill_(self.min)
        block.masked_fill_(self._anc_d[: r * r].view(r, r), 0.0)
        kv = self.capacity if self.static else past + r
        return rows[None, None, :, :kv]

    def _run(self, r: int, mask: torch.Tensor | None, heads: bool, want_topk: bool) -> tuple:
        """``_forward``, replayed from a captured CUDA graph when capturing."""
        if not self.capture:
            return self._forward(r, mask, heads, want_topk)
        key = (r, want_topk)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(r, mask, want_topk)
            except RuntimeError as e:  # a model whose forward waits on the host cannot be captured
                logger.warning("could not capture the verify forward in a CUDA graph (%s); verifying without "
                               "graphs from here on", str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.capture = False
                self._graphs.clear()
                return self._forward(r, mask, heads, want_topk)
        graph, outputs = self._graphs[key]
        graph.replay()
        return outputs

    def _capture(self, r: int, mask: torch.Tensor, want_topk: bool) -> tuple[torch.cuda.CUDAGraph, tuple]:
        """Capture ``_forward`` for r rows. Its inputs (staging buffers, mask, cache buffers)
        sit at fixed addresses; the warm-up runs write the same keys and values the replay
        will, so they change nothing."""
        t = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(r, mask, True, want_topk)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # each graph keeps its own memory pool: buckets replay in any order, so sharing
        # one pool would not be safe
        with torch.cuda.graph(graph):
            outputs = self._forward(r, mask, True, want_topk)
        logger.debug("captured the verify forward for %d rows in %.3fs", r, time.perf_counter() - t)
        return graph, outputs

    def _forward(self, r: int, mask: torch.Tensor | None, heads: bool, want_topk: bool) -> tuple:
        """The forward over the staged rows and, with ``heads``, the LM head and greedy
        acceptance, all on the device: (hidden [r, d], logits [r, vocab], best row, path-first
        order [r], int64 answer [2 (+ r * topk)]: best row, bonus token (, top-k per row))."""
        ints = self._ints_d
        self.cache.writes.slots = ints[SLOTS, :r] if self.static else None
        try:
            hidden = self.model.base_model(input_ids=ints[IDS, None, :r], position_ids=ints[POSITIONS, None, :r],
                                           attention_mask=mask, cache=self.cache,
                                           use_cache=True).last_hidden_state[0]  # [r, d]
        finally:
            self.cache.writes.slots = None
        if not heads:
            return hidden, None, None, None, None
        # argmax as .max(-1).indices (the first maximum): in a third of argmax's time on a CPU,
        # and on the panel kernel from its tiles
        logits, argmax = linear_argmax(self.model.get_output_embeddings(), hidden)  # [r, vocab], [r]
        ancestors = self._anc_d[: r * r].view(r, r)
        best, order = accept_greedy_on_device(argmax, ints[TOKENS, : r - 1], ints[PARENTS, : r - 1], ancestors)
        answer = torch.cat([best.view(1), argmax.index_select(0, best.view(1))])  # no host read (see path_first)
        if want_topk:
            answer = torch.cat([answer, top_k(logits, self.topk).view(-1)])
        return hidden, logits, best, order, answer


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [rows, k]: each row's k highest-scoring token ids, best first, as
    ``logits.topk(k).indices`` (ties aside); float32 on a CPU from one pass per row in
    parallel (``index.recycling.top_k_rows``: 0.27 against 0.63 ms for 17 rows of 49152)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or not 0 < k <= logits.shape[-1]:
        return logits.topk(k, dim=-1).indices  # (also torch's error for a k the vocabulary cannot give)
    out = torch.empty(logits.shape[0], k, dtype=torch.int64)
    top_k_rows(logits.contiguous().numpy(), out.numpy())
    return out


def fused_kernels(model, context: int = 1024, nodes: int = 64) -> dict[str, bool]:
    """Which of SDPA's fused CUDA kernels accept the attention of a verification step of
    ``nodes`` nodes over ``context`` cached tokens as this module lays it out (packed query
    heads, the verifier's mask view, the cache buffer's keys): flash, efficient (memory-
    efficient) and cudnn. All False off CUDA; the efficient kernel is the one that must
    say True, else SDPA falls back to its math kernel."""
    from torch.backends.cuda import (SDPAParams, can_use_cudnn_attention, can_use_efficient_attention,
                                     can_use_flash_attention)

    verifier = TreeVerifier(model, context + nodes + 1, nodes)
    r = verifier.rows(nodes)
    verifier._stage(DraftTree.build(np.zeros(nodes, np.int32), np.arange(nodes) - 1), 0, context, r)
    mask = verifier._write_mask(context, r)
    kv_heads, _, head_dim = attention_shape(model.config)
    like = dict(dtype=model.dtype, device=model.device)
    query = torch.zeros(1, kv_heads, verifier.groups * r, head_dim, **like)
    key = torch.zeros(1, kv_heads, verifier.capacity, head_dim, **like)[:, :, : mask.shape[-1]]
    params = SDPAParams(query, key, key, mask, 0.0, False, False)
    return {"flash": bool(can_use_flash_attention(params, False)),
            "efficient": bool(can_use_efficient_attention(params, True)),
            "cudnn": bool(can_use_cudnn_attention(params, False))}
