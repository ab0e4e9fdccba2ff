"""The speculative generation loop: propose -> verify -> accept -> observe.

``generate`` is our own front door; ``decode.hf.speculative`` runs the same loop from
``model.generate(..., custom_generate=...)``. Both hand ``decode_loop`` a Speculator (the
model-free half: drafters, calibration, budget) and a ``Decoding`` (how tokens are chosen
and when to stop).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from retrodraft.decode.acceptance import accept_greedy, accept_sampling
from retrodraft.decode.budget import CostModel
from retrodraft.decode.options import check_prompt, resolve
from retrodraft.decode.tree_attention import compact_cache, new_cache, verification_kernels, tree_inputs
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT, SpeculationConfig
from retrodraft.retrieval.drafters import Drafter, PromptLookupDrafter, ReferenceDrafter, as_token_array
from retrodraft.retrieval.online import OnlineState
from retrodraft.retrieval.speculator import Span, Speculator
from retrodraft.retrieval.tree import DraftTree

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """What a call did. ``mean_accepted`` counts accepted draft tokens + 1 per step."""

    steps: int = 0
    new_tokens: int = 0
    accepted_per_drafter: dict[str, int] = field(default_factory=dict)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    predicted_step_seconds: list[float] = field(default_factory=list)  # cost model's forecast, per step
    measured_step_seconds: list[float] = field(default_factory=list)  # wall time, per step (automatic budget only)

    @property
    def mean_accepted(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def prediction_error(self) -> float:
        """Median over steps of |predicted - measured| / measured step time (nan if none)."""
        p, m = np.array(self.predicted_step_seconds), np.array(self.measured_step_seconds)
        return float(np.median(np.abs(p - m) / m)) if len(m) else float("nan")

    def summary(self) -> str:
        by = ", ".join(f"{k} {v}" for k, v in self.accepted_per_drafter.items()) or "none"
        return (
            f"{self.new_tokens} tokens in {self.steps} steps, {self.mean_accepted:.2f} tokens/step; "
            f"accepted drafts by source: {by}; drafting {self.draft_seconds:.3f}s, verifying {self.verify_seconds:.3f}s"
            + (f"; step time predicted {sum(self.predicted_step_seconds):.3f}s, measured "
               f"{sum(self.measured_step_seconds):.3f}s (median error {100 * self.prediction_error:.0f}%)"
               if self.measured_step_seconds else "")
        )


@dataclass
class GenerationOutput:
    """``sequences``: LongTensor [1, prompt + new], as ``model.generate`` returns.
    ``spans``: accepted copied spans with the document they came from."""

    sequences: torch.Tensor
    stats: GenerationStats
    spans: list[Span] = field(default_factory=list)


_process_state: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> OnlineState


def online_state(model, datastore=None) -> OnlineState:
    """What the default drafters of ``generate`` learn from (past outputs, the recycling
    matrix, the score calibration): the datastore's when one is given, else this process's
    for ``model``."""
    if datastore is not None:
        return datastore.online(model.config.vocab_size)
    if model not in _process_state:
        _process_state[model] = OnlineState(model.config.vocab_size)
    return _process_state[model]


def _default_drafters(model, references, tokenizer, datastore, config: SpeculationConfig) -> list[Drafter]:
    """Every drafter that applies; ``references`` are texts (tokenized by ``tokenizer``) or ids."""
    drafters: list[Drafter] = [PromptLookupDrafter(**dataclasses.asdict(config.prompt_lookup))]
    if references:
        docs, names = [], []
        for i, r in enumerate(references):
            if isinstance(r, str):
                if tokenizer is None:
                    raise ValueError("references given as text need tokenizer= to turn them into token ids")
                r = tokenizer(r, add_special_tokens=False)["input_ids"]
            docs.append(as_token_array(r, "a reference"))
            names.append(f"reference {i}")
        drafters.append(ReferenceDrafter(docs, names, **dataclasses.asdict(config.reference)))
    if datastore is not None:
        return drafters + datastore.drafters(model.config.vocab_size)
    return drafters + online_state(model).drafters()


def speculator(model, *, drafters: Sequence[Drafter] | None = None, calibrator: Calibrator | None = None,
               datastore=None, references=None, tokenizer=None, budget: int | None = None,
               config: SpeculationConfig = DEFAULT) -> Speculator:
    """The Speculator ``generate`` and ``speculative`` use (arguments as ``generate``'s).
    Raises ValueError for an argument that the combination given would leave unused."""
    if drafters is None:
        if calibrator is not None:
            raise ValueError("calibrator= applies to explicit drafters=; the default drafters learn with "
                             "online_state(model, datastore).calibrator")
        if tokenizer is not None and references is None:
            raise ValueError("tokenizer= only tokenizes text references=, and none were given")
        drafters = _default_drafters(model, references, tokenizer, datastore, config)
        calibrator = online_state(model, datastore).calibrator
    elif references is not None or tokenizer is not None:
        raise ValueError("references=/tokenizer= build the default drafters' ReferenceDrafter; with explicit "
                         "drafters=, add retrieval.drafters.ReferenceDrafter(token_ids) to them instead")
    costs = CostModel.of(model) if budget is None else None
    drafting = drafter_set(drafters)  # host time per step is learned per drafter set
    return Speculator(drafters, calibrator, budget=budget, config=config,
                      cost=(lambda length: costs.step_table(length, drafting)) if costs is not None else None)


def drafter_set(drafters: Sequence[Drafter]) -> str:
    """The name the cost model learns a drafter set's host time under."""
    return "+".join(d.name for d in drafters)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    generation_config=None,
    drafters: Sequence[Drafter] | None = None,
    calibrator: Calibrator | None = None,
    datastore=None,
    references: Sequence[str | Sequence[int]] | None = None,
    tokenizer=None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    budget: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    streamer=None,
    seed: int | None = None,
    config: SpeculationConfig = DEFAULT,
) -> GenerationOutput:
    """Generate like ``model.generate``, verifying retrieved drafts with tree attention.

    input_ids:  LongTensor [1, prompt_length] (batch size 1); ``attention_mask``, if given,
                must be all ones (no padding), so ``generate(model, **tokenizer(text,
                return_tensors="pt"), max_new_tokens=...)`` works.
    max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id:
                as in transformers; each not given comes from ``generation_config``, else
                ``model.generation_config`` (greedy, temperature 1 if neither sets it).
                A generation_config field we do not apply (e.g. repetition_penalty) raises
                ValueError; ``model.generate(custom_generate=retrodraft.speculative)``
                applies those. ``pad_token_id`` pads nothing at batch size 1.
    drafters:   None uses every drafter that applies: prompt lookup over the context, the
                ``references``, past outputs (suffix tree) and token recycling, kept per
                model in this process or, with a ``datastore``, in it, plus its corpus;
                [] turns speculation off.
    calibrator: maps explicit ``drafters``' raw scores to acceptance rates, learning as it
                goes (None: raw scores); the default drafters use ``online_state``'s.
    datastore:  a ``retrieval.Datastore``; opened writable, it keeps what this call learned.
    references: texts (tokenized with ``tokenizer``) or token-id sequences to copy from,
                for the default drafters.
    do_sample:  False is greedy, token for token equal to ``model.generate(do_sample=False)``;
                True samples from the target's distribution after ``temperature``, ``top_k``
                and ``top_p`` (None: not applied), exactly, whatever the drafts.
    seed:       fixes the random stream of sampling. The distribution is exact whatever the
                drafts, but which sample a seed gives depends on the drafts too, and the
                default drafters learn between calls: for a repeatable sample pass the
                same stateless ``drafters`` (or ``drafters=[]``). A seeded call does not
                teach the cost model its step times (they would change the next call's
                budgets, so its trees and its sample), and reports no predicted step times.
    budget:     draft tree nodes verified per step. None chooses each step's size from the
                drafts' scores and this hardware's cost of a step, c(n) + d(n) (see
                decode.budget: measured once per model and device, cached, then learned
                from every step's time, so the sizes follow the machine's load).
    config:     the speculation knobs (``retrieval.SpeculationConfig``).
    Stops after max_new_tokens tokens or at the first EOS. An argument the call would leave
    unused (calibrator= without drafters=, references= with them, seed= when greedy) raises
    ValueError. Not thread-safe: see ``verification_kernels``.
    """
    s = resolve(model, input_ids, generation_config, dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id))
    check_prompt(model, input_ids, attention_mask, s.max_new_tokens)
    if seed is not None and not s.do_sample:
        raise ValueError("seed= fixes sampling, and this call is greedy: pass do_sample=True or drop seed=")
    spec = speculator(model, drafters=drafters, calibrator=calibrator, datastore=datastore, references=references,
                      tokenizer=tokenizer, budget=budget, config=config)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sampling = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, generator=generator)
    decoding = Decoding(s.max_new_tokens, sampling if s.do_sample else None, stop=_stop_at(s.eos),
                        streamer=streamer, costs=CostModel.of(model) if budget is None and seed is None else None)
    out = decode_loop(model, input_ids, spec, decoding)
    if datastore is not None:
        datastore.commit(out.sequences[0, input_ids.shape[1]:].numpy().astype(np.int32))
    return out


