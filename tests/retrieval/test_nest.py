"""NEST: keys in the datastore (real LMDB and Arrow), two-stage kNN, spans, losslessness.

Fast tests use a tiny random-weight Llama over the real tokenizer's vocabulary; the last
test runs the real model over a few hundred corpus tokens.
"""

import numpy as np
import pytest
import torch

from conftest import chat_ids, tiny_model
from retrodraft.decode import generate, load_tokenizer
from retrodraft.decode.keys import ModelEncoder, model_info, nest_drafters, sequence_hidden
from retrodraft.decode.replay import Trace, replay
from retrodraft.retrieval import (
    CorruptDatastoreError,
    Datastore,
    Document,
    KeyModelMismatchError,
    MissingKeysError,
)
from retrodraft.retrieval.keys_store import KeyBuilder, Projection
from retrodraft.retrieval.nest import NestDrafter

DOCS = [
    Document("/doc/heapq.txt", 0, "heappush(heap, item) pushes the value item onto the heap, keeping the heap "
             "invariant. heappop(heap) pops and returns the smallest item from the heap."),
    Document("/doc/bisect.txt", 0, "bisect_left(a, x) locates the insertion point for x in a to maintain sorted "
             "order. If x is already present, the insertion point is before any existing entries."),
    Document("/doc/textwrap.txt", 0, "dedent(text) removes any common leading whitespace from every line in text. "
             "wrap(text, width) wraps the single paragraph in text so every line is at most width characters."),
]
MORE = [Document("/doc/json.txt", 0, "dumps(obj) serializes obj to a JSON formatted str. loads(s) deserializes s.")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", vocab=len(tok))


class CountingEncoder(ModelEncoder):
    """ModelEncoder that counts the documents it encodes."""

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.encoded = 0

    def __call__(self, docs):
        self.encoded += len(docs)
        return super().__call__(docs)


@pytest.fixture(scope="module")
def store(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("nest") / "docs.rdstore"
    builder = KeyBuilder(ModelEncoder(model, window=32, overlap=8), dims=16, sample_tokens=64)
    Datastore.build(path, DOCS, tok, progress=False, keys=builder).close()
    ds = Datastore.open(path, tokenizer=tok)
    yield ds
    ds.close()


def test_windowed_keys_equal_projected_hidden_states(store, model):
    """Every document's stored keys are its hidden states (overlapping windows), projected, fp16."""
    index = store.nest_index()
    enc = ModelEncoder(model, window=32, overlap=8)
    o = store.doc_offsets
    for d in range(store.num_documents):
        doc = store.tokens[o[d] : o[d + 1] - 1]
        hidden = enc([doc])[0]
        whole = sequence_hidden(model, doc)
        # the first window is exact; later ones see only their window, so they differ a little
        np.testing.assert_allclose(hidden[:32], whole[:32], atol=1e-4)
        assert np.array_equal(index.keys[o[d] : o[d + 1] - 1], index.projection(hidden).astype(np.float16))
    assert not index.keys[o[1:] - 1].any()  # separator rows are zero


def test_projection_is_pca():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)) * np.array([5, 3, 1, 0.1, 0.1, 0.1]) + 7
    p = Projection.fit(x, 2)
    assert np.allclose(np.abs(p.components.T), np.eye(6)[:2], atol=0.05)
    assert np.allclose(p(x).mean(0), 0, atol=1e-4)
    flat = Projection.from_flat(p.flat(), 6, 2)
    assert np.array_equal(flat.components, p.components) and np.array_equal(flat.mean, p.mean)


def test_stage_one_ranks_the_document_that_shares_the_query_words(store, tok):
    index = store.nest_index()
    query = np.asarray(tok("how does dedent treat leading whitespace?")["input_ids"], np.int32)
    assert index.documents(query, 10**6)[0] == 2
    assert len(index.documents(query, 1)) == 1  # the best one always fits
    assert len(index.documents(np.array([10**6], np.int32), 10**6)) == 0  # unknown ids: nothing


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_stage_search_equals_brute_force(store, tok, seed):
    index = store.nest_index()
    prompt = np.asarray(tok("heap item smallest sorted insertion point")["input_ids"], np.int32)
    drafter = NestDrafter(index, k=5)
    hidden = np.random.default_rng(seed).standard_normal(index.meta["hidden_size"]).astype(np.float32)
    drafter.observe(prompt, prompt[-1:], None, hidden=hidden[None])
    hits, dist = drafter.search(prompt)
    docs = index.documents(prompt, drafter.max_rows)
    o = store.doc_offsets
    rows = np.concatenate([np.arange(o[d], o[d + 1] - 3) for d in docs])
    q = index.projection(hidden).astype(np.float64)
    brute = ((index.keys[rows].astype(np.float64) - q) ** 2).sum(1)
    order = np.argsort(brute, kind="stable")[:5]
    assert hits.tolist() == rows[order].tolist()
    np.testing.assert_allclose(dist, brute[order], rtol=1e-4)


