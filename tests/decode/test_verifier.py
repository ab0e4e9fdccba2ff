"""The device-agnostic verifier on a CPU: static shapes with padded trees, acceptance on the
device, the mask's layout, step timing. The CUDA runs of the same code are tests/test_gpu.py."""

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from hypothesis import given, settings, strategies as st

from conftest import tiny_model
from test_generate_tiny import REPETITIVE, FixedDrafter, vanilla
from retrodraft.decode import generate
from retrodraft.decode.acceptance import accept_greedy, accept_greedy_on_device, first_of_siblings
from retrodraft.decode.tree_attention import (ancestor_matrix, new_cache, prompt_rows, run_prompt, tree_inputs,
                                              verification_kernels)
from retrodraft.decode.verifier import ALIGN, TreeVerifier
from retrodraft.retrieval.tree import DraftTree

BUSHY = DraftTree.build(np.arange(40) % 64, np.array([-1 if i < 8 else i - 8 for i in range(40)]),
                        np.linspace(1, 0.1, 40))


@pytest.mark.parametrize("budget", [None, 5])
def test_padded_static_shapes_equal_model_generate(tiny, budget):
    """cuda_graphs=True on a CPU: trees padded to the size buckets with masked dummy nodes,
    attention over the whole cache. Budget 5 pads every tree to 6 nodes."""
    out = generate(tiny, REPETITIVE, max_new_tokens=40, budget=budget, eos_token_id=[], cuda_graphs=True)
    assert torch.equal(out.sequences, vanilla(tiny, REPETITIVE, 40))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_a_wrong_bushy_tree_changes_nothing(arch):
    model = tiny_model(arch)
    for graphs in (False, True):
        out = generate(model, REPETITIVE, max_new_tokens=30, drafters=[FixedDrafter(BUSHY)], budget=37,
                       eos_token_id=[], cuda_graphs=graphs)
        assert torch.equal(out.sequences, vanilla(model, REPETITIVE, 30))


@pytest.mark.parametrize("graphs", [False, True])
def test_a_bfloat16_target_verifies(graphs):
    """bf16 (the CUDA default) through both paths: a forward over n rows may round
    differently from one over 1 row, so only the shape of the answer is checked here
    (tools/gpu_check.py counts divergences on a GPU)."""
    model = tiny_model("llama").to(torch.bfloat16)
    out = generate(model, REPETITIVE, max_new_tokens=16, budget=8, eos_token_id=[], cuda_graphs=graphs)
    assert out.sequences.shape == (1, REPETITIVE.shape[1] + 16) and out.stats.steps <= 16


def test_a_one_token_prompt_with_static_shapes():
    model = tiny_model("qwen2")
    ids = torch.tensor([[3]])
    out = generate(model, ids, max_new_tokens=12, budget=4, eos_token_id=[], cuda_graphs=True)
    assert torch.equal(out.sequences, vanilla(model, ids, 12))


def test_static_and_dynamic_shapes_sample_the_same_with_the_same_seed():
    model = tiny_model("llama")
    drafter = FixedDrafter(DraftTree.build([1, 2, 3, 4, 5, 7], [-1, 0, 1, 2, 3, -1], [0.9, 0.8, 0.7, 0.6, 0.5, 0.3]))
    outs = [generate(model, REPETITIVE, max_new_tokens=20, drafters=[drafter], budget=6, do_sample=True, seed=7,
                     eos_token_id=[], cuda_graphs=graphs).sequences for graphs in (False, True)]
    assert torch.equal(outs[0], outs[1])


def test_on_a_cpu_cuda_graphs_capture_nothing_and_verifiers_are_not_shared():
    model = tiny_model("llama")
    a = TreeVerifier.of(model, 100, 8, cuda_graphs=True)
    assert a.static and not a.capture
    assert TreeVerifier.of(model, 100, 8, cuda_graphs=True) is not a
    assert not TreeVerifier.of(model, 100, 8).static  # the default on a CPU: dynamic shapes


