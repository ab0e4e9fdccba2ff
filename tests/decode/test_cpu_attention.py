"""The few-rows and row-block attention kernels: SDPA's results, and what they refuse."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPETITIVE
from retrodraft.decode import cpu_attention
from retrodraft.decode.cpu_attention import attend, serves, transposed_mask
from retrodraft.decode.tree_attention import new_cache, packed_attention, tree_inputs
from retrodraft.retrieval.tree import DraftTree

LOWEST = torch.finfo(torch.float32).min


def tree_mask(rows: int, past: int, gen: torch.Generator) -> torch.Tensor:
    """[1, 1, rows, past + rows]: the cache visible to all, a random lower-triangular tree
    block (each row sees itself), masked entries finfo.min or -inf."""
    block = torch.rand(rows, rows, generator=gen) < 0.5
    block = torch.tril(block) | torch.eye(rows, dtype=torch.bool)
    masked = torch.where(torch.rand(rows, rows, generator=gen) < 0.5, LOWEST, float("-inf"))
    mask = torch.zeros(1, 1, rows, past + rows)
    mask[0, 0, :, past:] = torch.where(block, 0.0, masked)
    return mask


@pytest.mark.parametrize("dim", sorted(cpu_attention.HEAD_DIMS))
# few rows: whole chunks of 3 rows, then 1 or 2 left over; row blocks: whole, partial, 8 keys and fewer left
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, cpu_attention.FEW, cpu_attention.FEW + 1, 16, 17, 27, 52])
@pytest.mark.parametrize("heads", [1, 3])
# every kernel on any machine: few rows at any count, row blocks in AVX-512's tiles and in AVX2's
@pytest.mark.parametrize("kernel", ["few", "row_block_attention", "narrow_row_block_attention"])
def test_attend_equals_sdpa_over_a_cache_buffer(dim, rows, heads, kernel, monkeypatch):
    """Keys and values as the cache holds them (views of the first rows of a longer buffer:
    read in place), a mask shorter than the buffer, the result SDPA's to float32 rounding."""
    if kernel == "few":
        monkeypatch.setattr(cpu_attention, "FEW", cpu_attention.MAX_QUERY_ROWS)
    else:
        monkeypatch.setattr(cpu_attention, "ROW_BLOCK_KERNEL", getattr(cpu_attention, kernel))
    gen = torch.Generator().manual_seed(dim * 100 + rows * 10 + heads)
    past, spare = 37, 11
    length = past + rows
    q = torch.randn(1, heads, rows, dim, generator=gen)
    k_buf, v_buf = (torch.randn(1, heads, length + spare, dim, generator=gen) for _ in range(2))
    k, v = k_buf[:, :, :length], v_buf[:, :, :length]
    mask = tree_mask(rows, past, gen)
    assert serves(q, k, v, mask) and (heads == 1 or not k.is_contiguous())
    got = attend(q, k, v, mask, dim**-0.5)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


def test_a_mask_over_fewer_keys_than_given_uses_the_first_ones():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen) for n in (4, 30, 30))
    for rows in (4, 20):  # both kernels
        q = torch.randn(1, 2, rows, 64, generator=gen)
        mask = tree_mask(rows, 24 - rows, gen)  # 24 of the 30 keys
        torch.testing.assert_close(attend(q, k, v, mask, 0.125),
                                   F.scaled_dot_product_attention(q, k[:, :, :24], v[:, :, :24], attn_mask=mask,
                                                                  scale=0.125), rtol=1e-5, atol=1e-5)