@dataclass
class Decoding:
    """How one call chooses tokens and when it stops.

    sampling:   accept_sampling's warp settings (temperature, top_k, top_p, generator);
                None for greedy.
    processors: transformers logits processors, (input_ids [1, L], scores [1, vocab]) ->
                scores, applied to each verified row with that row's own prefix, before the
                choice (warping included: with processors, ``sampling`` must not warp).
    stop:       (context int32 [L], new) -> how many of the ``new`` last tokens to keep:
                fewer than ``new``, or all with ``done`` True, ends the call.
    streamer:   transformers streamer; ``put_prompt`` False when the caller already did.
    keep_scores, keep_logits: collect each new token's processed scores / raw logits [1, vocab].
    costs:      the automatic budget's CostModel, to learn each step's time (None: not taught).
    """

    max_new_tokens: int
    sampling: dict | None = None
    processors: Callable | None = None
    stop: Callable[[np.ndarray, int], tuple[int, bool]] | None = None
    streamer: object = None
    put_prompt: bool = True
    keep_scores: bool = False
    keep_logits: bool = False
    costs: CostModel | None = None
    scores: list = field(default_factory=list)
    logits: list = field(default_factory=list)


def _stop_at(eos: frozenset[int]) -> Callable[[np.ndarray, int], tuple[int, bool]]:
    """The stop rule of ``generate``: at the first of the new tokens in ``eos``."""
    def stop(context: np.ndarray, new: int) -> tuple[int, bool]:
        for i, t in enumerate(context[context.shape[0] - new:].tolist()):
            if t in eos:
                return i + 1, True
        return new, False
    return stop