def test_a_failed_capture_falls_back_to_verifying_without_graphs(monkeypatch, caplog):
    """A model whose forward waits on the host cannot be captured: the step runs uncaptured,
    says so once, and the output is still model.generate's."""
    model = tiny_model("llama")
    verifier = TreeVerifier(model, 100, 8, cuda_graphs=True)
    verifier.capture = True  # as on CUDA; the capture itself is made to fail as torch's would

    def refuse(*args):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(verifier, "_capture", refuse)
    monkeypatch.setattr(TreeVerifier, "of", classmethod(lambda cls, *a, **k: verifier))
    with caplog.at_level("WARNING", logger="retrodraft.decode.verifier"):
        out = generate(model, REPETITIVE, max_new_tokens=30, budget=8, eos_token_id=[], cuda_graphs=True)
    assert torch.equal(out.sequences, vanilla(model, REPETITIVE, 30))
    assert not verifier.capture and not verifier._graphs
    warned = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert len(warned) == 1 and "stream is capturing)" in warned[0]


def test_warm_captures_every_bucket_with_and_without_top_k_and_leaves_the_cache_empty(monkeypatch):
    """The capture itself needs CUDA (tests/decode/test_gpu.py); here it is recorded, and
    the recorded forwards replayed, to check what ``warm`` asks for and what it leaves."""
    model = tiny_model("llama")
    verifier = TreeVerifier(model, 100, 8, cuda_graphs=True)
    verifier.capture = True
    asked = []

    class Replay:
        def replay(self):
            pass

    def record(r, mask, want_topk):
        asked.append((r, want_topk))
        assert mask.shape[-2] == verifier.groups * r  # the mask view the steps will use
        return Replay(), verifier._forward(r, mask, True, want_topk)

    monkeypatch.setattr(verifier, "_capture", record)
    assert verifier.warm() is verifier
    assert sorted(asked) == sorted((b + 1, t) for b in (0, 1, 2, 3, 4, 6, 8) for t in (False, True))
    assert verifier.cache.get_seq_length() == 0
    verifier.warm()
    assert len(asked) == 14  # captured once


class HostReads(TorchDispatchMode):
    """Records every operation that reads a tensor's value on the host (a sync on CUDA, and
    an error inside a CUDA graph capture)."""
    READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("want_topk", [False, True])
def test_the_captured_forward_never_reads_a_value_on_the_host(arch, dtype, want_topk):
    """What a CUDA graph captures (``_forward``: forward, LM head, greedy acceptance) may not
    wait on the device. On CUDA such a read fails the capture; here each is recorded."""
    model = tiny_model(arch).to(dtype)
    verifier = TreeVerifier(model, 100, 8, cuda_graphs=True)
    tree = DraftTree.build(np.array([3, 4, 5, 6]), np.array([-1, 0, 1, 0]))
    with verification_kernels(model), torch.inference_mode():
        verifier.prefill(torch.randint(0, 50, (1, 30)))
        r = verifier.rows(len(tree))
        verifier._stage(tree, 1, 29, r)
        mask = verifier._write_mask(29, r)
        with HostReads() as reads:
            verifier._forward(r, mask, True, want_topk)
    assert reads.seen == []


def test_rows_are_padded_to_the_next_bucket():
    model = tiny_model("llama")
    static = TreeVerifier(model, 100, 64, cuda_graphs=True)
    assert [static.rows(n) for n in (0, 1, 5, 7, 13, 49, 64)] == [1, 2, 7, 9, 17, 65, 65]
    assert TreeVerifier(model, 100, 5, cuda_graphs=True).rows(5) == 6  # a fixed budget is its own bucket
    assert TreeVerifier(model, 100, 64).rows(5) == 6
    with pytest.raises(ValueError, match="exceeds this verifier's max_nodes"):
        TreeVerifier(model, 100, 4).verify(BUSHY, 1, 10, None, False)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_is_built_on_the_device_in_a_layout_sdpa_takes_without_a_copy(static, dtype):
    """The model's dtype, last dimension contiguous, row stride a multiple of 8 (else the
    memory-efficient kernel pads a copy per layer), tiled once per query group, and the same
    visibility as tree_inputs' mask."""
    model = tiny_model("llama").to(dtype)  # 4 query heads on 2 key/value heads: 2 groups
    verifier = TreeVerifier(model, 61, 8, cuda_graphs=static)
    tree = DraftTree.build([10, 11, 12, 13, 14], [-1, -1, 1, 2, 0])  # static: padded to 6 nodes
    past, n = 5, 5
    r = verifier.rows(n)
    verifier._stage(tree, 9, past, r)
    mask = verifier._write_mask(past, r)
    assert mask.dtype == model.dtype and mask.device == model.device
    assert mask.stride(-1) == 1 and all(s % ALIGN == 0 for s in mask.stride()[:-1])
    assert mask.shape == (1, 1, 2 * r, 61 if static else past + r)
    _, _, reference = tree_inputs(9, tree, past, model.device, model.dtype)  # [1, 1, n + 1, past + n + 1]
    for g in range(2):
        rows = mask[0, 0, g * r : g * r + n + 1, : past + n + 1]
        assert torch.equal(rows == 0, reference[0, 0] == 0)
    if static:
        assert r == n + 2 and torch.all(mask[0, 0, :, past + r :] < 0)
        assert (mask[0, 0, n + 1, past:] == 0).nonzero().view(-1).tolist() == [n + 1]  # padding sees itself
        assert torch.all(mask[0, 0, : n + 1, past + n + 1] < 0)  # and nothing sees padding


