"""The ``model.generate`` front door: ``custom_generate=speculative``.

    from retrodraft import speculative
    out = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=128,
                         custom_generate=speculative, datastore=ds, references=[doc], tokenizer=tok)

transformers (5.24) prepares everything as for its own loop, then calls ``speculative``
instead of its sampling loop: the generation_config resolved from the model's and the
call's, the logits processors and stopping criteria built from it and from the
``logits_processor=``/``stopping_criteria=`` arguments, the streamer (already given the
prompt). ``speculative`` runs our propose -> verify -> accept -> observe loop under those:
every verified row's logits go through the processors with that row's own prefix before
the greedy or sampled choice, and the stopping criteria are checked after every new token,
so the output is what transformers' loop would give (greedy: token for token; sampling:
the same distribution). What it cannot honour exactly raises ValueError naming it.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerateDecoderOnlyOutput

from retrodraft.decode.budget import CostModel
from retrodraft.decode.generation import Decoding, GenerationStats, decode_loop, speculator
from retrodraft.decode.options import check_prompt
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT, SpeculationConfig
from retrodraft.retrieval.drafters import Drafter
from retrodraft.retrieval.speculator import Span

# Processors that keep state across calls, run a model themselves or serve other model
# families: applied per verified row they would not reproduce transformers' loop.
STATEFUL_PROCESSORS = {
    "UnbatchedClassifierFreeGuidanceLogitsProcessor", "ClassifierFreeGuidanceLogitsProcessor",
    "WhisperTimeStampLogitsProcessor", "WhisperNoSpeechDetection", "AlternatingCodebooksLogitsProcessor",
    "BarkEosPrioritizerLogitsProcessor", "SynthIDTextWatermarkLogitsProcessor",
    "DiaClassifierFreeGuidanceLogitsProcessor", "DiaEOSChannelFilterLogitsProcessor",
    "DiaEOSDelayPatternLogitsProcessor",
}
# Prepared model inputs that carry nothing for a batch-1 decoder-only prompt without padding.
PASSIVE_INPUTS = {"position_ids", "logits_to_keep", "use_cache", "cache"}


class SpeculativeOutput(GenerateDecoderOnlyOutput):
    """transformers' ``GenerateDecoderOnlyOutput`` (sequences, scores, logits; no attentions,
    hidden states or cache) with our ``stats`` (GenerationStats) and ``spans`` (copied spans)
    as attributes."""

    stats: GenerationStats
    spans: list[Span]


def speculative(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer=None,
    *,
    drafters: Sequence[Drafter] | None = None,
    calibrator: Calibrator | None = None,
    datastore=None,
    references: Sequence[str | Sequence[int]] | None = None,
    budget: int | None = None,
    speculation_config: SpeculationConfig = DEFAULT,
    **model_kwargs,
):
    """Our speculative loop as a transformers ``custom_generate`` callable; pass it as
    ``model.generate(..., custom_generate=speculative)`` rather than calling it.

    drafters, calibrator, datastore, references, budget: as ``decode.generate``'s
    (``tokenizer=`` reaches transformers, which drops it for callables: pass token-id
    references or ``drafters=``); ``speculation_config``: its ``config=``.
    Returns the sequences LongTensor [1, prompt + new], or with
    ``return_dict_in_generate=True`` a ``SpeculativeOutput`` (``GenerateDecoderOnlyOutput``
    plus ``stats`` and ``spans``), with ``scores``/``logits`` if asked for.
    Raises ValueError for a setting it cannot honour exactly: beams or several return
    sequences, padding, attentions or hidden states in the output, a stateful logits
    processor, another generation mode (assisted, contrastive, DoLa), synced GPUs.
    Not thread-safe (see ``decode.tree_attention.verification_kernels``).
    """
    streamer = streamer if streamer is not None else _callers_streamer()
    _refuse_unhonoured(generation_config, logits_processor, synced_gpus, model_kwargs)
    if references is not None and any(isinstance(r, str) for r in references):
        raise ValueError("transformers does not hand tokenizer= on to a custom_generate callable: pass references "
                         "as token ids, e.g. tokenizer(text, add_special_tokens=False).input_ids")
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    check_prompt(model, input_ids, None, max_new_tokens)
    with torch.inference_mode():
        spec = speculator(model, drafters=drafters, calibrator=calibrator, datastore=datastore,
                          references=references, budget=budget, config=speculation_config)
        d = Decoding(max_new_tokens, processors=logits_processor or None, streamer=streamer, put_prompt=False,
                     costs=CostModel.of(model) if budget is None else None,
                     keep_scores=bool(generation_config.return_dict_in_generate and generation_config.output_scores),
                     keep_logits=bool(generation_config.return_dict_in_generate and generation_config.output_logits))
        # The processors warp (temperature, top-k, top-p are among them when sampling), so the
        # sampler draws from their output as is.
        d.sampling = dict(temperature=1.0, top_k=None, top_p=None, generator=None) if generation_config.do_sample else None
        d.stop = _criteria_stop(stopping_criteria, d)
        out = decode_loop(model, input_ids, spec, d)
    if datastore is not None:
        datastore.commit(out.sequences[0, input_ids.shape[1]:].numpy().astype(np.int32))
    if not generation_config.return_dict_in_generate:
        return out.sequences
    result = SpeculativeOutput(sequences=out.sequences, scores=tuple(d.scores) if d.keep_scores else None,
                               logits=tuple(d.logits) if d.keep_logits else None)
    result.stats, result.spans = out.stats, out.spans
    return result


def _callers_streamer():
    """The streamer handed to ``model.generate``: transformers 5.24 puts the prompt into it
    but does not pass it on to a ``custom_generate`` callable, so it is read from the
    calling ``generate`` frame (None when called some other way)."""
    frame = sys._getframe(2)  # 0: here, 1: speculative, 2: GenerationMixin.generate
    if frame.f_code.co_name == "generate" and "streamer" in frame.f_locals:
        return frame.f_locals["streamer"]
    return None


def _refuse_unhonoured(config: GenerationConfig, processors, synced_gpus: bool, model_kwargs: dict) -> None:
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"custom_generate=speculative runs greedy search or sampling, but this generation_config "
                         f"asks for {mode.value} (num_beams, assistant, penalty_alpha, dola_layers, ...)")
    for name in ("num_return_sequences", "output_attentions", "output_hidden_states"):
        if getattr(config, name, None) not in (None, 1, False):
            raise ValueError(f"custom_generate=speculative does not support {name}={getattr(config, name)!r}")
    if synced_gpus:
        raise ValueError("custom_generate=speculative does not support synced_gpus=True")
    stateful = [type(p).__name__ for p in processors or () if type(p).__name__ in STATEFUL_PROCESSORS]
    if stateful:
        raise ValueError(f"logits processor {', '.join(stateful)} keeps state or runs a model itself: applied to "
                         "each verified row it would not reproduce transformers' loop")
    if model_kwargs.get("attention_mask") is not None:  # transformers drops an all-ones mask
        raise ValueError("attention_mask has zeros (padding): at batch size 1 pass the prompt without padding")
    cache = model_kwargs.get("cache")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("custom_generate=speculative starts from the prompt: a filled cache= cannot be continued")
    other = sorted(k for k, v in model_kwargs.items() if v is not None and k not in PASSIVE_INPUTS | {"attention_mask"})
    if other:
        raise ValueError(f"custom_generate=speculative does not take {', '.join(other)}")


def _criteria_stop(criteria: StoppingCriteriaList, d: Decoding):
    """The stop rule from transformers' stopping criteria (max length, EOS, stop strings,
    the caller's), checked after each new token as transformers' loop does."""
    def stop(context: np.ndarray, new: int) -> tuple[int, bool]:
        start = context.shape[0] - new
        ids = torch.from_numpy(context.astype(np.int64)).view(1, -1)
        for i in range(new):
            scores = tuple(d.scores[: len(d.scores) - new + i + 1]) if d.keep_scores else None
            if bool(criteria(ids[:, : start + i + 1], scores).any()):
                return i + 1, True
        return new, False
    return stop