def decode_loop(model, input_ids: torch.Tensor, spec: Speculator, d: Decoding) -> GenerationOutput:
    """The step loop: propose -> verify -> accept -> observe, until ``d.max_new_tokens``
    tokens or ``d.stop`` says so. Runs within ``verification_kernels(model)``."""
    stats = GenerationStats()
    prompt_len = input_ids.shape[1]
    end = prompt_len + d.max_new_tokens
    tokens = np.empty(end, np.int32)  # the context, grown in place
    tokens[:prompt_len] = input_ids[0].cpu().numpy()
    if d.streamer is not None and d.put_prompt:
        d.streamer.put(input_ids.cpu())
    cache = new_cache(model, end + spec.max_nodes + 1)
    with verification_kernels(model):
        # Prefill all prompt tokens but the last; the last is the root of the first step.
        if prompt_len > 1:
            model.base_model(input_ids=input_ids[:, :-1].to(model.device), cache=cache, use_cache=True)
        length, done = prompt_len, False
        while not done:
            t0 = time.perf_counter()
            tree = spec.propose(tokens[:length], room=end - length)
            t1 = time.perf_counter()
            path, bonus, rows, hidden = _verify(model, cache, tree, tokens[:length], d, spec)
            t2 = time.perf_counter()

            new = [int(t) for t in tree.tokens[path]] + [bonus]  # <= end - length: depth < that
            tokens[length : length + len(new)] = new
            keep, done = d.stop(tokens[: length + len(new)], len(new)) if d.stop else (len(new), False)
            del new[keep:], d.scores[length - prompt_len + keep:], d.logits[length - prompt_len + keep:]
            length += keep
            done = done or length == end
            spec.observe(tokens[:length], keep, rows, hidden)
            stats.steps += 1
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += t2 - t1
            if d.costs is not None:
                _time_step(d.costs, stats, length - keep, len(tree), drafter_set(spec.drafters), t0, t1, t2)
            if d.streamer is not None:
                d.streamer.put(torch.tensor(new))
    if d.streamer is not None:
        d.streamer.end()
    if d.costs is not None:
        d.costs.save()
    stats.new_tokens = length - prompt_len
    stats.accepted_per_drafter = dict(spec.accepted)
    log.debug("%s", stats.summary())
    sequences = torch.from_numpy(tokens[:length].astype(np.int64)).view(1, -1).to(input_ids.device)
    return GenerationOutput(sequences=sequences, stats=stats, spans=spec.spans)


