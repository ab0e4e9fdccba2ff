"""ShardedCorpusDrafter against CorpusDrafter over one stream of the same documents (no I/O)."""

import numpy as np
import pytest

from retrodraft.index import suffix_array
from retrodraft.retrieval.drafters import CorpusDrafter, join_documents
from retrodraft.retrieval.shard_drafter import ShardedCorpusDrafter, ShardIndex


def split(docs: list[np.ndarray], owner: np.ndarray, k: int):
    """One stream over ``docs`` and k shards (documents keep their order), with the map from a
    shard's virtual position to the one stream's position."""
    stream, starts = join_documents(docs)
    shards, to_single = [], []
    for s in range(k):
        ids = [i for i in range(len(docs)) if owner[i] == s]
        if not ids:
            continue
        t, o = join_documents([docs[i] for i in ids])
        shards.append((t, suffix_array.build(t), o, np.array(ids, np.int64)))
        to_single.append(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in ids]))
    return stream, shards, np.concatenate(to_single)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_positions", [3, 256])
def test_drafts_equal_one_stream(seed, max_positions):
    rng = np.random.default_rng(seed)
    # A 4-symbol alphabet, short and duplicated documents: many equal continuations and
    # suffixes equal up to their document's end, so order and tie-breaks are exercised.
    base = [rng.integers(0, 4, rng.integers(1, 30)).astype(np.int32) for _ in range(40)]
    docs = [base[i] if rng.random() < 0.7 else base[int(rng.integers(0, i + 1))].copy() for i in range(len(base))]
    k = int(rng.integers(2, 6))
    stream, shards, to_single = split(docs, rng.integers(0, k, len(docs)), k)
    one = CorpusDrafter(stream, suffix_array.build(stream), max_positions=max_positions, depth=5)
    index = ShardIndex(shards, threads=2)
    many = ShardedCorpusDrafter(index, max_positions=max_positions, depth=5)
    try:
        for _ in range(60):
            context = rng.integers(0, 4, rng.integers(1, 12)).astype(np.int32)
            budget = int(rng.integers(1, 40))
            a, b = one.propose(context, budget), many.propose(context, budget)
            assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.parents, b.parents)
            assert np.array_equal(a.scores, b.scores)
            assert np.array_equal(a.origins, to_single[b.origins])
    finally:
        index.close()


def test_single_shard_and_no_match():
    docs = [np.array([1, 2, 3], np.int32), np.array([1, 2, 4], np.int32)]
    stream, shards, _ = split(docs, np.zeros(2, np.int64), 1)
    index = ShardIndex(shards)
    d = ShardedCorpusDrafter(index)
    assert len(d.propose(np.array([9, 9], np.int32), 8)) == 0
    t = d.propose(np.array([1, 2], np.int32), 8)
    # Continuations 3 and 4 after "1 2", one each; ties go to the first in suffix order.
    assert t.tokens.tolist() == [3, 4] and t.scores[0] == t.scores[1]
    with pytest.raises(ValueError, match="at least one shard"):
        ShardIndex([])
    with pytest.raises(ValueError, match="threads"):
        ShardIndex(shards, threads=0)
    with pytest.raises(ValueError, match=r"position must be in \[0, 8\)"):
        index.shard_of(8)
