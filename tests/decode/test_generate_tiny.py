"""The loop on tiny random-weight models of every supported architecture."""

import contextlib

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from conftest import REPETITIVE, FixedDrafter, tiny_model, vanilla
from retrodraft.decode import generate
from retrodraft.decode import tree_attention
from retrodraft.decode.tree_attention import compact_cache, new_cache, packed_attention, tree_inputs
from retrodraft.retrieval.tree import DraftTree


@pytest.mark.parametrize("budget", [None, 1, 4, 32])
def test_greedy_equals_model_generate(tiny, budget):
    out = generate(tiny, REPETITIVE, max_new_tokens=48, budget=budget, eos_token_id=[])
    assert torch.equal(out.sequences, vanilla(tiny, REPETITIVE, 48))
    assert out.stats.new_tokens == 48


def test_speculation_off_still_equals_and_takes_one_token_per_step(tiny):
    out = generate(tiny, REPETITIVE, max_new_tokens=20, drafters=[], eos_token_id=[])
    assert torch.equal(out.sequences, vanilla(tiny, REPETITIVE, 20))
    assert out.stats.steps == 20 and out.stats.mean_accepted == 1.0


def test_a_wrong_bushy_tree_changes_nothing(tiny):
    # many branches of arbitrary tokens: almost all rejected, output unchanged
    tokens = np.arange(40) % 64
    parents = np.array([-1 if i < 8 else i - 8 for i in range(40)])
    drafter = FixedDrafter(DraftTree.build(tokens, parents, np.linspace(1, 0.1, 40)))
    out = generate(tiny, REPETITIVE, max_new_tokens=30, drafters=[drafter], budget=40, eos_token_id=[])
    assert torch.equal(out.sequences, vanilla(tiny, REPETITIVE, 30))


def test_prompt_of_one_token(tiny):
    ids = torch.tensor([[3]])
    assert torch.equal(generate(tiny, ids, max_new_tokens=10, eos_token_id=[]).sequences, vanilla(tiny, ids, 10))


def test_stops_at_max_new_tokens_exactly_even_inside_an_accepted_draft():
    model = tiny_model("llama")
    ids = REPETITIVE
    full = vanilla(model, ids, 30)[0, ids.shape[1]:]
    # a drafter that knows the whole answer: every step could accept far past the limit
    drafter = FixedDrafter(DraftTree.empty())
    drafter.propose = lambda ctx, budget: DraftTree.build(full[len(ctx) - ids.shape[1]:][:budget], np.arange(min(budget, len(full) - len(ctx) + ids.shape[1])) - 1)
    for n in (1, 2, 7, 13):
        out = generate(model, ids, max_new_tokens=n, drafters=[drafter], budget=16, eos_token_id=[])
        assert out.sequences.shape[1] == ids.shape[1] + n
        assert torch.equal(out.sequences[0, ids.shape[1]:], full[:n])


def test_stops_at_the_first_eos_of_several():
    model = tiny_model("qwen2")
    ref = vanilla(model, REPETITIVE, 30)[0, REPETITIVE.shape[1]:].tolist()
    eos = ref[5]
    first = ref.index(eos)
    out = generate(model, REPETITIVE, max_new_tokens=30, eos_token_id=[63, eos])
    assert out.sequences[0, REPETITIVE.shape[1]:].tolist() == ref[: first + 1]
    hf = model.generate(REPETITIVE, max_new_tokens=30, do_sample=False, eos_token_id=[63, eos], pad_token_id=0)
    assert torch.equal(out.sequences, hf)