def test_spans_cite_the_text_they_copy(store, tok):
    index = store.nest_index()
    drafter = NestDrafter(index, k=8, depth=6)
    prompt = np.asarray(tok("dedent whitespace")["input_ids"], np.int32)
    assert len(drafter.propose(prompt, 64)) == 0  # no hidden state yet: no draft
    drafter.observe(prompt, prompt[-1:], None, hidden=np.random.default_rng(3).standard_normal((1, index.meta["hidden_size"])))
    tree = drafter.propose(prompt, 64)
    tree.validate()
    assert len(tree) > 0 and (tree.origins >= 0).all()
    assert np.array_equal(store.tokens[tree.origins], tree.tokens)
    for node in range(len(tree)):
        path, offset = drafter.locate(int(tree.origins[node]))
        doc = next(i for i, d in enumerate(DOCS) if d.path == path)
        text_ids = tok(DOCS[doc].text, add_special_tokens=False)["input_ids"]
        assert text_ids[offset] == tree.tokens[node]
        # the whole path to the node is the text before its origin (spans fuse by prefix)
        path_tokens, p = [], node
        while p >= 0:
            path_tokens.insert(0, int(tree.tokens[p]))
            p = int(tree.parents[p])
        at = int(tree.origins[node])
        assert store.tokens[at - len(path_tokens) + 1 : at + 1].tolist() == path_tokens


def test_greedy_with_nest_equals_model_generate(store, model, tok):
    ds_drafters = nest_drafters(model, store)
    assert [d.name for d in ds_drafters] == ["nest"]
    ids = torch.tensor([tok("wrap(text, width) wraps the single paragraph in text")["input_ids"]])
    want = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    for drafters in (ds_drafters, None):  # NEST alone, and in the default fused engine
        out = generate(model, ids, max_new_tokens=24, drafters=drafters, datastore=store if drafters is None else None,
                       budget=8)
        assert out.sequences.tolist() == want.tolist()
        assert "nest" in out.stats.accepted_per_drafter


class FirstTree(NestDrafter):
    """NestDrafter that records the size of each tree it proposes."""

    sizes: list

    def propose(self, context, budget):
        tree = super().propose(context, budget)
        self.sizes = getattr(self, "sizes", []) + [len(tree)]
        return tree


def test_nest_drafts_at_the_first_step_from_the_prefill(store, model, tok):
    """The prompt's prefill computes the state that predicts its last token: NEST's first
    step has a query with no extra forward, and the output stays model.generate's."""
    drafter = FirstTree(store.nest_index(), k=8)
    ids = torch.tensor([tok("dedent(text) removes any common leading whitespace")["input_ids"]])
    out = generate(model, ids, max_new_tokens=8, drafters=[drafter], budget=8)
    assert drafter.sizes[0] > 0
    assert out.sequences.tolist() == model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).tolist()


class Recorder:
    """A drafter that records the hidden states it observes and the context lengths it drafts for."""

    name, needs_topk, needs_hidden = "recorder", False, True

    def __init__(self):
        self.observed, self.proposed = [], []

    def observe(self, context, accepted, topk, hidden=None):
        self.observed.append((len(context) - len(accepted), hidden.copy()))

    def propose(self, context, budget):
        from retrodraft.retrieval.tree import DraftTree

        self.proposed.append(len(context))
        return DraftTree.empty()