def _time_step(costs: CostModel, stats: GenerationStats, context: int, nodes: int, drafting: str,
               t0: float, t1: float, t2: float) -> None:
    """Record the step's predicted and measured time, then teach ``costs`` what it took: the
    verification (t1 to t2) and the host time around it (the rest, up to now)."""
    total = time.perf_counter() - t0
    stats.predicted_step_seconds.append(costs.predict_seconds(context, nodes, drafting))
    stats.measured_step_seconds.append(total)
    costs.observe(context, nodes, t2 - t1, host_seconds=total - (t2 - t1), drafting=drafting)


def _verify(model, cache, tree: DraftTree, context: np.ndarray, d: Decoding,
            spec: Speculator) -> tuple[list[int], int, np.ndarray | None, np.ndarray | None]:
    """One forward of the target over [root + tree], the root being the context's last token
    (all before it cached): the accepted path (node indices), the next token and, as
    ``spec`` needs them, every verified row's top-k (see ``_topk_rows``) and last hidden
    state (float32 [n+1, d]). The cache is compacted to the accepted path."""
    past = context.shape[0] - 1
    ids, positions, mask = tree_inputs(int(context[-1]), tree, past, model.device, model.dtype)
    hidden = model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                              use_cache=True).last_hidden_state[0]  # [n+1, d]
    head = model.get_output_embeddings()
    logits = head(hidden) if spec.needs_topk or (d.sampling is None and d.processors is None) else None  # [n+1, V]
    if d.processors is None and not (d.keep_scores or d.keep_logits):
        if d.sampling is None:
            path, bonus = accept_greedy(tree, logits.argmax(-1).cpu().numpy().__getitem__)
        else:
            path, bonus = accept_sampling(tree, lambda row: head(hidden[row]), **d.sampling)
    else:
        path, bonus = _accept_processed(tree, context, d, lambda row: logits[row] if logits is not None
                                        else head(hidden[row]))
    compact_cache(cache, past, [0] + [i + 1 for i in path])
    rows = _topk_rows(ids, logits, spec.config.topk) if spec.needs_topk else None
    return path, bonus, rows, hidden.float().cpu().numpy() if spec.needs_hidden else None


def _accept_processed(tree: DraftTree, context: np.ndarray, d: Decoding,
                      logits_at: Callable[[int], torch.Tensor]) -> tuple[list[int], int]:
    """Acceptance on processed scores: each visited row's logits go through ``d.processors``
    with the row's prefix (the context, then the tree path down to the row), exactly what
    ``model.generate`` would compute after that prefix. Keeps scores/logits if asked."""
    def scores_at(row: int) -> torch.Tensor:
        raw = logits_at(row).float()
        scores = raw
        if d.processors is not None:
            prefix = np.concatenate([context, tree.tokens[tree.path(row - 1)] if row else []]).astype(np.int64)
            scores = d.processors(torch.from_numpy(prefix).view(1, -1).to(raw.device), raw[None].clone())[0]
        if d.keep_scores:
            d.scores.append(scores[None].clone())
        if d.keep_logits:
            d.logits.append(raw[None].clone())
        return scores

    if d.sampling is None:
        return accept_greedy(tree, lambda row: int(scores_at(row).argmax()))
    return accept_sampling(tree, scores_at, **d.sampling)


def _topk_rows(ids: torch.Tensor, logits: torch.Tensor, k: int) -> np.ndarray:
    """int32 [n+1, 1 + k]: each verified row's input token, then the target's top-k after it."""
    top = logits.topk(k, dim=-1).indices
    return torch.cat([ids[0, :, None], top], dim=1).cpu().numpy().astype(np.int32)
