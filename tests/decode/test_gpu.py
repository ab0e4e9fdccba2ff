"""The verifier on CUDA: exactness against model.generate with and without CUDA graphs, graph
reuse, and the fused attention kernel taking the verifier's layout. Every test here skips
without CUDA (CI has none); the same code runs on a CPU in tests/test_verifier.py."""

import pytest
import torch

from conftest import chat_ids, tiny_model
from test_generate_tiny import REPETITIVE, vanilla
from retrodraft.decode import generate
from retrodraft.decode.verifier import TreeVerifier, fused_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CI has none)")

PROMPTS = ["Explain what a hash table is and when to use one.",
           "Write a Python function that returns the n-th Fibonacci number.",
           "Summarize: The committee met on Tuesday. It approved the budget and postponed the vote.",
           "Translate to French: The weather is nice today and we are going to the beach.",
           "What is 17 times 23? Show your steps."]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("budget", [None, 5])
def test_float32_on_cuda_equals_model_generate(tiny, graphs, budget):
    model = tiny.to("cuda")
    ids = REPETITIVE.to("cuda")
    out = generate(model, ids, max_new_tokens=40, budget=budget, eos_token_id=[], cuda_graphs=graphs)
    assert out.sequences.device.type == "cuda"
    assert torch.equal(out.sequences, vanilla(model, ids, 40))
    tiny.to("cpu")  # the fixture is shared with CPU tests


def test_graphs_are_captured_once_and_reused_across_calls():
    model = tiny_model("llama").to("cuda")
    ids = REPETITIVE.to("cuda")
    first = generate(model, ids, max_new_tokens=30, budget=8, eos_token_id=[])
    verifier = TreeVerifier._shared[model]
    captured = dict(verifier._graphs)
    assert captured and verifier.capture
    second = generate(model, ids, max_new_tokens=30, budget=8, eos_token_id=[])
    # the second call may pad a tree to a bucket the first never used, and capture it then
    assert TreeVerifier._shared[model] is verifier and captured.items() <= verifier._graphs.items()
    assert torch.equal(first.sequences, second.sequences)


def test_a_warmed_verifier_serves_generate_without_capturing_again():
    model = tiny_model("llama").to("cuda")
    ids = REPETITIVE.to("cuda")
    verifier = TreeVerifier.of(model, 512, 8).warm()
    captured = dict(verifier._graphs)
    assert len(captured) == 2 * len(verifier.buckets)
    out = generate(model, ids, max_new_tokens=30, budget=8, eos_token_id=[])
    assert TreeVerifier._shared[model] is verifier and verifier._graphs == captured
    assert torch.equal(out.sequences, vanilla(model, ids, 30))


def test_the_cost_prior_times_replayed_steps_beside_the_verifier_of_the_call(monkeypatch, tmp_path):
    """A bucket is measured when a call first reaches it: on a verifier of its own, with
    graphs, leaving the call's verifier and its cache alone."""
    from retrodraft.decode import budget

    monkeypatch.setenv("RETRODRAFT_CACHE", str(tmp_path))
    monkeypatch.setattr(budget, "ROUNDS", 2)
    monkeypatch.setattr(budget, "RETRIES", 0)
    model = tiny_model("llama").to("cuda")
    ids = REPETITIVE.to("cuda")
    used = []
    real = TreeVerifier.verify
    monkeypatch.setattr(TreeVerifier, "verify", lambda self, *a, **k: used.append(self) or real(self, *a, **k))
    out = generate(model, ids, max_new_tokens=30, eos_token_id=[])  # measures its bucket's curve first
    timing, call = used[0], TreeVerifier._shared[model]
    timed = 3 * len(budget.SIZES)  # a warm-up round and 2
    assert timing is not call and timing.capture and {r for r, _ in timing._graphs} == {n + 1 for n in budget.SIZES}
    assert used[:timed] == [timing] * timed and used[timed:] == [call] * (len(used) - timed)
    assert torch.equal(out.sequences, vanilla(model, ids, 30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_memory_efficient_kernel_takes_the_verifier_layout(dtype):
    model = tiny_model("llama").to("cuda", dtype)  # head_dim 8: the kernel needs a multiple of 8
    assert fused_kernels(model, context=100, nodes=16)["efficient"]


def test_sampling_on_cuda_repeats_with_a_seed():
    model = tiny_model("llama").to("cuda")
    ids = REPETITIVE.to("cuda")
    outs = [generate(model, ids, max_new_tokens=30, drafters=[], do_sample=True, seed=3, eos_token_id=[]).sequences
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.model
def test_real_model_float32_on_cuda_equals_model_generate():
    from retrodraft.decode import load_model

    model, tok = load_model(device="cuda", dtype=torch.float32)
    for text in PROMPTS:
        ids = chat_ids(tok, text).to("cuda")
        ref = model.generate(ids, max_new_tokens=64, do_sample=False)
        assert torch.equal(generate(model, ids, max_new_tokens=64).sequences, ref), text


@pytest.mark.model
def test_real_model_bfloat16_on_cuda_runs_and_is_mostly_exact():
    """bf16: a forward over n rows may round differently from one over 1 row, so a near-tie
    can flip (as for transformers' own prompt lookup); most outputs still agree."""
    from retrodraft.decode import load_model

    model, tok = load_model(device="cuda", dtype=torch.bfloat16)
    same = 0
    for text in PROMPTS:
        ids = chat_ids(tok, text).to("cuda")
        ref = model.generate(ids, max_new_tokens=64, do_sample=False)
        out = generate(model, ids, max_new_tokens=64).sequences
        assert out.shape[1] > ids.shape[1]
        same += torch.equal(out, ref)
    assert same >= len(PROMPTS) - 2