def test_drafters_get_the_hidden_states_of_the_accepted_positions(model, tok):
    """generate (from its verification forwards) and replay (from one prefill) hand the same states."""
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    rec = Recorder()
    out = generate(model, ids, max_new_tokens=6, drafters=[rec], budget=4)
    seq = out.sequences[0].numpy()
    whole = sequence_hidden(model, seq)
    assert len(rec.observed) == out.stats.steps + 1  # the prefill's state first
    assert rec.observed[0][0] == ids.shape[1] - 1
    for before, hidden in rec.observed:  # row j chose new token j: the state at position before - 1 + j
        np.testing.assert_allclose(hidden, whole[before - 1 : before - 1 + len(hidden)], atol=1e-4)
    trace = Trace("q", "cat", seq[: ids.shape[1]].astype(np.int32), seq[ids.shape[1]:].astype(np.int32),
                  np.zeros((6, 8), np.int32))
    rec2 = Recorder()
    replay(trace, [rec2], budget=4, hidden=whole)
    assert rec2.proposed == rec.proposed and len(rec2.observed) == len(rec.observed)
    for (a, x), (b, y) in zip(rec2.observed, rec.observed):
        assert a == b
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_keys_from_another_model_are_refused(store, tok, tmp_path):
    other = tiny_model("llama", vocab=len(tok), seed=1)
    assert model_info(other)["fingerprint"] != store.meta["keys"]["model"]["fingerprint"]
    with pytest.raises(KeyModelMismatchError, match="fingerprint"):
        nest_drafters(other, store)
    with pytest.raises(KeyModelMismatchError):
        generate(other, torch.tensor([[5, 6, 7]]), max_new_tokens=2, datastore=store)


def test_keys_survive_reopen_and_append_and_a_killed_build(store, model, tok, tmp_path):
    path = tmp_path / "s.rdstore"
    enc = ModelEncoder(model, window=32, overlap=8)
    Datastore.build(path, DOCS, tok, progress=False, keys=KeyBuilder(enc, dims=16, sample_tokens=64)).close()
    with Datastore.open(path, readonly=False) as ds:
        before = ds.nest_index().keys.copy()
        assert np.array_equal(before, store.nest_index().keys)
        with pytest.raises(MissingKeysError, match="--model"):
            ds.append(MORE, tok, progress=False)

        class Killed(Exception):
            pass

        def dying(docs):
            raise Killed()

        dying.info, dying.hidden_size, dying.settings = enc.info, enc.hidden_size, enc.settings
        with pytest.raises(Killed):
            ds.append(MORE, tok, progress=False, keys=KeyBuilder(dying))
    with Datastore.open(path, readonly=False) as ds:  # the killed append left the previous version
        assert ds.num_documents == len(DOCS) and np.array_equal(ds.nest_index().keys, before)
        other = ModelEncoder(tiny_model("llama", vocab=len(tok), seed=1), window=32, overlap=8)
        with pytest.raises(KeyModelMismatchError):
            ds.append(MORE, tok, progress=False, keys=KeyBuilder(other))
        ds.append(MORE, tok, progress=False, keys=KeyBuilder(enc))
        index = ds.nest_index()
        assert np.array_equal(index.keys[: before.shape[0]], before)  # old keys copied, projection kept
        new = ds.tokens[ds.doc_offsets[3] : ds.doc_offsets[4] - 1]
        want = index.projection(enc([new])[0]).astype(np.float16)
        assert np.array_equal(index.keys[ds.doc_offsets[3] : ds.doc_offsets[4] - 1], want)
    (path / "keys.arrow").write_bytes((path / "keys.arrow").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CorruptDatastoreError):
        Datastore.open(path)


def test_lazy_keys_are_encoded_once_across_reopens(model, tok, tmp_path):
    path = tmp_path / "lazy.rdstore"
    enc = CountingEncoder(model, window=32, overlap=8)
    Datastore.build(path, DOCS, tok, progress=False, keys=KeyBuilder(enc, mode="lazy", dims=16, sample_tokens=64)).close()
    assert (path / "keys.arrow").exists() is False
    prompt = np.asarray(tok("dedent whitespace wrap width")["input_ids"], np.int32)
    with Datastore.open(path, readonly=False) as ds:
        enc.encoded = 0
        drafter = NestDrafter(ds.nest_index(), enc)
        drafter.observe(prompt, prompt[-1:], None, hidden=np.ones((1, enc.hidden_size), np.float32))
        hits, _ = drafter.search(prompt)
        assert enc.encoded == len(drafter.documents) > 0 and len(hits)
        keys = drafter._keys.copy()
    with Datastore.open(path, readonly=False) as ds:
        drafter = NestDrafter(ds.nest_index(), enc)
        drafter.observe(prompt, prompt[-1:], None, hidden=np.ones((1, enc.hidden_size), np.float32))
        assert np.array_equal(drafter.search(prompt)[0], hits)
        assert enc.encoded == len(drafter.documents)  # nothing encoded again
        assert np.array_equal(drafter._keys, keys)
        # the same keys as encoding them up front would give, with this projection
        o = ds.doc_offsets
        d = int(drafter.documents[0])
        want = ds.nest_index().projection(enc([ds.tokens[o[d] : o[d + 1] - 1]])[0]).astype(np.float16)
        assert np.array_equal(keys[: o[d + 1] - 3 - o[d]], want[: o[d + 1] - 3 - o[d]])


