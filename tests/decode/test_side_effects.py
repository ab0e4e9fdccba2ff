"""What a call changes outside itself: the model's patches are undone, logging is opt-in."""

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPETITIVE, ROOT, tiny_model
from retrodraft.decode import generate


def patched_layers(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


class Failing:
    """A drafter that fails on its third proposal."""

    name, needs_topk = "failing", False

    def __init__(self):
        self.calls = 0

    def propose(self, context, budget):
        from retrodraft.retrieval import DraftTree

        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("drafter broke")
        return DraftTree.empty()

    def observe(self, context, accepted, topk):
        pass


def test_patches_of_the_model_are_undone_after_a_call_and_after_a_failure():
    model = tiny_model("llama")
    attn = model.config._attn_implementation
    generate(model, REPETITIVE, max_new_tokens=6, budget=4)
    assert model.config._attn_implementation == attn and patched_layers(model) == []
    with pytest.raises(RuntimeError, match="drafter broke"):
        generate(model, REPETITIVE, max_new_tokens=6, drafters=[Failing()], budget=4)
    assert model.config._attn_implementation == attn and patched_layers(model) == []
    # and the model still generates as transformers does
    ref = model.generate(REPETITIVE, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, REPETITIVE, max_new_tokens=6, drafters=[]).sequences, ref)


def run_with_log(level: str) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import logging, retrodraft; "
            "logging.getLogger('retrodraft.decode.budget').info('hello from retrodraft')")
    env = {**os.environ, "RETRODRAFT_LOG": level}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_retrodraft_log_sets_the_package_log_level():
    assert "hello from retrodraft" in run_with_log("info").stderr
    assert "hello from retrodraft" not in run_with_log("warning").stderr
    bad = run_with_log("loud")
    assert bad.returncode != 0 and "RETRODRAFT_LOG='loud' is not a logging level" in bad.stderr


def test_library_code_logs_instead_of_printing():
    for folder in ("index", "retrieval", "decode"):
        for path in (ROOT / folder).glob("*.py"):
            assert not re.search(r"(?<![\w.])print\(", path.read_text()), f"{path} prints: use logging.getLogger(__name__)"
