"""Issue 12 items 4, 8, 10, 15: generate checks what it is given up front and never drops its output.

Here beside test_store and test_store_hardening, whose documents and tokenizer fixtures it shares."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_model
from retrodraft.decode import generate
from retrodraft.retrieval import Datastore, TokenizerMismatchError
from retrodraft.retrieval.learned import LEGACY_NAME as ONLINE_STATE  # the record of older datastores
from test_store import DOCS_A
from test_store_hardening import tok, tok_dir  # noqa: F401 (fixtures: a word-level tokenizer of < 64 ids)

PROMPT = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def vanilla(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture
def store(tmp_path, tok):
    assert len(tok) < 64
    Datastore.build(tmp_path / "ds", DOCS_A, tok, progress=False).close()
    with Datastore.open(tmp_path / "ds", readonly=False) as ds:
        yield ds


# ---- 4. a finished generation discarded ------------------------------------------------------------


def test_item4_output_survives_a_datastore_replaced_during_the_call(model, store, tok_dir):
    # Another process rebuilds the datastore after this one opened it, as an append during the call would.
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from transformers import PreTrainedTokenizerFast
        from retrodraft.retrieval import Datastore, Document
        tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])
        Datastore.build(sys.argv[1], [Document("/n.txt", 0, "add a b")], tok, progress=False).close()
    """)
    p = subprocess.run([sys.executable, "-c", code, str(store.path), str(tok_dir)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    with pytest.warns(RuntimeWarning, match="not saved.*rebuilt or appended to"):
        out = generate(model, PROMPT, max_new_tokens=8, datastore=store)
    assert torch.equal(out.sequences, vanilla(model, PROMPT, 8))


# ---- 8. out-of-vocabulary ids --------------------------------------------------------------------------------


def test_item8_reference_ids_outside_the_vocabulary(model):
    with pytest.raises(ValueError, match=r"reference 1 holds token ids in \[1, 100\].*\[0, 64\)"):
        generate(model, PROMPT, max_new_tokens=4, references=[[1, 2], [1, 100]])


def test_item8_datastore_built_with_a_larger_tokenizer(store, tmp_path):
    small = tiny_model("llama", vocab=8)
    with pytest.raises(ValueError, match=r"datastore at .* holds token id \d+, outside the model's vocabulary \[0, 8\)"):
        generate(small, torch.tensor([[1, 2, 3]]), max_new_tokens=4, datastore=store)


def test_item8_datastore_of_another_tokenizer(model, store):
    from retrodraft.decode import load_tokenizer

    with pytest.raises(TokenizerMismatchError):
        generate(model, PROMPT, max_new_tokens=4, datastore=store, tokenizer=load_tokenizer())


def test_item8_stored_outputs_outside_the_vocabulary(model, store):
    store.save_state(ONLINE_STATE, {"outputs": np.array([3, 70], np.int32), "lengths": np.array([2])})
    with pytest.raises(ValueError, match=r"past outputs saved in the datastore .* \[3, 70\].*\[0, 64\)"):
        generate(model, PROMPT, max_new_tokens=4, datastore=store)


# ---- 10. prompt ids that would wrap -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2**31, 2**31 + 5, -1, 64])
def test_item10_prompt_ids_outside_the_vocabulary(model, bad):
    ids = torch.tensor([[1, 2, bad]])
    with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, 64\)"):
        generate(model, ids, max_new_tokens=4)


def test_item10_float_prompt_ids(model):
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, PROMPT.float(), max_new_tokens=4)


# ---- 15. argument checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=-5), r"budget must be None \(automatic\) or an int in \[0, 1024\]"),
    (dict(budget=10**9), r"budget must be .* got 1000000000"),
    (dict(budget=2.5), "budget must be"),
    (dict(budget=True), "budget must be"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive int"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be a positive int"),
    (dict(do_sample=True, top_k=0), r"top_k must be None or an int >= 1, got 0"),
    (dict(do_sample=True, top_k=-1), "top_k must be"),
    (dict(do_sample=True, top_k=2.5), "top_k must be"),
    (dict(do_sample=True, temperature=math.nan), "temperature must be > 0 and finite"),
    (dict(do_sample=True, temperature=math.inf), "temperature must be > 0 and finite"),
    (dict(do_sample=True, temperature="1"), "temperature must be"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), "top_p must be"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(seed="x"), "seed must be None or an int"),
])
def test_item15_bad_settings_are_refused_up_front_stating_the_range(model, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, PROMPT, **kwargs)


def test_item15_edges_of_the_ranges_are_accepted(model):
    ref = vanilla(model, PROMPT, 4)
    for kw in (dict(budget=0), dict(budget=1024), dict(do_sample=True, top_k=1, seed=0), dict(do_sample=True, top_p=1.0)):
        out = generate(model, PROMPT, max_new_tokens=4, **kw)
        assert out.sequences.shape == ref.shape
        if kw.get("top_k") == 1 or "budget" in kw:
            assert torch.equal(out.sequences, ref)  # top-1 sampling is greedy