def test_bad_settings_are_refused(model):
    enc = ModelEncoder(model)
    with pytest.raises(ValueError, match="mode"):
        KeyBuilder(enc, mode="some")
    with pytest.raises(ValueError, match="dims"):
        KeyBuilder(enc, dims=0)
    with pytest.raises(ValueError, match="overlap"):
        ModelEncoder(model, window=16, overlap=16)
    with pytest.raises(ValueError, match="context"):
        ModelEncoder(model, window=4096)


@pytest.mark.model
def test_real_model_greedy_with_nest_equals_model_generate_and_cites(smollm, tmp_path):
    """A few hundred tokens of corpus keys by the real model; its answer is in the corpus."""
    model, tok = smollm
    ids = chat_ids(tok, "What does the bisect module do in Python? Answer in two sentences.")
    want = model.generate(ids, max_new_tokens=32, do_sample=False)
    answer = tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    docs = DOCS + [Document("/doc/answer.txt", 0, answer)]
    path = tmp_path / "real.rdstore"
    Datastore.build(path, docs, tok, progress=False, keys=KeyBuilder(ModelEncoder(model))).close()
    with Datastore.open(path, tokenizer=tok) as ds:
        out = generate(model, ids, max_new_tokens=32, drafters=nest_drafters(model, ds), budget=16)
        assert out.sequences.tolist() == want.tolist()
        assert out.stats.accepted_per_drafter["nest"] > 0
        new = out.sequences[0, ids.shape[1]:].tolist()
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
        cited = [s for s in out.spans if s.source == "nest"]
        assert cited
        for s in cited:
            assert s.document == "/doc/answer.txt"
            assert new[s.start : s.start + s.length] == answer_ids[s.offset : s.offset + s.length]


@pytest.mark.model
def test_bench_replays_and_runs_nest(smollm, tmp_path, capsys):
    """bench.py: replay --hidden puts NEST beside the others; run times drafter:nest and the
    fused engine with and without it, with outputs identical to vanilla's."""
    import json

    from retrodraft.tools import bench

    model, tok = smollm
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa",
                                     "turns": ["What does heappop do to a heap?"]}) + "\n")
    store = tmp_path / "docs.rdstore"
    Datastore.build(store, DOCS, tok, progress=False, keys=KeyBuilder(ModelEncoder(model))).close()
    traces = tmp_path / "traces.jsonl"
    bench.main(["record", "--questions", str(questions), "--max-new-tokens", "12", "--out", str(traces)])
    bench.main(["replay", str(traces), "--budgets", "8", "--datastore", str(store), "--hidden",
                "--drafters", "prompt_lookup,nest,recycling"])
    table = capsys.readouterr().out
    assert "\nnest " in table and "prompt_lookup+nest+recycling" in table and "prompt_lookup+recycling " in table
    with pytest.raises(SystemExit, match="keys"):
        bench.main(["replay", str(traces), "--budgets", "8", "--hidden"])
    out = tmp_path / "results.json"
    bench.main(["--questions", str(questions), "--max-new-tokens", "12", "--warmup", "0", "--datastore", str(store),
                "--methods", "drafter:nest,retrodraft,retrodraft:no_nest", "--out", str(out), "--chart",
                str(tmp_path / "c.png")])
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["vanilla", "drafter:nest", "retrodraft", "retrodraft:no_nest"]
    assert all(cell["identical"] for m in results.values() for cell in m.values())
    with pytest.raises(SystemExit, match="unknown --methods"):
        bench.main(["--questions", str(questions), "--datastore", str(store), "--methods", "drafter:nope"])


def test_build_index_cli_refuses_keys_it_cannot_extend(tmp_path, tok, capsys):
    from retrodraft.tools import build_index

    corpus = tmp_path / "c.txt"
    corpus.write_text(DOCS[0].text)
    out = tmp_path / "plain.rdstore"
    Datastore.build(out, DOCS, tok, progress=False).close()
    with pytest.raises(SystemExit):
        build_index.main([str(corpus), "--out", str(out), "--append", "--keys", "--quiet"])
    assert "no NEST keys to extend" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_index.main([str(corpus), "--out", str(out), "--keys", "some"])
    assert "invalid choice" in capsys.readouterr().err