def test_streamer_sees_prompt_then_every_new_token():
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.view(-1).tolist())

        def end(self):
            self.ended = True

    model = tiny_model("llama")
    rec = Recorder()
    out = generate(model, REPETITIVE, max_new_tokens=25, streamer=rec, eos_token_id=[])
    assert rec.chunks[0] == REPETITIVE[0].tolist()
    assert sum(rec.chunks[1:], []) == out.sequences[0, REPETITIVE.shape[1]:].tolist()
    assert rec.ended


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("buffered", [False, True])
def test_compacted_cache_equals_cache_built_from_scratch(arch, buffered):
    model = tiny_model(arch)
    ids = REPETITIVE
    past = ids.shape[1] - 1
    with torch.inference_mode(), packed_attention(model):
        # a buffer smaller than the prompt also checks that it grows
        cache = new_cache(model, capacity=4) if buffered else DynamicCache(config=model.config)
        model.base_model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
        # root's children: 10 and 11; 11 -> 12 -> 13; 10 -> 14
        tree = DraftTree.build([10, 11, 12, 14, 13], [-1, -1, 1, 0, 2])
        tids, pos, mask = tree_inputs(int(ids[0, -1]), tree, past, model.device, model.dtype)
        model.base_model(input_ids=tids, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True)
        path = [1, 2, 4]  # tokens 11, 12, 13
        compact_cache(cache, past, [0] + [i + 1 for i in path])
        fresh = DynamicCache(config=model.config)
        seq = torch.cat([ids, torch.tensor([[11, 12, 13]])], dim=1)
        model.base_model(input_ids=seq, cache=fresh, use_cache=True)
    for a, b in zip(cache.layers, fresh.layers):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_attention_equals_transformers_sdpa_on_a_tree(arch, monkeypatch):
    """Grouped query heads packed onto their key/value head: the same hidden states as
    transformers' SDPA, which repeats the cache per head, and no fallback to it."""
    model = tiny_model(arch)
    tree = DraftTree.build([10, 11, 12, 14, 13], [-1, -1, 1, 0, 2])
    past = REPETITIVE.shape[1] - 1
    tids, pos, mask = tree_inputs(int(REPETITIVE[0, -1]), tree, past, model.device, model.dtype)
    hidden = []
    for packed in (False, True):
        with torch.inference_mode(), packed_attention(model) if packed else contextlib.nullcontext():
            cache = DynamicCache(config=model.config)
            model.base_model(input_ids=REPETITIVE[:, :-1], cache=cache, use_cache=True)
            if packed:  # from here on, every layer must take the packed path
                monkeypatch.setattr(tree_attention, "sdpa_attention_forward", None)
            hidden.append(model.base_model(input_ids=tids, position_ids=pos, attention_mask=mask,
                                           cache=cache, use_cache=True).last_hidden_state)
    assert model.config._attn_implementation == "sdpa"  # restored on leaving the block
    torch.testing.assert_close(hidden[0], hidden[1], rtol=1e-5, atol=1e-5)


def test_tree_mask_lets_each_node_see_only_cache_ancestors_and_itself():
    tree = DraftTree.build([10, 11, 12], [-1, -1, 1])
    ids, pos, mask = tree_inputs(5, tree, past=3, device=torch.device("cpu"), dtype=torch.float32)
    assert ids.tolist() == [[5, 10, 11, 12]]
    assert pos.tolist() == [[3, 4, 4, 5]]
    seen = (mask[0, 0] == 0).int().tolist()
    assert seen == [[1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0, 1, 0],
                    [1, 1, 1, 1, 0, 1, 1]]


def test_a_tree_of_no_nodes_gets_the_open_mask_the_verifier_uses():
    """A 0-node step is timed (cost curve) on the masked path generate takes, not SDPA's."""
    ids, pos, mask = tree_inputs(5, DraftTree.build([], []), past=3, device=torch.device("cpu"),
                                 dtype=torch.float32)
    assert ids.tolist() == [[5]] and pos.tolist() == [[3]]
    assert mask.shape == (1, 1, 1, 4) and not mask.any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive int"),
        (dict(max_new_tokens=250), "exceeds the model's context of 256"),
        (dict(max_new_tokens=5, do_sample=True, temperature=0.0), "temperature must be > 0"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model("llama"), REPETITIVE, **kwargs)


def test_bad_input_ids_get_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="input_ids is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="batch size 2 is not supported yet"):
        generate(model, torch.ones(2, 4, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"LongTensor \[1, prompt_length\]"):
        generate(model, torch.ones(4, dtype=torch.long), max_new_tokens=3)


def test_text_references_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer="):
        generate(tiny_model("llama"), REPETITIVE, max_new_tokens=3, references=["some text"])


def test_token_references_are_copied_from():
    model = tiny_model("llama")
    answer = vanilla(model, REPETITIVE, 24)[0, REPETITIVE.shape[1]:]
    ref = torch.cat([torch.tensor([9, 9]), REPETITIVE[0, -3:], answer, torch.tensor([8])]).tolist()
    out = generate(model, REPETITIVE, max_new_tokens=24, references=[ref], eos_token_id=[])
    assert torch.equal(out.sequences[0, REPETITIVE.shape[1]:], answer)
    assert out.stats.mean_accepted > 3


def test_two_models_in_two_threads_each_get_their_own_output():
    """One model object per thread is supported: what a forward computes once for all its
    layers (the tiled mask, the rotary angles) must never reach another thread's forward,
    however often the interpreter switches between them. (CPython's lock leaves no switch
    point where the memos could cross today; this guards the supported use as they change.)"""
    import sys
    import threading

    models = [tiny_model("llama", seed=s) for s in (1, 2)]
    prompts = [REPETITIVE, REPETITIVE[:, 3:].flip(-1)]  # other tokens at other positions
    expected = [vanilla(m, p, 40) for m, p in zip(models, prompts)]
    got, errors = [[], []], []

    def run(i):
        try:
            for _ in range(4):
                got[i].append(generate(models[i], prompts[i], max_new_tokens=40, budget=8, eos_token_id=[]).sequences)
        except Exception as e:  # surfaced below: a thread's exception would not fail the test
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    for i in range(2):
        assert len(got[i]) == 4 and all(torch.equal(g, expected[i]) for g in got[i])
