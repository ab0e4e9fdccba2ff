"""The real default model (SmolLM2-135M-Instruct): greedy output equals model.generate."""

import json

import pytest
import torch

from conftest import CODE, NEW_TOKENS, PROMPTS, chat_ids, reference
from retrodraft.decode import generate
from retrodraft.retrieval import PromptLookupDrafter


@pytest.mark.model
@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_equals_model_generate_on_the_default_model(smollm, name):
    model, tok = smollm
    ids, ref = reference(model, tok, name)
    if name == "long":
        assert ids.shape[1] > 1500
    out = generate(model, ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, ref), tok.decode(out.sequences[0, ids.shape[1]:])
    if name == "eos_early":
        assert out.sequences.shape[1] < ids.shape[1] + NEW_TOKENS and out.sequences[0, -1] == tok.eos_token_id


@pytest.mark.model
def test_references_are_used_on_the_default_model(smollm):
    model, tok = smollm
    doc = CODE[:3000]
    ids = chat_ids(tok, "Copy the following text exactly:\n" + doc[:1200])
    ref = model.generate(ids, max_new_tokens=64, do_sample=False)
    plain = generate(model, ids, max_new_tokens=64, drafters=[])
    with_refs = generate(model, ids, max_new_tokens=64, references=[doc], tokenizer=tok)
    assert torch.equal(plain.sequences, ref) and torch.equal(with_refs.sequences, ref)
    assert with_refs.stats.mean_accepted > 2


@pytest.mark.model
def test_sampling_with_the_same_seed_and_drafts_is_reproducible(smollm):
    # A seed fixes the sample for the same drafts. The default drafters learn between calls
    # (past outputs, recycling), so they are replaced here by a stateless one.
    model, tok = smollm
    ids = chat_ids(tok, "Tell me a very short story about a robot.")
    a, b = (generate(model, ids, max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9, seed=7,
                     drafters=[PromptLookupDrafter()]) for _ in range(2))
    assert torch.equal(a.sequences, b.sequences)
    # the default drafters sample too: a whole answer after the prompt, credited to them
    c = generate(model, ids, max_new_tokens=24, do_sample=True, seed=7)
    assert torch.equal(c.sequences[:, : ids.shape[1]], ids)
    assert c.stats.new_tokens == 24 or c.sequences[0, -1] == tok.eos_token_id
    assert set(c.stats.accepted_per_drafter) == {"prompt_lookup", "suffix", "ngram", "recycling"}


@pytest.mark.model
def test_tokenizer_output_goes_straight_in(smollm):
    """generate(model, **tokenizer(text, return_tensors="pt")) as with model.generate, and
    the model's generation_config (its EOS) applies."""
    model, tok = smollm
    inputs = tok("The capital of France is", return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(generate(model, **inputs, max_new_tokens=16).sequences, ref)


@pytest.mark.model
def test_a_poisoned_cost_cache_is_measured_again_and_greedy_output_is_unchanged(smollm, tmp_path, monkeypatch):
    import numpy as np

    from retrodraft.decode.budget import CACHE_FORMAT, SIZES, CostModel, validated

    model, tok = smollm
    monkeypatch.setenv("RETRODRAFT_CACHE", str(tmp_path))
    monkeypatch.setattr("retrodraft.decode.budget.ROUNDS", 2)  # the statistics are tested in test_budget
    monkeypatch.setattr("retrodraft.decode.budget.RETRIES", 0)
    monkeypatch.setattr(CostModel, "_instances", type(CostModel._instances)())
    ids, want = reference(model, tok, "repeat_text")
    path = CostModel(model).path(ids.shape[1])
    path.parent.mkdir(parents=True)
    poisoned = [1, 5.47, 1.0, 6.98, 1, 1, 1, 1, 1, 1, 1, 1, 0.91]  # the cache: c(64) < c(1)
    path.write_text(json.dumps({"format": CACHE_FORMAT, "sizes": list(SIZES), "costs": poisoned, "seconds0": 0.1,
                                "spread": 0, "kernel": [True] * len(SIZES)}))
    out = generate(model, ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    data = json.loads(path.read_text())
    curve = validated(data)
    assert curve.costs[-1] > curve.costs[1]  # a 64-node forward costs more than a 1-node one again
    assert sum(data["learned"]["counts"]) > 0  # and the steps were learned from and saved
    assert len(out.stats.measured_step_seconds) == out.stats.steps and np.isfinite(out.stats.prediction_error)
