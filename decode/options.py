"""What a call asks for: the prompt checked, and generation settings resolved as transformers
resolves them (explicit argument > ``generation_config`` > ``model.generation_config``),
with anything we would not honour refused by name instead of ignored."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

# generation_config fields ``decode.generate`` applies itself.
HONOURED = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
            "pad_token_id")
# Fields that change nothing in a batch-1 greedy or sampled decode with our own cache, and
# fields at the value that means "off".
HARMLESS = {"bos_token_id", "use_cache", "cache_implementation", "transformers_version", "_from_model_config",
            "compile_config", "disable_compile", "low_memory", "prefill_chunk_size", "is_assistant"}
NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "output_attentions": False,
           "output_hidden_states": False, "output_scores": False, "output_logits": False,
           "return_dict_in_generate": False, "renormalize_logits": False, "remove_invalid_values": False,
           "token_healing": False, "length_penalty": 1.0, "early_stopping": False, "min_length": 0,
           "min_new_tokens": 0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
           "encoder_repetition_penalty": 1.0, "guidance_scale": 1.0, "diversity_penalty": 0.0,
           "num_beam_groups": 1, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": 0.0}


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one ``decode.generate`` call."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    eos: frozenset[int]


def check_prompt(model, input_ids, attention_mask, max_new_tokens: int) -> None:
    """ValueError unless ``input_ids`` is one unpadded prompt that fits the model with
    ``max_new_tokens`` more tokens."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        shape = list(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor [1, prompt_length], got {shape}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"batch size {input_ids.shape[0]} is not supported yet: pass one sequence, [1, prompt_length]")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary), got values in "
                         f"[{low}, {high}]")
    if attention_mask is not None:
        if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
            got = list(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got {got}")
        if not bool((attention_mask == 1).all()):
            raise ValueError("attention_mask has zeros (padding): at batch size 1 pass the prompt without padding "
                             "(all ones, or no attention_mask)")
    total = input_ids.shape[1] + max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and total > limit:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens"
        )
    window = getattr(model.config, "sliding_window", None)
    if window is not None and total > window:
        raise ValueError(
            f"prompt + max_new_tokens ({total}) exceeds the model's sliding attention window of {window} tokens: "
            "tree verification past the window is not supported yet"
        )


def eos_ids(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    """The stop tokens as a set (None or [] for none)."""
    if eos_token_id is None:
        return frozenset()
    if torch.is_tensor(eos_token_id):
        eos_token_id = eos_token_id.view(-1).tolist()
    return frozenset(int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id]))


def refuse_unhonoured(config, hint: str) -> None:
    """ValueError naming every field of the transformers GenerationConfig ``config`` that is set
    to something other than "off" and is neither honoured nor harmless."""
    unhonoured = {k: v for k, v in config.to_dict().items()
                  if v is not None and k not in HONOURED and k not in HARMLESS and NEUTRAL.get(k, object()) != v}
    if unhonoured:
        names = ", ".join(f"{k}={v!r}" for k, v in sorted(unhonoured.items()))
        raise ValueError(f"generation_config sets {names}, which decode.generate does not apply; {hint}")


def resolve(model, input_ids: torch.Tensor, generation_config, explicit: dict) -> Settings:
    """Settings from ``explicit`` arguments (None: not given), else ``generation_config``,
    else ``model.generation_config``; transformers' defaults (greedy, temperature 1) below."""
    config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if config is not None:
        refuse_unhonoured(config, "use model.generate(..., custom_generate=retrodraft.speculative), which applies "
                                  "transformers' logits processors to every verified row")

    def pick(name, default=None):
        if explicit.get(name) is not None:
            return explicit[name]
        value = getattr(config, name, None) if config is not None else None
        return default if value is None else value

    max_new = explicit.get("max_new_tokens")
    if max_new is None and config is not None:
        max_new = config.max_new_tokens
        if max_new is None and config.max_length is not None:
            max_new = config.max_length - input_ids.shape[1]
    if max_new is None:
        raise ValueError("pass max_new_tokens= (or set max_new_tokens in generation_config)")
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new!r}")
    s = Settings(max_new_tokens=max_new, do_sample=bool(pick("do_sample", False)),
                 temperature=float(pick("temperature", 1.0)), top_k=pick("top_k") or None, top_p=pick("top_p"),
                 eos=eos_ids(pick("eos_token_id")))
    if s.do_sample and not (math.isfinite(s.temperature) and s.temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite when sampling, got {s.temperature}")
    if s.top_k is not None and (not isinstance(s.top_k, int) or s.top_k < 1):
        raise ValueError(f"top_k must be a positive int (0 or None: off), got {s.top_k!r}")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {s.top_p!r}")
    return s
