"""Sampling through draft trees keeps the target's exact distribution (chi-square tests)."""

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from conftest import PROMPT, VOCAB, FixedDrafter, chi_square_p, tiny_model, tree_of
from retrodraft.decode import generate
from retrodraft.decode.acceptance import accept_sampling

RUNS = 1200


def warped_probs(model, ids, temperature, top_k, top_p):
    """The model's own next-token distribution, warped by transformers' processors."""
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return warped_from_logits(logits, temperature, top_k, top_p)


def joint_first_two(model, **warp):
    """[VOCAB, VOCAB]: probability of the first two generated tokens."""
    p1 = warped_probs(model, PROMPT, **warp)
    joint = np.zeros((VOCAB, VOCAB))
    for a in range(VOCAB):
        ids = torch.cat([PROMPT, torch.tensor([[a]])], dim=1)
        joint[a] = p1[a] * warped_probs(model, ids, **warp)
    return joint


WARPS = [
    dict(temperature=1.0, top_k=None, top_p=None),
    dict(temperature=0.7, top_k=4, top_p=None),
    dict(temperature=1.3, top_k=None, top_p=0.8),
]


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("likely", [True, False])
def test_acceptance_keeps_the_distribution_of_two_levels(warp, likely):
    """accept_sampling alone, over fixed logits: 20k draws, exact first-two-token law."""
    gen = torch.Generator().manual_seed(11)
    logits1 = torch.randn(VOCAB, generator=gen) * 2
    logits2 = torch.randn(VOCAB, VOCAB, generator=gen) * 2  # row a: logits after token a
    procs = lambda x: warped_from_logits(x, **warp)
    p1 = procs(logits1)
    joint = p1[:, None] * np.stack([procs(logits2[a]) for a in range(VOCAB)])
    order = np.argsort(-p1)
    a = int(order[0])
    second = np.argsort(-joint[a]).tolist()
    tree = tree_of([a, int(order[1])], second[:2]) if likely else tree_of([int(order[-1]), int(order[-2])], second[-2:])
    rows = [logits1] + [logits2[int(t)] for t in tree.tokens]  # row i + 1 predicts after node i

    counts = np.zeros((VOCAB, VOCAB))
    for _ in range(20000):
        path, bonus = accept_sampling(tree, lambda r: rows[r].clone(), generator=gen, **warp)
        toks = [int(tree.tokens[i]) for i in path] + [bonus]
        if len(toks) == 1:  # the next step samples the second token from the target
            toks.append(int(torch.multinomial(torch.from_numpy(joint[toks[0]]), 1, generator=gen)))
        counts[toks[0], toks[1]] += 1
    assert chi_square_p(counts, joint) > 0.01


def warped_from_logits(logits, temperature, top_k, top_p):
    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        procs.append(TopPLogitsWarper(top_p))
    return procs(None, logits[None].clone()).softmax(-1)[0].double().numpy()


@pytest.mark.parametrize("warp, likely", [(WARPS[0], True), (WARPS[2], False)])
def test_generate_samples_the_first_two_tokens_like_the_model(warp, likely):
    """End to end through generate() with a tiny model and a hand-made tree."""
    model = tiny_model("llama", vocab=VOCAB, seed=3)
    # sharpen the random model so some tokens are clearly likelier than others
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    joint = joint_first_two(model, **warp)
    p1 = joint.sum(1)
    order = np.argsort(-p1)
    a = int(order[0])
    second = np.argsort(-joint[a]).tolist()
    if likely:
        tree = tree_of([a, int(order[1])], second[:2])
    else:
        tree = tree_of([int(order[-1]), int(order[-2])], second[-2:])
    drafter = FixedDrafter(tree)
    counts = np.zeros((VOCAB, VOCAB))
    accepted = 0
    for seed in range(RUNS):
        # 3 tokens, so the depth-2 tree fits with its bonus token; the first two are compared
        out = generate(model, PROMPT, max_new_tokens=3, drafters=[drafter], do_sample=True, seed=seed,
                       eos_token_id=[], **warp)
        x1, x2 = out.sequences[0, PROMPT.shape[1]:][:2].tolist()
        counts[x1, x2] += 1
        accepted += out.stats.new_tokens - out.stats.steps
    assert chi_square_p(counts, joint) > 0.01
    if likely:
        assert accepted > RUNS * 0.3  # the drafts really were used
