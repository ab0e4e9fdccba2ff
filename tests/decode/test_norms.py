"""The RMS norm pass: the modules' own results, served only where it computes them, patches undone."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from retrodraft.decode.norms import normalise, rms_norm, rms_norms, serves
from retrodraft.decode.skinny import MAX_ROWS, KernelSettings
from retrodraft.decode.tree_attention import verification_kernels


def norms_of(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "Norm" in type(m).__name__]


def patched(model) -> int:
    return sum("forward" in vars(m) for m in norms_of(model))


@pytest.mark.parametrize("rows", [1, 2, 17, 65, MAX_ROWS])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_pass_equals_the_module(rows, arch):
    norm = norms_of(tiny_model(arch))[0]
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(rows)))
    x = 3 * torch.randn(1, rows, norm.weight.shape[0], generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = norm(x)
    out = normalise(x, norm.weight.detach().numpy(), np.float32(norm.variance_epsilon))
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_every_row_is_written_and_zero_rows_stay_finite():
    x = np.zeros((4, 8), np.float32)
    x[1] = 1.0
    out = np.full_like(x, np.nan)
    rms_norm(x, np.ones(8, np.float32), np.float32(1e-6), out)
    assert np.isfinite(out).all() and (out[0] == 0).all() and np.allclose(out[1], 1.0, atol=1e-5)


@pytest.mark.parametrize("arch,served", [("llama", True), ("qwen2", True), ("mistral", True),
                                         ("gemma", False),  # 1 + weight: other arithmetic, its own forward
                                         ("gpt2", False)])  # LayerNorm: not an RMS norm
def test_only_norms_it_computes_are_served(arch, served):
    model = tiny_model(arch)
    norms = norms_of(model)
    assert norms and all(serves(m) == served for m in norms)
    with verification_kernels(model):
        assert patched(model) == (len(norms) if served else 0)
    assert patched(model) == 0


def test_a_float64_model_keeps_its_norms():
    model = tiny_model("llama").double()
    assert not any(serves(m) for m in norms_of(model))
    with verification_kernels(model):
        assert patched(model) == 0


def test_inputs_it_does_not_take_run_the_module_own_forward():
    model = tiny_model("llama")
    norm = norms_of(model)[0]
    d = norm.weight.shape[0]
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, d, dtype=torch.float64, generator=g),  # another dtype
              torch.randn(MAX_ROWS + 1, d, generator=g),  # more rows than a tree or a prompt chunk
              torch.randn(2, d, generator=g, requires_grad=True))  # training: autograd must see it
    expected = [norm(x) for x in inputs]
    with verification_kernels(model):
        assert patched(model)
        for x, want in zip(inputs, expected):
            out = norm(x)
            assert torch.equal(out, want) and out.requires_grad == want.requires_grad


def test_patches_are_undone_on_an_exception():
    model = tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="inside"):
        with verification_kernels(model):
            assert patched(model) == len(norms_of(model))
            raise RuntimeError("inside")
    assert patched(model) == 0


def test_an_inner_block_leaves_the_patches_to_the_outer_one():
    model = tiny_model("llama")
    with verification_kernels(model) as settings:
        forwards = [vars(m)["forward"] for m in norms_of(model)]
        with rms_norms(model, settings):
            assert [vars(m)["forward"] for m in norms_of(model)] == forwards
        assert patched(model) == len(forwards)
    assert patched(model) == 0


def test_inactive_settings_patch_nothing():
    model = tiny_model("llama")
    with rms_norms(model, KernelSettings(False)):
        assert patched(model) == 0


def test_a_changed_weight_is_checked_again():
    model = tiny_model("llama")
    norm = norms_of(model)[0]
    assert serves(norm)
    with torch.no_grad():
        norm.weight.mul_(2.0)  # an optimizer step or a load: the version counter moves
    assert serves(norm)
    with verification_kernels(model):
        x = torch.randn(3, norm.weight.shape[0], generator=torch.Generator().manual_seed(5))
        out = norm(x)
    torch.testing.assert_close(out, norm(x), rtol=1e-5, atol=1e-6)


def test_real_model_norms_are_all_served_and_agree(smollm):
    model, _ = smollm
    norms = norms_of(model)
    assert len(norms) == 2 * model.config.num_hidden_layers + 1 and all(serves(m) for m in norms)
    ids = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(ids).logits
        with verification_kernels(model):
            assert patched(model) == len(norms)
            logits = model(ids).logits
    assert patched(model) == 0
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
