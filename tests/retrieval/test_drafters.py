"""Drafters on their own, and every drafter together inside generate()."""

import numpy as np
import torch

from conftest import REPETITIVE, tiny_model, vanilla
from retrodraft.decode import generate
from retrodraft.index import suffix_array
from retrodraft.index.recycling import TokenRecycling
from retrodraft.index.suffix_tree import SuffixTree
from retrodraft.retrieval.drafters import CorpusDrafter, RecyclingDrafter, ReferenceDrafter, SuffixDrafter


def test_suffix_drafter_continues_a_repeated_phrase_and_learns_outputs():
    outputs = SuffixTree(max_depth=16, max_tokens=1000)
    d = SuffixDrafter(output_tree=outputs)
    ctx = np.array([1, 2, 3, 4, 9, 1, 2, 3], np.int32)
    tree = d.propose(ctx, budget=4)
    assert tree.tokens[0] == 4 and tree.parents[0] == -1
    d.observe(ctx, np.array([7, 7, 8], np.int32), None)
    # a new request sees what the previous one produced
    fresh = SuffixDrafter(output_tree=outputs)
    tree = fresh.propose(np.array([5, 7, 7], np.int32), budget=4)
    assert tree.tokens[0] == 8


def test_corpus_drafter_copies_from_the_suffix_array_with_origins():
    stream = np.array([10, 11, 12, 13, -1, 20, 11, 12, 14, -1], np.int32)
    sa = suffix_array.build(stream)
    d = CorpusDrafter(stream, sa, locate=lambda p: ("doc", int(p)), min_len=2)
    tree = d.propose(np.array([5, 11, 12], np.int32), budget=8)
    assert sorted(tree.tokens[tree.parents == -1].tolist()) == [13, 14]
    for t, o in zip(tree.tokens, tree.origins):
        assert stream[o] == t
    assert len(d.propose(np.array([5, 99], np.int32), budget=8)) == 0


def test_recycling_drafter_follows_the_latest_topk_rows():
    d = RecyclingDrafter(TokenRecycling(vocab_size=32, k=2))
    rows = np.array([[3, 4, 5], [4, 6, 7]], np.int32)  # after 3: 4 then 5; after 4: 6 then 7
    d.observe(np.array([3], np.int32), np.array([4], np.int32), rows)
    tree = d.propose(np.array([1, 3], np.int32), budget=3)
    # after 3 comes its top-1, 4; then 4's top-1, 6, and 3's second choice, 5 (both scored
    # top1_rate * rank_decay = 0.25), which the budget of 3 keeps
    edges = {(int(tree.tokens[p]) if p >= 0 else None, int(t)) for t, p in zip(tree.tokens, tree.parents)}
    assert edges == {(None, 4), (4, 6), (None, 5)}
    assert tree.scores.tolist() == [0.5, 0.25, 0.25]
    assert len(d.propose(np.array([9], np.int32), budget=3)) == 0


def test_every_drafter_together_keeps_greedy_output_exact():
    model = tiny_model("qwen2")
    stream = np.concatenate([REPETITIVE[0].numpy(), [-1], np.arange(40) % 64]).astype(np.int32)
    drafters = [
        SuffixDrafter(output_tree=SuffixTree(max_depth=16, max_tokens=4096)),
        CorpusDrafter(stream, suffix_array.build(stream)),
        RecyclingDrafter(TokenRecycling(vocab_size=64)),
        ReferenceDrafter([list(range(20))]),
    ]
    for budget in (None, 8):
        out = generate(model, REPETITIVE, max_new_tokens=40, drafters=drafters, budget=budget, eos_token_id=[])
        assert torch.equal(out.sequences, vanilla(model, REPETITIVE, 40))
        assert set(out.stats.accepted_per_drafter) == {"suffix", "corpus", "recycling", "reference"}


def test_spans_name_the_reference_and_offset_they_were_copied_from():
    model = tiny_model("llama")
    answer = vanilla(model, REPETITIVE, 30)[0, REPETITIVE.shape[1]:]
    filler = torch.tensor([9, 8, 9, 8, 9])
    ref = torch.cat([filler, REPETITIVE[0, -4:], answer]).tolist()
    out = generate(model, REPETITIVE, max_new_tokens=30, drafters=[ReferenceDrafter([ref], names=["notes.txt"])],
                   eos_token_id=[])
    assert torch.equal(out.sequences[0, REPETITIVE.shape[1]:], answer)
    assert out.spans, "the copy should be attributed"
    for s in out.spans:
        assert s.document == "notes.txt" and s.source == "reference"
        copied = out.sequences[0, REPETITIVE.shape[1] + s.start:][: s.length].tolist()
        assert copied == ref[s.offset : s.offset + s.length]
    # the copy runs over steps and bonus tokens as one span
    assert max(s.length for s in out.spans) > 10
