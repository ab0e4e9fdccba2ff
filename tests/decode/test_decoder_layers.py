"""The decoder layer pass: the layers' own results, served only where it computes them, calls it
does not take left to the layer, patches undone."""

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import tiny_model
from retrodraft.decode.decoder_layers import decoder_layers, rotate, serves
from retrodraft.decode.skinny import MAX_ROWS, KernelSettings, held_weight
from retrodraft.decode.tree_attention import new_cache, tree_inputs, verification_kernels
from retrodraft.retrieval.tree import DraftTree


def layers_of(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]


def patched(model) -> int:
    return sum("forward" in vars(m) for m in layers_of(model))


@pytest.mark.parametrize("rows,heads,d", [(1, 9, 64), (17, 3, 64), (4, 2, 128), (5, 2, 8), (3, 2, 48)])
def test_rotation_is_bitwise_transformers(rows, heads, d):
    """Vector (half a head a multiple of 16) and scalar paths alike, zeros' signs included."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, heads * d, generator=g)
    x[0] = 0.0  # where cos and sin are both negative, only -x (not 0 - x) gives the sum a zero's sign
    x[-1, d // 2 :: 3] = -0.0
    angles = torch.rand(1, rows, d // 2, generator=g) * 100
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    heads_first = x.view(1, rows, heads, d).transpose(1, 2)
    expected, _ = apply_rotary_pos_emb(heads_first, heads_first, cos, sin)
    out = np.empty((heads, rows, d), np.float32)
    rotate(x.numpy(), cos[0].numpy(), sin[0].numpy(), out)
    assert np.array_equal(out.view(np.int32), expected[0].contiguous().numpy().view(np.int32))


def tree_forward(model, prompt: torch.Tensor, tree: DraftTree) -> torch.Tensor:
    """Hidden states of a tree forward after ``prompt`` as ``generate`` runs it: [1 + n, d]."""
    cache = new_cache(model, prompt.shape[1] + len(tree) + 1)
    model.base_model(input_ids=prompt[:, :-1], cache=cache, use_cache=True)
    ids, positions, mask = tree_inputs(int(prompt[0, -1]), tree, prompt.shape[1] - 1, model.device, model.dtype)
    return model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                            use_cache=True).last_hidden_state[0]


@pytest.mark.parametrize("arch,act", [("llama", None), ("qwen2", None), ("mistral", None),
                                      ("llama", "gelu_pytorch_tanh")])  # not SiLU: the module's own activation
def test_pass_equals_the_layers_in_a_tree_forward(arch, act):
    model = tiny_model(arch)
    if act is not None:
        from transformers.activations import ACT2FN

        for layer in model.model.layers:
            layer.mlp.act_fn = ACT2FN[act]
    with torch.no_grad():  # biases and norm weights away from their defaults, so each one counts
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, 40), generator=g)
    tree = DraftTree.build(torch.randint(0, model.config.vocab_size, (12,), generator=g).numpy(),
                           np.array([-1, 0, 0, 1, 1, 2, -1, 6, 7, 3, 9, 10]))
    with torch.inference_mode():
        expected = tree_forward(model, prompt, tree)
        with verification_kernels(model):
            assert patched(model) == model.config.num_hidden_layers
            ours = tree_forward(model, prompt, tree)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    attn = model.model.layers[0].self_attn
    q, v = held_weight(attn.q_proj), held_weight(attn.v_proj)
    assert q.base is not None and q.base is v.base  # q/k/v in one call: views into one stack


def test_real_model_layers_are_all_served_and_agree(smollm):
    model, _ = smollm
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (1, 200), generator=g)
    tree = DraftTree.build(torch.randint(0, model.config.vocab_size, (20,), generator=g).numpy(),
                           np.concatenate(([-1], np.arange(19) // 2)))
    with torch.inference_mode():
        expected = model.lm_head(tree_forward(model, prompt, tree))
        with verification_kernels(model):
            assert patched(model) == model.config.num_hidden_layers
            logits = model.lm_head(tree_forward(model, prompt, tree))
    assert patched(model) == 0
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("arch", ["gemma", "gpt2"])
def test_layers_of_other_shapes_keep_their_forward(arch):
    model = tiny_model(arch)
    assert not any(serves(m) for m in layers_of(model))
    with verification_kernels(model):
        assert patched(model) == 0


def test_a_layer_with_other_parts_is_not_served():
    import transformers as tf

    config = tf.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = tf.Qwen3ForCausalLM(config).eval()  # per-head query and key norms before the rotation
    assert not any(serves(m) for m in layers_of(model))


def test_other_arithmetic_of_the_same_shape_is_not_served():
    model = tiny_model("llama")
    layer = model.model.layers[0]
    assert serves(layer)

    class HalfResidual(type(layer)):  # same parts, another sum: only the probe can tell
        def forward(self, hidden_states, **kwargs):
            return 0.5 * super().forward(hidden_states, **kwargs)

    layer.__class__ = HalfResidual
    with torch.no_grad():
        layer.self_attn.q_proj.weight.mul_(1.0)  # a step that moves the weights' stamp: judged again
    assert not serves(layer)
    with verification_kernels(model):
        assert patched(model) == 1


def test_a_float64_model_keeps_its_layers():
    model = tiny_model("llama").double()
    assert not any(serves(m) for m in layers_of(model))


def test_calls_it_does_not_take_run_the_layer_own_forward():
    """More rows than the kernels take, autograd, a hook on a submodule: each gets the
    layer's own forward, which is what answers (the hook fires, autograd sees the output)."""
    model = tiny_model("llama")
    fired = []
    g = torch.Generator().manual_seed(3)
    long = torch.randint(0, model.config.vocab_size, (1, MAX_ROWS + 1), generator=g)
    with verification_kernels(model):
        assert patched(model) == 2
        big = model(long).logits  # grad enabled, weights need grad: autograd must see it
        assert big.requires_grad
        handle = model.model.layers[1].self_attn.register_forward_hook(lambda *a: fired.append(1))
        with torch.inference_mode():
            model(long[:, :5])
        handle.remove()
    assert fired == [1]


@pytest.mark.parametrize("switch", ["blas", "layers off"])
def test_routing_to_blas_or_turning_the_pass_off_keeps_the_layer_forward(switch):
    model = tiny_model("qwen2")
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = model(ids).logits
        with verification_kernels(model) as settings:
            if switch == "blas":
                settings.kernel_rows[6] = False
            else:
                settings.layers = False  # what tools/bench_kernel.py's A/B row does
            layer = model.model.layers[0]
            calls = []
            layer.mlp.register_forward_hook(lambda *a: calls.append(1))  # fires only in the own forward
            logits = model(ids).logits
    assert calls == [1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_patches_are_undone_on_an_exception_and_left_to_an_outer_block():
    model = tiny_model("mistral")
    with pytest.raises(RuntimeError, match="inside"):
        with verification_kernels(model) as settings:
            forwards = [vars(m)["forward"] for m in layers_of(model)]
            with decoder_layers(model, settings):
                assert [vars(m)["forward"] for m in layers_of(model)] == forwards
            assert patched(model) == 2
            raise RuntimeError("inside")
    assert patched(model) == 0
    with decoder_layers(model, KernelSettings(False)):
        assert patched(model) == 0
