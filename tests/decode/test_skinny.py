"""The few-rows linear kernel: F.linear's results, and a context that patches and restores."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from retrodraft.decode import skinny
from retrodraft.decode.skinny import (MAX_ROWS, PANEL_WIDTHS, held_stack, held_weight, multiply, panels_of,
                                       skinny_linear, skinny_linears)


# 6-row panel tiles, a part-filled one, and after full ones (on wide panels) the 3-row tile for 1-3 rows
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 17, 65, MAX_ROWS])
@pytest.mark.parametrize("out_features", [1, 4, 7, 192, 1030])  # prefetching reaches panels past the first ones
@pytest.mark.parametrize("in_features", [96, 100, 130, 300])  # a row ending mid cache line; more than a chunk of k
@pytest.mark.parametrize("width", PANEL_WIDTHS)
def test_kernel_equals_f_linear(rows, out_features, in_features, width):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    out = multiply(x.numpy(), panels_of(w.numpy(), width))
    assert out.shape == (rows, -(-out_features // width) * width) and not out[:, out_features:].any()
    torch.testing.assert_close(torch.from_numpy(out[:, :out_features]), F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width", [8, 32, 0, -16])
def test_panels_come_in_the_widths_the_kernel_has_tiles_for(width):
    with pytest.raises(ValueError, match="16 or 64 features wide"):
        panels_of(np.ones((4, 8), np.float32), width)


@pytest.mark.parametrize("width", PANEL_WIDTHS)
def test_a_rows_products_on_panels_do_not_depend_on_the_rows_beside_it(width):
    """Every tile sums a row's products in the same order, so a verification row gives the
    same bits whether the tree is 6 nodes or 13: 1-3 rows after full tiles take a narrower
    tile than the rest, and a row must not change with it."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(21, 200, generator=g).numpy()
    panels = panels_of(torch.randn(130, 200, generator=g).numpy(), width)
    alone = np.concatenate([multiply(x[i : i + 1], panels) for i in range(x.shape[0])])
    for rows in range(1, x.shape[0] + 1):
        assert np.array_equal(multiply(x[:rows], panels), alone[:rows]), rows


