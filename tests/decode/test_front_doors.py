"""The two front doors on tiny models: ``decode.generate``'s transformers-shaped arguments and
``model.generate(..., custom_generate=speculative)`` with processors, stopping criteria,
streamer, output dicts and sampling; and the clear errors for what neither honours."""

import numpy as np
import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from conftest import PROMPT, REPETITIVE, VOCAB, FixedDrafter, chi_square_p, tiny_model, tree_of, vanilla
from retrodraft import speculative
from retrodraft.decode import generate
from retrodraft.retrieval import PromptLookupDrafter
from retrodraft.retrieval.calibration import Calibrator


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


class StopAt(StoppingCriteria):
    """Stops once the last token is ``token``."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class Recorder:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.view(-1).tolist())

    def end(self):
        self.ended = True


# --- decode.generate -------------------------------------------------------------------------


def test_tokenizer_style_inputs_with_an_all_ones_attention_mask(llama):
    out = generate(llama, input_ids=REPETITIVE, attention_mask=torch.ones_like(REPETITIVE), max_new_tokens=12,
                   eos_token_id=[])
    assert torch.equal(out.sequences, vanilla(llama, REPETITIVE, 12))


def test_padding_in_the_attention_mask_is_refused(llama):
    mask = torch.ones_like(REPETITIVE)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask has zeros"):
        generate(llama, REPETITIVE, mask, max_new_tokens=4)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        generate(llama, REPETITIVE, torch.ones(1, 3), max_new_tokens=4)


def test_generation_config_gives_defaults_and_explicit_arguments_win(llama):
    gc = GenerationConfig(max_new_tokens=9, do_sample=False, eos_token_id=[])
    assert generate(llama, REPETITIVE, generation_config=gc).sequences.shape[1] == REPETITIVE.shape[1] + 9
    out = generate(llama, REPETITIVE, generation_config=gc, max_new_tokens=5)
    assert torch.equal(out.sequences, vanilla(llama, REPETITIVE, 5))
    # the model's own generation_config is the fallback, as in model.generate
    llama.generation_config.max_new_tokens = 7
    try:
        assert generate(llama, REPETITIVE, eos_token_id=[]).sequences.shape[1] == REPETITIVE.shape[1] + 7
    finally:
        llama.generation_config.max_new_tokens = None


def test_generation_config_eos_stops_the_call(llama):
    ref = vanilla(llama, REPETITIVE, 30)[0, REPETITIVE.shape[1]:].tolist()
    eos = ref[6]
    out = generate(llama, REPETITIVE, generation_config=GenerationConfig(max_new_tokens=30, eos_token_id=eos))
    assert out.sequences[0, REPETITIVE.shape[1]:].tolist() == ref[: ref.index(eos) + 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(generation_config=GenerationConfig(max_new_tokens=4, repetition_penalty=1.2)), "repetition_penalty=1.2"),
    (dict(generation_config=GenerationConfig(max_new_tokens=4, num_beams=3)), "num_beams=3"),
    (dict(), "pass max_new_tokens="),
    (dict(max_new_tokens=4, calibrator=Calibrator()), "calibrator= applies to explicit drafters"),
    (dict(max_new_tokens=4, drafters=[PromptLookupDrafter()], references=[[1, 2, 3]]), "add retrieval.drafters"),
    (dict(max_new_tokens=4, tokenizer=object()), "tokenizer= tokenizes text references= and checks a datastore="),
    (dict(max_new_tokens=4, seed=3), "seed= fixes sampling"),
    (dict(max_new_tokens=4, do_sample=True, top_p=1.5), "top_p must be in"),
])
def test_arguments_that_would_be_ignored_raise(llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(llama, REPETITIVE, **kwargs)


# --- model.generate(custom_generate=speculative) ---------------------------------------------


@pytest.mark.parametrize("settings", [
    dict(),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
    dict(logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])),
])
def test_greedy_through_model_generate_equals_model_generate(llama, settings):
    common = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, **settings)
    ref = llama.generate(REPETITIVE, **common)
    for budget in (None, 8):
        out = llama.generate(REPETITIVE, custom_generate=speculative, budget=budget, **common)
        assert torch.equal(out, ref)


def test_stopping_criteria_streamer_and_the_output_dict(llama):
    full = vanilla(llama, REPETITIVE, 40)[0, REPETITIVE.shape[1]:].tolist()
    stop = StoppingCriteriaList([StopAt(full[12])])
    args = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, stopping_criteria=stop,
                return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref = llama.generate(REPETITIVE, **args)
    rec = Recorder()
    out = llama.generate(REPETITIVE, custom_generate=speculative, streamer=rec, **args)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.sequences.shape[1] == REPETITIVE.shape[1] + full.index(full[12]) + 1  # stopped by the criterion
    assert len(out.scores) == len(ref.scores) and len(out.logits) == len(ref.logits)
    for a, b in zip(out.scores + out.logits, ref.scores + ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert out.stats.new_tokens == len(out.scores) and out.stats.steps < out.stats.new_tokens
    assert rec.chunks[0] == REPETITIVE[0].tolist() and rec.ended  # the prompt once, by transformers
    assert sum(rec.chunks[1:], []) == out.sequences[0, REPETITIVE.shape[1]:].tolist()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2), "beam"),
    (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
    (dict(return_dict_in_generate=True, output_attentions=True), "output_attentions"),
    (dict(references=["text"]), "pass references as token ids"),
    (dict(attention_mask=torch.tensor([[0] + [1] * (REPETITIVE.shape[1] - 1)])), "attention_mask has zeros"),
])
def test_what_speculative_cannot_honour_raises(llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama.generate(REPETITIVE, max_new_tokens=5, pad_token_id=0, custom_generate=speculative, **kwargs)


def test_a_stateful_logits_processor_is_refused(llama):
    cfg = UnbatchedClassifierFreeGuidanceLogitsProcessor(1.5, llama)
    with pytest.raises(ValueError, match="UnbatchedClassifierFreeGuidanceLogitsProcessor"):
        llama.generate(REPETITIVE, max_new_tokens=5, pad_token_id=0, custom_generate=speculative,
                       logits_processor=LogitsProcessorList([cfg]))


RUNS = 1000


def test_sampling_through_model_generate_keeps_the_distribution_of_its_generation_config():
    """do_sample with temperature, top-k and a repetition penalty from a GenerationConfig: the
    second token's law depends on the first through the penalty, so each tree row must be
    processed with its own prefix."""
    model = tiny_model("llama", vocab=VOCAB, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    gc = GenerationConfig(do_sample=True, temperature=0.8, top_k=4, repetition_penalty=1.8, max_new_tokens=3,
                          pad_token_id=0)
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8), TemperatureLogitsWarper(0.8),
                                 TopKLogitsWarper(4)])

    def probs(ids):
        with torch.no_grad():
            return chain(ids, model(ids).logits[:, -1]).softmax(-1)[0].double().numpy()

    p1 = probs(PROMPT)
    joint = np.stack([p1[a] * probs(torch.cat([PROMPT, torch.tensor([[a]])], 1)) for a in range(VOCAB)])
    order = np.argsort(-p1)
    drafter = FixedDrafter(tree_of([int(order[0]), int(order[1])], np.argsort(-joint[order[0]])[:2].tolist()))
    torch.manual_seed(0)
    counts = np.zeros((VOCAB, VOCAB))
    accepted = 0
    for _ in range(RUNS):
        out = model.generate(PROMPT, generation_config=gc, custom_generate=speculative, drafters=[drafter], budget=4,
                             return_dict_in_generate=True)
        x1, x2 = out.sequences[0, PROMPT.shape[1]:][:2].tolist()
        counts[x1, x2] += 1
        accepted += out.stats.new_tokens - out.stats.steps
    assert chi_square_p(counts, joint) > 0.01
    assert accepted > RUNS * 0.3  # the drafts really were used