def test_the_mask_buffer_is_clean_after_each_step():
    model = tiny_model("llama")
    with torch.inference_mode(), verification_kernels(model):
        verifier = TreeVerifier(model, 64, 8)
        verifier.prefill(REPETITIVE)
        tree = DraftTree.build([10, 11, 12], [-1, 0, -1])
        verifier.verify(tree, int(REPETITIVE[0, -1]), REPETITIVE.shape[1] - 1, None, False)
    assert not verifier._mask.any()


def test_a_step_without_drafts_on_a_cpu_runs_the_attention_kernel(monkeypatch):
    """The kernel serves masked attention only: a 0-node step gets a mask of zeros (left
    unmasked it went to SDPA, 10% slower at 1024 cached tokens), and the output stays
    model.generate's."""
    import transformers as tf
    from retrodraft.decode import cpu_attention

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2)).eval()  # 64-dimensional heads
    calls = []
    real = cpu_attention.attend
    monkeypatch.setattr(cpu_attention, "attend", lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
    out = generate(model, REPETITIVE, max_new_tokens=12, drafters=[], eos_token_id=[])
    assert calls[-2 * 11:] == [2] * 2 * 11  # the last 11 steps, both layers: one row packed with its group's other
    assert torch.equal(out.sequences, vanilla(model, REPETITIVE, 12))


@st.composite
def trees_and_argmax(draw):
    """A tree over 4 tokens (siblings may repeat a token) and an argmax per row."""
    parents, tokens = [], []
    for _ in range(draw(st.integers(0, 24))):
        parents.append(draw(st.integers(-1, len(parents) - 1)))
        tokens.append(draw(st.integers(0, 3)))
    argmax = draw(st.lists(st.integers(0, 3), min_size=len(tokens) + 1, max_size=len(tokens) + 1))
    return DraftTree.build(tokens, parents), argmax


@settings(max_examples=300, deadline=None)
@given(trees_and_argmax(), st.integers(0, 3))
def test_acceptance_on_the_device_equals_accept_greedy(case, padding):
    tree, argmax = case
    n, r = len(tree), len(tree) + 1 + padding
    anc = np.eye(r, dtype=bool)
    anc[: n + 1, : n + 1] = ancestor_matrix(tree.parents)
    rows = argmax + [0] * padding  # padding rows' argmax is arbitrary
    tokens = np.where(first_of_siblings(tree), tree.tokens, -1).tolist() + [-1] * padding
    best, order = accept_greedy_on_device(
        torch.tensor(rows), torch.tensor(tokens, dtype=torch.int64),
        torch.tensor((tree.parents + 1).tolist() + [0] * padding, dtype=torch.int64), torch.from_numpy(anc))
    path, bonus = accept_greedy(tree, np.array(argmax).__getitem__)
    assert int(best) - 1 == (path[-1] if path else -1)
    assert rows[int(best)] == bonus
    assert order[: len(path) + 1].tolist() == [0] + [i + 1 for i in path]
    assert sorted(order.tolist()) == list(range(r))


def test_repeated_siblings_are_not_accepted_twice():
    tree = DraftTree.build([5, 5, 6, 5], [-1, -1, 1, 0])  # node 1 repeats node 0's token
    assert first_of_siblings(tree).tolist() == [True, False, True, True]


def test_steps_are_timed_with_the_host_share():
    model = tiny_model("llama")
    stats = generate(model, REPETITIVE, max_new_tokens=20, eos_token_id=[]).stats
    assert stats.step_seconds > 0 and 0 <= stats.wait_seconds <= stats.step_seconds
    assert stats.draft_seconds + stats.verify_seconds <= stats.step_seconds
    assert stats.host_seconds == pytest.approx(stats.step_seconds - stats.wait_seconds)
    assert "host busy" in stats.summary()


def test_top_k_rows_are_the_targets_top_k_after_each_row():
    """What the recycling drafter learns from: each verified row's input token, then the
    target's top-k after the row's path (here checked against plain forwards of each path)."""
    model = tiny_model("llama")
    tree = DraftTree.build([10, 11, 12], [-1, 0, -1])
    root, past = int(REPETITIVE[0, -1]), REPETITIVE.shape[1] - 1
    with torch.inference_mode():
        with verification_kernels(model):
            verifier = TreeVerifier(model, 64, 8, topk=8)
            verifier.prefill(REPETITIVE)
            _, _, rows, _ = verifier.verify(tree, root, past, None, True)
        assert rows[:, 0].tolist() == [root, 10, 11, 12]
        for row, path in enumerate([[], [10], [10, 11], [12]]):
            ids = torch.cat([REPETITIVE, torch.tensor([path], dtype=REPETITIVE.dtype)], dim=1)
            logits = model(ids).logits[0, -1]
            assert rows[row, 1:].tolist() == logits.topk(8).indices.tolist()


def test_a_top_k_larger_than_the_vocabulary_is_torchs_clear_error():
    from retrodraft.decode.verifier import top_k

    logits = torch.randn(3, 5)
    assert top_k(logits, 5).tolist() == logits.topk(5).indices.tolist()
    with pytest.raises(RuntimeError, match="out of range"):
        top_k(logits, 8)  # never read past a row's end


@contextlib.contextmanager
def forward_rows(model):
    """Within the block, the rows of every base-model forward of ``model``, in a list."""
    rows: list[int] = []
    hook = model.base_model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[1]),
                                                      with_kwargs=True)
    try:
        yield rows
    finally:
        hook.remove()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_a_long_prompt_goes_in_by_chunks_and_the_output_is_model_generates(arch):
    """A prompt longer than ``prompt_rows`` is prefilled in forwards of that many rows (the
    rows decode.skinny's kernel takes), the last one shorter, and the greedy output is
    still model.generate's. (A fixed budget: with the automatic one, the cost curve of a
    model this small may find BLAS faster than the kernel, and then the prompt goes in whole.)"""
    model = tiny_model(arch)
    ids = torch.randint(0, 64, (1, 200), generator=torch.Generator().manual_seed(1))
    with verification_kernels(model) as settings:
        rows = prompt_rows(model, settings)
    assert rows == 128  # min(MAX_ROWS, MAX_QUERY_ROWS // query heads per key/value head)
    with forward_rows(model) as seen:
        out = generate(model, ids, max_new_tokens=20, budget=6, eos_token_id=[])
    assert seen[:2] == [128, 199 - 128]  # the prompt but its last token (the first step's root)
    assert torch.equal(out.sequences, vanilla(model, ids, 20))


def test_run_prompt_in_chunks_fills_the_cache_as_one_forward_does():
    model = tiny_model("llama")
    ids = torch.randint(0, 64, (1, 150), generator=torch.Generator().manual_seed(2))
    caches, last = [], []
    with torch.inference_mode(), verification_kernels(model) as settings:
        for use in (settings, None):  # None: no kernels to route, one forward
            cache = new_cache(model, 160)
            with forward_rows(model) as seen:
                last.append(run_prompt(model, ids, cache, use))
            assert seen == ([128, 22] if use is not None else [150])
            caches.append(cache)
        settings.kernel_rows[128] = False  # BLAS measured faster at that many rows: one forward
        assert prompt_rows(model, settings) is None
    torch.testing.assert_close(last[0], last[1], rtol=1e-5, atol=1e-5)
    assert last[0].shape == (1, model.config.hidden_size)
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
