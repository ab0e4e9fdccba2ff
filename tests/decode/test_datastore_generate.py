"""A datastore attached to generation on the real model: exact, faster where it knows the answer, persistent."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StopStringCriteria, StoppingCriteriaList

from conftest import NEW_TOKENS, PROMPTS, ROOT, reference
from retrodraft import speculative
from retrodraft.decode import generate
from retrodraft.retrieval import Datastore, PromptLookupDrafter, iter_documents

KNOWN = ["code", "list", "math"]  # their answers go into the corpus


@pytest.fixture(scope="module")
def store(smollm, tmp_path_factory):
    """A datastore over a few stdlib modules plus the model's own answers to KNOWN prompts."""
    model, tok = smollm
    corpus = tmp_path_factory.mktemp("corpus")
    import json.decoder
    import textwrap as tw

    for mod in (json.decoder, tw):
        (corpus / (mod.__name__ + ".py")).write_text(open(mod.__file__).read())
    for name in KNOWN:
        ids, ref = reference(model, tok, name)
        (corpus / f"answer_{name}.txt").write_text(tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True))
    path = tmp_path_factory.mktemp("stores") / "test.rdstore"
    Datastore.build(path, iter_documents(corpus), tok, progress=False).close()
    ds = Datastore.open(path, readonly=False, tokenizer=tok)
    yield ds
    ds.close()


@pytest.mark.model
@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_with_a_datastore_equals_model_generate(smollm, store, name):
    model, tok = smollm
    ids, ref = reference(model, tok, name)
    out = generate(model, ids, max_new_tokens=NEW_TOKENS, datastore=store)
    assert torch.equal(out.sequences, ref)


@pytest.mark.model
@pytest.mark.parametrize("name", KNOWN)
def test_a_datastore_that_holds_the_answer_raises_acceptance_and_cites_it(smollm, store, name):
    model, tok = smollm
    ids, ref = reference(model, tok, name)
    # explicit drafters: the process-wide output tree has seen these answers in earlier tests
    corpus = [d for d in store.drafters(model.config.vocab_size) if d.name == "corpus"]
    plain = generate(model, ids, max_new_tokens=NEW_TOKENS, drafters=[PromptLookupDrafter()], budget=16)
    with_store = generate(model, ids, max_new_tokens=NEW_TOKENS, drafters=[PromptLookupDrafter(), *corpus], budget=16)
    assert torch.equal(with_store.sequences, ref) and torch.equal(plain.sequences, ref)
    assert with_store.stats.mean_accepted > plain.stats.mean_accepted
    assert with_store.stats.accepted_per_drafter["corpus"] > 0
    assert any(s.source == "corpus" and s.document.endswith(f"answer_{name}.txt") and s.length >= 8
               for s in with_store.spans)


@pytest.mark.model
def test_online_state_written_by_one_process_is_there_after_restart(smollm, store, tmp_path):
    model, tok = smollm
    ids, ref = reference(model, tok, "repeat_text")
    out = generate(model, ids, max_new_tokens=24, datastore=store)
    store.export_scope(tmp_path / "learned.npz")
    saved = np.load(tmp_path / "learned.npz")
    new = out.sequences[0, ids.shape[1]:].tolist()  # fewer than 24 where the answer ends (EOS)
    assert saved["outputs"][-len(new):].tolist() == new
    assert saved["recycling_tokens"].size > 0 and (saved["recycling_rows"] >= 0).all()
    # calibration is saved per drafter and per set of drafters agreeing on a fused node:
    # every source this process has observed nodes of (earlier tests' calls included)
    cal = store.online(model.config.vocab_size).calibrator
    observed = {n for i, n in enumerate(cal.names) if cal.seen[i].any()}
    assert set(saved["calibration_names"].tolist()) == observed
    assert "prompt_lookup" in observed and any(n.startswith("fused:") for n in observed)
    child = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from retrodraft.retrieval import Datastore
        ds = Datastore.open({str(store.path)!r})
        state = ds.online(49152)
        print(len(state.output_tree), int((state.recycling.state()["rows"][:, 0] >= 0).sum()))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == int(saved["output_lengths"].sum())
    assert int(out[1]) == saved["recycling_tokens"].size



@pytest.mark.model
def test_model_generate_with_custom_generate_equals_plain_model_generate(smollm, store):
    """The front door for transformers users, on all 10 prompts, greedy, with a logits
    processor and a stopping criterion: output identical to plain model.generate."""
    model, tok = smollm
    stopped_early = 0
    for name, text in PROMPTS.items():
        inputs = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)  # input_ids, attention_mask
        args = dict(max_new_tokens=32, do_sample=False,
                    logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)]),
                    stopping_criteria=StoppingCriteriaList([StopStringCriteria(tok, ["\n\n"])]))
        ref = model.generate(**inputs, **args)
        out = model.generate(**inputs, **args, custom_generate=speculative, datastore=store,
                             return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), (name, tok.decode(out.sequences[0, inputs["input_ids"].shape[1]:]))
        assert out.stats.new_tokens == ref.shape[1] - inputs["input_ids"].shape[1]
        stopped_early += ref.shape[1] < inputs["input_ids"].shape[1] + 32
    assert stopped_early >= 2  # the stop string and EOS did end some answers
