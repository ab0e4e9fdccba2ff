"""The test run fails on deprecations reached through our code (see conftest)."""

import warnings

import pytest
import torch

from conftest import ROOT, tiny_model


def run_as_our_code(source: str, **names):
    """Execute ``source`` with its frames attributed to a file of the package (decode/)."""
    exec(compile(source, str(ROOT / "decode" / "_deprecation_probe.py"), "exec"), names)


def test_a_deprecated_transformers_argument_passed_by_our_code_is_an_error():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(FutureWarning, match="past_key_values.*reached through retrodraft"):
        run_as_our_code("model.base_model(input_ids=ids, past_key_values=None)", model=model, ids=ids)
    # the current name passes
    run_as_our_code("model.base_model(input_ids=ids, cache=None)", model=model, ids=ids)


def test_deprecations_outside_our_code_are_only_recorded():
    with pytest.warns(DeprecationWarning, match="not ours"):
        warnings.warn("not ours", DeprecationWarning)