def test_skinny_linear_keeps_leading_dims_and_adds_bias():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(1, 5, 32, generator=g), torch.randn(9, 32, generator=g), torch.randn(9, generator=g)
    y = skinny_linear(x, panels_of(w.numpy()), b, 9)  # the panels' padding cut off
    assert y.shape == (1, 5, 9) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_panels_are_made_once_per_weight_and_again_when_it_changes():
    layer = torch.nn.Linear(32, 70)
    first = held_weight(layer)
    assert held_weight(layer) is first  # kept for the next block
    x = torch.randn(3, 32)
    torch.testing.assert_close(skinny_linear(x, first, layer.bias, 70), layer(x), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an optimizer step or a load in place: same storage, new version
    second = held_weight(layer)
    assert second is not first
    torch.testing.assert_close(skinny_linear(x, second, layer.bias, 70), layer(x), rtol=1e-5, atol=1e-4)
    layer.weight = torch.nn.Parameter(torch.randn(70, 32))  # a new tensor
    torch.testing.assert_close(skinny_linear(x, held_weight(layer), layer.bias, 70), layer(x), rtol=1e-5, atol=1e-4)


def test_a_stack_computes_its_layers_in_one_call_and_holds_their_panels_as_views():
    layers = (torch.nn.Linear(32, 70), torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(32, 64))
    stack = held_stack(layers)
    panels = sum(-(-layer.out_features // skinny.PANEL) for layer in layers)
    assert held_stack(layers) is stack and stack.shape == (panels, 32, skinny.PANEL)
    for layer in layers:  # each layer's panels are its view into the stack: no second copy
        assert np.shares_memory(held_weight(layer), stack) and held_weight(layer).flags.c_contiguous
    x = torch.randn(5, 32)
    whole = multiply(x.numpy(), stack)
    for layer, columns in zip(layers, skinny.stack_columns(layers)):
        expected = F.linear(x, layer.weight)
        torch.testing.assert_close(torch.from_numpy(whole[:, columns]), expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        layers[1].weight.mul_(-1.0)  # one layer's weight changes: the stack is made again
    again = held_stack(layers)
    assert again is not stack and np.shares_memory(held_weight(layers[1]), again)
    columns = skinny.stack_columns(layers)[1]
    torch.testing.assert_close(torch.from_numpy(multiply(x.numpy(), again)[:, columns]), F.linear(x, layers[1].weight),
                               rtol=1e-5, atol=1e-4)
    assert held_stack((layers[0], torch.nn.Linear(16, 8))) is None  # inputs of other sizes
    assert held_stack((layers[0], torch.nn.Linear(32, 8).double())) is None  # a layer the kernel does not take


def test_context_routes_few_rows_to_the_kernel_and_restores_the_layers(monkeypatch):
    model = tiny_model("qwen2")  # q/k/v projections carry biases
    layer = model.model.layers[0].self_attn.q_proj
    few, many = torch.randn(1, 3, 32), torch.randn(1, MAX_ROWS + 1, 32)
    calls = []
    real = skinny.multiply
    monkeypatch.setattr(skinny, "multiply", lambda x, w, *best: calls.append(x.shape) or real(x, w, *best))
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
    real = skinny.multiply
    monkeypatch.setattr(skinny, "multiply", lambda x, w, *best: calls.append(x.shape[0]) or real(x, w, *best))
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


@pytest.mark.parametrize("rows", [1, 5, 17, 65])
@pytest.mark.parametrize("out_features", [64, 70, 1030])  # whole panels; a padded last panel
def test_linear_argmax_takes_the_first_maximum_from_the_kernels_tiles(monkeypatch, rows, out_features):
    g = torch.Generator().manual_seed(rows + out_features)
    head = torch.nn.Linear(48, out_features, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(out_features, 48, generator=g))
        head.weight[:, 0] = head.weight[:, 0].abs() + 1  # an input along -e0 scores every feature below 0
        head.weight[out_features // 3] = head.weight[out_features - 1]  # a tie: the first index wins
    w = head.weight.detach()
    x = torch.randn(1, rows, 48, generator=g)
    x[0, 0] = w[out_features - 1]  # row 0's largest is the tied pair
    if out_features == 70 and rows > 1:
        x[0, -1] = 0.0
        x[0, -1, 0] = -1.0  # negative logits only: the padding's zeros must not win
    calls = []
    real = skinny.rows_times_panels
    monkeypatch.setattr(skinny, "rows_times_panels", lambda *a: calls.append(a[3].size) or real(*a))
    with torch.inference_mode(), skinny_linears(head):
        logits, index = skinny.linear_argmax(head, x)
    assert calls and calls[0] > 0  # the tiles' maxima were taken
    want = F.linear(x, head.weight)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-4)
    assert index.shape == (1, rows) and index.dtype == torch.int64
    assert index.tolist() == logits.max(-1).indices.tolist()
    assert index[0, 0] == out_features // 3
    if out_features == 70 and rows > 1:
        assert logits[0, -1].max() < 0  # the padded panel's zeros would have won


@pytest.mark.parametrize("width", PANEL_WIDTHS)
@pytest.mark.parametrize("out_features", [16, 70, 1030])
def test_first_argmax_from_the_tiles_maxima_on_either_width(width, out_features):
    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, 24, generator=g)
    w[:, 0] = w[:, 0].abs() + 1  # an input along -e0 scores every feature below 0
    w[out_features // 3] = w[-1]  # a tie: the first index wins
    x = torch.randn(7, 24, generator=g)
    x[0] = w[-1]
    x[1] = 0.0
    x[1, 0] = -1.0  # negative logits only: the padding's zeros must not win
    panels = panels_of(w.numpy(), width)
    best = np.empty((7, panels.shape[0]), np.float32)
    out = multiply(x.numpy(), panels, best, out_features)
    index = np.empty(7, np.int64)
    skinny.first_argmax(out, best, out_features, width, index)
    assert index.tolist() == torch.from_numpy(out).max(-1).indices.tolist() and index[0] == out_features // 3


def test_linear_argmax_outside_the_kernel_is_the_layer_and_its_max():
    head = torch.nn.Linear(16, 40)
    x = torch.randn(3, 16)
    logits, index = skinny.linear_argmax(head, x)  # no block: the layer as it is
    torch.testing.assert_close(logits, head(x))
    assert index.tolist() == head(x).max(-1).indices.tolist()
    with torch.inference_mode(), skinny_linears(head):  # a bias: not served by the fused maxima
        logits, index = skinny.linear_argmax(head, x)
    assert index.tolist() == logits.max(-1).indices.tolist()


def test_linear_argmax_runs_the_layers_hooks_and_follows_an_output_they_replace():
    head = torch.nn.Linear(16, 64, bias=False)
    x = torch.randn(2, 16)
    seen = []
    head.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.inference_mode(), skinny_linears(head):
        logits, index = skinny.linear_argmax(head, x)
        assert seen == [(2, 64)] and index.tolist() == logits.max(-1).indices.tolist()
        head.register_forward_hook(lambda m, args, out: -out)  # a hook that replaces the output
        logits, index = skinny.linear_argmax(head, x)
    assert index.tolist() == logits.max(-1).indices.tolist() == F.linear(x, -head.weight).max(-1).indices.tolist()
