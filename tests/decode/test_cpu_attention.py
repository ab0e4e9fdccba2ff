"""The few-rows attention kernel: SDPA's results, its exponential, and what it refuses."""

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPETITIVE
from retrodraft.decode import cpu_attention
from retrodraft.decode.cpu_attention import FAST, attend, exp_nonpositive, serves
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
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 27, 52])  # whole chunks of 3 rows, then 1 or 2 left over
@pytest.mark.parametrize("heads", [1, 3])
def test_attend_equals_sdpa_over_a_cache_buffer(dim, rows, heads):
    """Keys and values as the cache holds them (views of the first rows of a longer buffer:
    read in place), a mask shorter than the buffer, the result SDPA's to float32 rounding."""
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
    mask = tree_mask(4, 20, gen)  # 24 of the 30 keys
    torch.testing.assert_close(attend(q, k, v, mask, 0.125),
                               F.scaled_dot_product_attention(q, k[:, :, :24], v[:, :, :24], attn_mask=mask,
                                                              scale=0.125), rtol=1e-5, atol=1e-5)


@numba.njit(fastmath=FAST)
def _exps(x, out):
    for i in range(x.size):
        out[i] = exp_nonpositive(x[i])


def test_the_exponential_is_exact_to_float32_rounding_and_zero_where_masked():
    x = np.concatenate([-np.random.default_rng(0).random(100_000, np.float32) * 86.9,
                        np.float32([0.0, -1e-30, -0.5, -86.99])])
    out = np.empty_like(x)
    _exps(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 4e-7  # a few float32 ulps
    masked = np.float32([-87.5, -1e4, LOWEST, -np.inf])
    out = np.empty_like(masked)
    _exps(masked, out)
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0]


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
    real = cpu_attention.few_rows_attention
    monkeypatch.setattr(cpu_attention, "few_rows_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    hidden = []
    for packed in (False, True):
        with torch.inference_mode(), packed_attention(model) if packed else torch.inference_mode():
            cache = new_cache(model, 64)
            model.base_model(input_ids=REPETITIVE[:, :-1], cache=cache, use_cache=True)
            hidden.append(model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                           cache=cache, use_cache=True).last_hidden_state)
    assert calls == [(2, 2 * 6, 64)] * 2  # each layer: 2 key/value heads, 2 groups of 6 rows
    torch.testing.assert_close(hidden[0], hidden[1], rtol=1e-5, atol=1e-5)
