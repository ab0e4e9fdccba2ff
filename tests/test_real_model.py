"""The real default model (SmolLM2-135M-Instruct): greedy output equals model.generate."""

import inspect
import json.encoder

import pytest
import torch

from conftest import chat_ids
from retrodraft.decode import generate
from retrodraft.retrieval import PromptLookupDrafter

CODE = inspect.getsource(json.encoder)

PROMPTS = {
    "short": "Hi!",
    "eos_early": "Answer with a single word: what is the capital of France?",
    "repetition": "Count from 1 to 40, separated by commas.",
    "repeat_text": "Repeat this sentence three times: the cat sat on the mat and looked at the hat.",
    "code": "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "summary": "Summarize in two sentences: The Industrial Revolution began in Britain in the late 18th century. "
               "It transformed economies from agrarian to industrial, introduced factories and steam power, "
               "and led to rapid urbanization. Working conditions were often harsh, which led to labor reforms.",
    "math": "If a train travels 60 miles per hour for 3 hours, how far does it go? Explain step by step.",
    "list": "List five fruits and one fact about each.",
    "rewrite": "Rewrite this more formally: hey guys, the meeting got moved to 3pm tomorrow, don't be late ok?",
    "long": "Here is a Python module:\n\n" + CODE[:6000] + "\n\nExplain what the function encode_basestring does.",
}


NEW_TOKENS = 80
_references: dict[str, torch.Tensor] = {}


def reference(model, tok, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, model.generate's greedy sequence) for PROMPTS[name], computed once."""
    ids = chat_ids(tok, PROMPTS[name])
    if name not in _references:
        _references[name] = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids, _references[name]


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
    generate(model, ids, max_new_tokens=24, do_sample=True, seed=7)  # default drafters run too


@pytest.mark.model
def test_a_poisoned_cost_cache_is_measured_again_and_greedy_output_is_unchanged(smollm, tmp_path, monkeypatch):
    import numpy as np

    from retrodraft.decode.budget import SIZES, CostModel, validated

    model, tok = smollm
    monkeypatch.setenv("RETRODRAFT_CACHE", str(tmp_path))
    monkeypatch.setattr("retrodraft.decode.budget.ROUNDS", 2)  # the statistics are tested in test_budget
    monkeypatch.setattr("retrodraft.decode.budget.RETRIES", 0)
    monkeypatch.setattr(CostModel, "_instances", type(CostModel._instances)())
    ids, want = reference(model, tok, "repeat_text")
    path = CostModel(model).path(ids.shape[1])
    path.parent.mkdir(parents=True)
    poisoned = [1, 5.47, 1.0, 6.98, 1, 1, 1, 1, 1, 1, 1, 1, 0.91]  # the cache: c(64) < c(1)
    path.write_text(json.dumps({"format": 2, "sizes": list(SIZES), "costs": poisoned, "seconds0": 0.1, "spread": 0}))
    out = generate(model, ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    data = json.loads(path.read_text())
    curve = validated(data)
    assert curve.costs[-1] > curve.costs[1]  # a 64-node forward costs more than a 1-node one again
    assert sum(data["learned"]["counts"]) > 0  # and the steps were learned from and saved
    assert len(out.stats.measured_step_seconds) == out.stats.steps and np.isfinite(out.stats.prediction_error)
