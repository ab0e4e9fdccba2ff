"""Llama-style decoder layers over a few rows on a CPU in a dozen calls instead of sixty.

A verification forward spends a third of a 1-token step outside its kernels: on a 2-core
Zen 5 VM, 8 of a 26 ms forward of SmolLM2-135M at a 1024-token context went to torch's
dispatch and transformers' Python between them (each layer makes a dozen module calls, the
rotary embedding's ten small operations, views, transposes and copies). That time is the
same for every tree size, so it is most of what a step costs beyond streaming the weights.
Here one layer runs as plain calls on numpy views of the same buffers: the norms
(``decode.norms``), the seven projections (``decode.skinny`` on the panels its linear
layers hold), the rotary embedding of queries and keys in one Numba pass, the cache's own
``update``, the model's attention function and activation, and the residual sums.

A layer is served only where its structure is the one computed here (an input and a
post-attention RMS norm, q/k/v/o projections and a gated MLP, nothing else) and its own
forward on a probe input agrees with this one (checked once per layer and weights), so a
layer with other arithmetic (Qwen3's per-head query and key norms, Gemma's norms) keeps its
forward. A call it does not take (more rows than the kernels take, another dtype, autograd,
training, hooks on a submodule, which would not fire) runs the layer's own forward. The
arithmetic is the layer's, in the same kernels: results agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules import module as torch_module
from transformers import DynamicCache
from transformers.activations import SiLUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from retrodraft.decode import norms
from retrodraft.decode.forward_memo import once_per_forward
from retrodraft.decode.simd import LANES, add, load, mul, splat, store
from retrodraft.decode.skinny import (MAX_ROWS, KernelSettings, eligible, held_stack, held_weight, multiply, stack_columns,
                                      weight_stamp)

LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}
# attention implementations that take a sliding window from the mask alone (the layer's
# module would pass its window as a keyword, which differs between architectures)
PACKED_SDPA = "retrodraft_packed_sdpa"  # tree_attention.packed_sdpa, registered there
MASKED_ATTENTION = ("sdpa", PACKED_SDPA)
PROBE_ROWS = 3
TOLERANCE = 1e-4  # relative, on the probe: float32 rounding over a layer passes, other arithmetic does not


@numba.njit(cache=True, nogil=True)
def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray) -> None:
    """out[h, i] = x[i, h] * cos[i] + rotate_half(x[i, h]) * sin[i] for x float32 [rows, heads
    * d] and cos, sin [rows, d]: transformers' ``apply_rotary_pos_emb`` on one of query or
    key, heads moved first (out [heads, rows, d]). Products and sum in its order, without
    fused multiply-adds (the negation a product by -1, which keeps a zero's sign), so the
    result is bitwise the same. Vectors of 16 where half a head is a multiple of 16 (LLVM
    left the scalar loops scalar: 42 against 5 us for 65 rows of 9 heads of 64)."""
    rows, d = cos.shape
    half = d // 2
    minus = splat(-1.0)
    for h in range(out.shape[0]):
        base = h * d
        for i in range(rows):
            if half % LANES == 0:
                for j in range(0, half, LANES):
                    a, b = load(x, (i, base + j)), load(x, (i, base + j + half))
                    store(out, (h, i, j), add(mul(a, load(cos, (i, j))), mul(mul(b, minus), load(sin, (i, j)))))
                    store(out, (h, i, j + half),
                          add(mul(b, load(cos, (i, j + half))), mul(a, load(sin, (i, j + half)))))
                continue
            for j in range(half):
                out[h, i, j] = x[i, base + j] * cos[i, j] + (-x[i, base + j + half]) * sin[i, j]
            for j in range(half, d):
                out[h, i, j] = x[i, base + j] * cos[i, j] + x[i, base + j - half] * sin[i, j]


def _children(module: torch.nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _shaped(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` has exactly the parts ``LayerPass`` computes, in float32 on a CPU."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or _children(layer) != LAYER_PARTS or _children(mlp) != MLP_PARTS:
        return False
    if not ATTENTION_PARTS <= _children(attn) <= ATTENTION_PARTS | {"rotary_emb"}:
        return False
    linears = [getattr(attn, n) for n in sorted(ATTENTION_PARTS)] + [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    head_dim, scaling, layer_idx = (getattr(attn, n, None) for n in ("head_dim", "scaling", "layer_idx"))
    return (all(eligible(m) for m in linears) and None not in (scaling, layer_idx)
            and isinstance(head_dim, int) and head_dim % 2 == 0
            and norms.serves(layer.input_layernorm) and norms.serves(layer.post_attention_layernorm))


class LayerPass:
    """One decoder layer's forward as plain calls (see the module's docstring); ``__call__``
    takes the layer's forward arguments and returns its output, or None where it does not
    take the call (then the caller runs the layer's own forward)."""

    def __init__(self, layer: torch.nn.Module, settings: KernelSettings):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn, self.act = layer, attn, mlp.act_fn
        # SiLU in place on the gate, times the up projection in numpy: no module call, no new tensor
        self.silu = type(mlp.act_fn) in (torch.nn.SiLU, SiLUActivation) and "forward" not in vars(mlp.act_fn)
        self.settings = settings
        self.config = attn.config
        self.d = attn.head_dim
        # (stacked panels or None, then per projection: its weight as held, features, bias, columns in the stack)
        self.groups = [self._group((attn.q_proj, attn.k_proj, attn.v_proj)), self._group((attn.o_proj,)),
                       self._group((mlp.gate_proj,)), self._group((mlp.up_proj,)), self._group((mlp.down_proj,))]
        self.norms = [(m.weight.detach().numpy(), np.float32(norms.epsilon(m)))
                      for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        # hooks would not fire on the submodules the pass does not call: registering one
        # fills one of these dicts in place, so the pass checks them on every call
        self.hooks = [hooks for m in layer.modules() if m is not layer
                      for hooks in (m._forward_hooks, m._forward_pre_hooks)]

    @staticmethod
    def _group(modules: tuple[torch.nn.Linear, ...]) -> tuple:
        stack = held_stack(modules) if len(modules) > 1 else None
        return stack, [(held_weight(m), m.out_features, None if m.bias is None else m.bias.detach().numpy(), columns)
                       for m, columns in zip(modules, stack_columns(modules))]

    def _linears(self, g: int, x: np.ndarray) -> list[np.ndarray]:
        """The outputs of group ``g``'s projections of ``x``: one kernel call on their stack
        (views of its columns), or one call each where there is none."""
        stack, parts = self.groups[g]
        if stack is None:
            outs = [multiply(x, weight, features=features) for weight, features, _, _ in parts]
        else:
            whole = multiply(x, stack)
            outs = [whole[:, columns] for _, _, _, columns in parts]
        for out, (_, _, bias, _) in zip(outs, parts):
            if bias is not None:
                out += bias
        return outs

    def takes(self, x: torch.Tensor, cache, position_embeddings, attention: str) -> bool:
        """Whether the pass computes a call on ``x`` [1, rows, hidden] with the model's
        ``attention`` implementation."""
        return (x.dtype == torch.float32 and x.device.type == "cpu" and x.ndim == 3 and x.shape[0] == 1
                and 0 < x.shape[1] <= MAX_ROWS and not x.requires_grad and not self.layer.training
                and self.settings.layers and bool(self.settings.kernel_rows[x.shape[1]]) and cache is not None
                and position_embeddings is not None
                and attention in MASKED_ATTENTION and not any(self.hooks)
                and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks))

    def __call__(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                 use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor | None:
        attention = self.config._attn_implementation
        if not self.takes(hidden_states, cache, position_embeddings, attention):
            return None
        rows = hidden_states.shape[1]
        x = hidden_states[0].contiguous().numpy()
        h = norms.rms_rows(x, *self.norms[0])
        cos, sin = _angles(position_embeddings, rows, self.d)
        q, k, v = self._linears(0, h)
        query = np.empty((q.shape[1] // self.d, rows, self.d), np.float32)
        key = np.empty((k.shape[1] // self.d, rows, self.d), np.float32)
        rotate(q, cos, sin, query)
        rotate(k, cos, sin, key)
        value = torch.from_numpy(np.ascontiguousarray(v)).view(rows, -1, self.d).transpose(0, 1)[None]
        kwargs = dict(kwargs, position_ids=position_ids, use_cache=use_cache)  # what the layer hands its attention
        keys, values = cache.update(torch.from_numpy(key)[None], value, self.attn.layer_idx, kwargs=kwargs)
        out, _ = ALL_ATTENTION_FUNCTIONS[attention](self.attn, torch.from_numpy(query)[None], keys, values,
                                                    attention_mask, dropout=0.0, scaling=self.attn.scaling, **kwargs)
        x = x + self._linears(1, out.reshape(rows, -1).contiguous().numpy())[0]
        h = norms.rms_rows(x, *self.norms[1])
        (gate,), (up,) = self._linears(2, h), self._linears(3, h)
        if self.silu:
            F.silu(torch.from_numpy(gate), inplace=True)
            gated = np.multiply(gate, up, out=gate)
        else:
            gated = (self.act(torch.from_numpy(gate)) * torch.from_numpy(up)).numpy()
        x += self._linears(4, gated)[0]
        return torch.from_numpy(x)[None]


_last_angles: list = [None]  # once_per_forward's memo of the rotary angles


def _angles(position_embeddings: tuple, rows: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin as float32 arrays [rows, d], made once per forward: a model hands every
    layer the same tuple."""
    return once_per_forward(_last_angles, position_embeddings, None, lambda: tuple(
        np.ascontiguousarray(t.reshape(rows, d).numpy()) for t in position_embeddings))


_verdicts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> (its weights' stamps, served?)


def serves(layer: torch.nn.Module) -> bool:
    """Whether ``LayerPass`` computes ``layer``'s forward: a layer of the shape it computes
    (``_shaped``) whose own output on a probe input (3 rows, random rotary angles, a fresh
    cache, the model's attention function) agrees with the pass's. Decided once per layer
    and weights (again after a load or an optimizer step)."""
    if not _shaped(layer):
        return False
    stamp = tuple(weight_stamp(p) for p in layer.parameters())
    held = _verdicts.get(layer)
    if held is None or held[0] != stamp:
        held = _verdicts[layer] = (stamp, _agrees(layer))
    return held[1]


def _agrees(layer: torch.nn.Module) -> bool:
    config, attn = layer.self_attn.config, layer.self_attn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, PROBE_ROWS, layer.input_layernorm.weight.shape[0], generator=gen)
    angles = torch.rand(1, PROBE_ROWS, attn.head_dim // 2, generator=gen) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    call = dict(attention_mask=None, position_ids=torch.arange(PROBE_ROWS)[None], use_cache=True,
                position_embeddings=(angles.cos(), angles.sin()))
    probe = LayerPass(layer, KernelSettings(True))  # every row count through the kernel
    with torch.inference_mode():
        expected = layer(x, cache=DynamicCache(config=config), **call)
        ours = probe(x, cache=DynamicCache(config=config), **call)
    return (isinstance(expected, torch.Tensor) and ours is not None and expected.shape == ours.shape
            and bool(torch.allclose(expected, ours, rtol=TOLERANCE, atol=TOLERANCE)))


def stack_projections(model: torch.nn.Module) -> None:
    """Stack the panels of each Llama-style decoder layer's query, key and value projections
    (``skinny.held_stack``) before ``skinny_linears`` patches the layers: their held weights
    are then views into the stacks from the start, never copies beside them. Once per
    weights. (Not the gate and up projections: each has panels enough for every thread, and
    the product of two column ranges of one array, strided, took 23 us at 65 rows against 7
    for contiguous ones.)"""
    for layer in model.modules():
        if type(layer).__name__.endswith("DecoderLayer") and _shaped(layer):
            attn = layer.self_attn
            held_stack((attn.q_proj, attn.k_proj, attn.v_proj))


@contextlib.contextmanager
def decoder_layers(model: torch.nn.Module, settings: KernelSettings) -> Iterator[None]:
    """Within the block, where ``settings`` are active (float32 on a CPU), the model's decoder
    layers that ``serves`` says it computes run calls it takes through ``LayerPass``; others
    take the layer's own forward. Layers already patched (an enclosing block) are left to it."""
    layers = [m for m in model.modules() if "forward" not in vars(m) and type(m).__name__.endswith("DecoderLayer")]
    patched = [m for m in layers if serves(m)] if settings.active else []
    for layer in patched:
        fused, own = LayerPass(layer, settings), layer.forward

        def forward(*args, fused=fused, own=own, **kwargs) -> torch.Tensor:
            out = fused(*args, **kwargs)
            return own(*args, **kwargs) if out is None else out

        layer.forward = forward
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward
