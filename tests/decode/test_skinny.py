"""The few-rows linear kernel: F.linear's results, and a context that patches and restores."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from retrodraft.decode.skinny import MAX_ROWS, rows_times_weights, skinny_linear, skinny_linears


# 6- or 3-row passes, then a 3-row pass (wide) and 0, 1 or 2 rows left
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 65, MAX_ROWS])
@pytest.mark.parametrize("out_features", [1, 4, 7, 192, 1030])  # prefetching reaches blocks past the first ones
@pytest.mark.parametrize("in_features", [96, 100])  # a row ending mid cache line
@pytest.mark.parametrize("wide", [False, True])  # either tile on any machine (AVX2 spills the wide one)
def test_kernel_equals_f_linear(rows, out_features, in_features, wide):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    out = np.full((rows, out_features), np.nan, np.float32)  # every entry must be written
    rows_times_weights(x.numpy(), w.numpy(), out, wide)
    torch.testing.assert_close(torch.from_numpy(out), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_skinny_linear_keeps_leading_dims_and_adds_bias():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(1, 5, 32, generator=g), torch.randn(9, 32, generator=g), torch.randn(9, generator=g)
    torch.testing.assert_close(skinny_linear(x, w.numpy(), b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_context_routes_few_rows_to_the_kernel_and_restores_the_layers(monkeypatch):
    model = tiny_model("qwen2")  # q/k/v projections carry biases
    layer = model.model.layers[0].self_attn.q_proj
    few, many = torch.randn(1, 3, 32), torch.randn(1, MAX_ROWS + 1, 32)
    calls = []
    monkeypatch.setattr("retrodraft.decode.skinny.rows_times_weights",
                        lambda x, w, out, *_: calls.append(x.shape) or out.__setitem__(..., x @ w.T))
    with torch.inference_mode(), skinny_linears(model):
        torch.testing.assert_close(layer(few), F.linear(few, layer.weight, layer.bias))
        assert layer(many).shape == (1, MAX_ROWS + 1, 32)
    assert calls == [(3, 32)]  # the large input went to F.linear
    assert "forward" not in vars(layer)  # the class's forward is back


def test_generation_with_the_kernel_equals_model_generate():
    from retrodraft.decode import generate

    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3]])
    want = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = generate(model, ids, max_new_tokens=30, eos_token_id=[])
    assert out.sequences.tolist() == want.tolist()


def test_row_counts_the_settings_send_to_blas_skip_the_kernel(monkeypatch):
    model = tiny_model("llama")
    layer = model.model.layers[0].mlp.up_proj
    calls = []
    monkeypatch.setattr("retrodraft.decode.skinny.rows_times_weights",
                        lambda x, w, out, *_: calls.append(x.shape[0]) or out.__setitem__(..., x @ w.T))
    with torch.inference_mode(), skinny_linears(model) as settings:
        settings.kernel_rows = np.arange(MAX_ROWS + 1) % 2 == 1  # odd row counts only
        for rows in (1, 2, 3, 4):
            x = torch.randn(1, rows, layer.in_features)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    assert calls == [1, 3]


def test_nested_contexts_restore_once_and_share_the_settings():
    model = tiny_model("llama")
    layer = model.lm_head
    with skinny_linears(model) as outer:
        patched = layer.forward
        with skinny_linears(model) as inner:
            assert layer.forward is patched
            assert inner is outer  # what an inner block routes, the outer block's layers follow
        assert layer.forward is patched  # still the outer block's
    assert "forward" not in vars(layer)