def test_row_blocks_read_a_transposed_mask_made_once_with_more_columns():
    """``packed_sdpa`` transposes a forward's mask once and hands every layer the same
    one, which may have more columns than a layer's mask (the first ones count)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 3, n, 64, generator=gen) for n in (20, 40, 40))
    mask = tree_mask(20, 20, gen)
    wider = torch.cat([mask, torch.full((1, 1, 20, 5), 7.0)], dim=-1)  # columns that must not count
    got = attend(q, k, v, mask, 0.125, mask_t=transposed_mask(wider))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k[:, :, :40], v[:, :, :40], attn_mask=mask,
                                                                   scale=0.125), rtol=1e-5, atol=1e-5)
    assert transposed_mask(mask).shape == (40, 32)  # rows padded to whole vectors, with zeros
    assert not transposed_mask(mask)[:, 20:].any()


def test_serves_only_float32_cpu_inputs_it_has_a_kernel_for():
    q, k, mask = torch.zeros(1, 3, 4, 64), torch.zeros(1, 3, 10, 64), torch.zeros(1, 1, 4, 10)
    assert serves(q, k, k, mask)
    assert not serves(q, k, k, None)
    assert not serves(q.double(), k.double(), k.double(), mask.double())
    assert not serves(torch.zeros(1, 3, 4, 80), torch.zeros(1, 3, 10, 80), torch.zeros(1, 3, 10, 80), mask)
    assert not serves(torch.zeros(2, 3, 4, 64), torch.zeros(2, 3, 10, 64), torch.zeros(2, 3, 10, 64), mask)
    assert not serves(q, k, k, torch.zeros(1, 3, 4, 10))  # a mask per head
    assert not serves(q, k, k, torch.zeros(1, 1, 4, 11))  # more columns than keys
    assert not serves(q, k, k, torch.zeros(1, 1, 5, 10))  # a row per query, not more
    many = cpu_attention.MAX_QUERY_ROWS + 1  # a prompt's prefill: SDPA's blocks suit it
    assert not serves(torch.zeros(1, 3, many, 64), k, k, torch.zeros(1, 1, many, 10))


def test_a_tree_forward_runs_the_kernel_and_equals_transformers_sdpa(monkeypatch):
    """A model with 64-dimensional heads (2 query heads per key/value head): the tree
    forward under ``packed_attention`` goes through the kernel in every layer and gives the
    hidden states transformers' own SDPA gives."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2)).eval()
    tree = DraftTree.build([10, 11, 12, 14, 13], [-1, -1, 1, 0, 2])
    past = REPETITIVE.shape[1] - 1
    ids, positions, mask = tree_inputs(int(REPETITIVE[0, -1]), tree, past, model.device, model.dtype)
    calls = []
    real = cpu_attention.ROW_BLOCK_KERNEL
    monkeypatch.setattr(cpu_attention, "ROW_BLOCK_KERNEL", lambda *a: calls.append(a[0].shape) or real(*a))
    hidden = []
    for packed in (False, True):
        with torch.inference_mode(), packed_attention(model) if packed else torch.inference_mode():
            cache = new_cache(model, 64)
            model.base_model(input_ids=REPETITIVE[:, :-1], cache=cache, use_cache=True)
            hidden.append(model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                           cache=cache, use_cache=True).last_hidden_state)
    assert calls == [(2, 2 * 6, 64)] * 2  # each layer: 2 key/value heads, 2 groups of 6 rows (more than FEW)
    torch.testing.assert_close(hidden[0], hidden[1], rtol=1e-5, atol=1e-5)


def test_a_forwards_mask_is_tiled_and_transposed_once_and_again_when_changed_in_place():
    """Every layer of a forward gets the same mask object: its tiling and transposition are
    made once, and made again for another object or after the same one is written to."""
    from retrodraft.decode import tree_attention

    mask = tree_mask(5, 7, torch.Generator().manual_seed(5))
    tiled, transposed = tree_attention._tiled(mask, 2), tree_attention._transposed(mask)
    assert tree_attention._tiled(mask, 2) is tiled and tree_attention._transposed(mask) is transposed
    assert torch.equal(tiled, mask.repeat(1, 1, 2, 1))
    np.testing.assert_array_equal(transposed, transposed_mask(mask))
    assert tree_attention._tiled(mask, 3).shape[-2] == 15  # another tiling of the same mask
    mask[0, 0, 0, 0] = LOWEST  # written in place: its version counter moves
    assert tree_attention._tiled(mask, 2)[0, 0, 5, 0] == LOWEST  # the second group's copy of row 0
    assert tree_attention._transposed(mask)[0, 0] == LOWEST
    assert tree_attention._tiled(mask.clone(), 2) is not tree_attention._tiled(mask, 2)


def test_a_boolean_mask_is_made_additive_once_and_attends_through_the_kernel(monkeypatch):
    """transformers gives a prompt's chunks after the first (``run_prompt``) a boolean causal
    mask, True where a row attends: ``packed_sdpa`` makes it additive once per forward, so
    the kernel serves it, and the result is SDPA's over the boolean mask."""
    from types import SimpleNamespace

    from retrodraft.decode import tree_attention

    gen = torch.Generator().manual_seed(6)
    past, rows = 9, 6
    q = torch.randn(1, 4, rows, 64, generator=gen)
    k, v = (torch.randn(1, 2, past + rows, 64, generator=gen) for _ in range(2))
    mask = torch.ones(rows, past + rows, dtype=torch.bool).tril(past)[None, None]  # causal after the cache
    calls = []
    real = cpu_attention.attend
    monkeypatch.setattr(cpu_attention, "attend", lambda *a, **kw: calls.append(a[3].dtype) or real(*a, **kw))
    got, _ = tree_attention.packed_sdpa(SimpleNamespace(num_key_value_groups=2), q, k, v, mask)
    assert calls == [torch.float32]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)
    additive = tree_attention._additive(mask, torch.float32)
    assert tree_attention._additive(mask, torch.float32) is additive  # once per forward: every layer gets this mask
    assert additive[0, 0, 0, past + 1] == LOWEST and not additive[0, 0, -1].any()
