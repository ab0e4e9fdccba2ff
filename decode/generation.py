"""The speculative generation loop: propose -> verify -> accept -> observe.

``generate`` is our own front door; ``decode.hf.speculative`` runs the same loop from
``model.generate(..., custom_generate=...)``. Both hand ``decode_loop`` a Speculator (the
model-free half: drafters, calibration, budget) and a ``Decoding`` (how tokens are chosen
and when to stop).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from retrodraft.decode.acceptance import accept_greedy, accept_sampling
from retrodraft.decode.budget import CostModel
from retrodraft.decode.keys import nest_drafters
from retrodraft.decode.options import check_prompt, resolve
from retrodraft.decode.tree_attention import verification_kernels
from retrodraft.decode.verifier import TreeVerifier
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT, SpeculationConfig
from retrodraft.retrieval.drafters import Drafter, PromptLookupDrafter, ReferenceDrafter, as_token_array
from retrodraft.retrieval.errors import StaleDatastoreError
from retrodraft.retrieval.online import OnlineState
from retrodraft.retrieval.speculator import Span, Speculator
from retrodraft.retrieval.tree import DraftTree

MAX_BUDGET = 1024  # nodes per step a caller may ask for: the cache and mask grow with it

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """What a call did. ``mean_accepted`` counts accepted draft tokens + 1 per step."""

    steps: int = 0
    new_tokens: int = 0
    accepted_per_drafter: dict[str, int] = field(default_factory=dict)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    step_seconds: float = 0.0  # whole steps: drafting, verifying, acceptance, learning
    wait_seconds: float = 0.0  # of which blocked on the device's answer (~0 on a CPU, where the forward is host work)

    @property
    def host_seconds(self) -> float:
        """Step time the host was busy (drafting, Python, kernel launches; on a CPU the
        forward too): what CUDA graphs and a faster loop can cut on a GPU."""
        return self.step_seconds - self.wait_seconds
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
            f"accepted drafts by source: {by}; drafting {self.draft_seconds:.3f}s, verifying {self.verify_seconds:.3f}s, "
            f"host busy {self.host_seconds:.3f}s of {self.step_seconds:.3f}s in steps"
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


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


def _check_settings(budget, do_sample, temperature, top_k, top_p, seed) -> None:
    """ValueError, stating the valid range, for a setting ``generate`` cannot use."""
    if budget is not None and (not _is_int(budget) or not 0 <= budget <= MAX_BUDGET):
        raise ValueError(f"budget must be None (automatic) or an int in [0, {MAX_BUDGET}] (0: no drafts), "
                         f"got {budget!r}")
    if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be None or an int, got {seed!r}")
    if do_sample is False:
        return
    if temperature is not None and (isinstance(temperature, bool)
                                    or not isinstance(temperature, (int, float, np.floating, np.integer))
                                    or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be > 0 and finite when sampling, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _check_references(docs: list[np.ndarray], vocab_size: int) -> None:
    for i, d in enumerate(docs):
        if d.size and (d.min() < 0 or d.max() >= vocab_size):
            raise ValueError(f"reference {i} holds token ids in [{d.min()}, {d.max()}], outside the model's "
                             f"vocabulary [0, {vocab_size}): was it tokenized for another model?")


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
        _check_references(docs, _vocab_size(model))
        drafters.append(ReferenceDrafter(docs, names, **dataclasses.asdict(config.reference)))
    if datastore is not None:
        datastore.check_model(_vocab_size(model), tokenizer)
        return drafters + datastore.drafters(model.config.vocab_size) + nest_drafters(model, datastore)
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
        if tokenizer is not None and references is None and datastore is None:
            raise ValueError("tokenizer= tokenizes text references= and checks a datastore=, and neither was given")
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
    cuda_graphs: bool | None = None,
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
    datastore:  a ``retrieval.Datastore``; opened writable, it keeps what this call learned
                (if another process replaced it meanwhile, a warning says it was not saved
                and the output is returned all the same). Checked against the model: its
                token ids must fit the vocabulary and, with ``tokenizer``, its fingerprint
                match (ValueError / TokenizerMismatchError).
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
    budget:     draft tree nodes verified per step, in [0, MAX_BUDGET]. None chooses each step's size from the
                drafts' scores and this hardware's cost of a step, c(n) + d(n) (see
                decode.budget: measured once per model and device, cached, then learned
                from every step's time, so the sizes follow the machine's load).
    config:     the speculation knobs (``retrieval.SpeculationConfig``).
    cuda_graphs: None is on iff the model is on CUDA: trees are padded to the cost curve's
                sizes (``config.cost_sizes``) and each size's verification forward is
                replayed from a CUDA graph (captured on first use, kept per model). True on
                a CPU runs the same padded static shapes without capture. See decode.verifier.
    Stops after max_new_tokens tokens or at the first EOS. An argument the call would leave
    unused (calibrator= without drafters=, references= with them, seed= when greedy) raises
    ValueError. Not thread-safe: see ``verification_kernels``.
    """
    _check_settings(budget, do_sample, temperature, top_k, top_p, seed)
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
                        streamer=streamer, costs=CostModel.of(model) if budget is None and seed is None else None,
                        cuda_graphs=cuda_graphs)
    out = decode_loop(model, input_ids, spec, decoding)
    if datastore is not None:
        try:
            datastore.commit(out.sequences[0, input_ids.shape[1]:].numpy().astype(np.int32))
        except StaleDatastoreError as e:
            # The output is the caller's whatever happens to the datastore; what was learned
            # stays in this process's copy of the state.
            log.warning("not saved: %s", e)
            warnings.warn(f"what this call learned was not saved: {e}", RuntimeWarning, stacklevel=2)
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
    cuda_graphs: see ``generate``.
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
    cuda_graphs: bool | None = None
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
    verifier = TreeVerifier.of(model, end + spec.max_nodes + 1, spec.max_nodes, d.cuda_graphs,
                               spec.config.cost_sizes, spec.config.topk)
    with verification_kernels(model) as threads:
        if d.costs is not None:  # BLAS or the kernel, whichever the cost curve found faster at each size
            threads.kernel_rows = d.costs.kernel_rows(prompt_len)
        state = verifier.prefill(input_ids, spec.needs_hidden, threads)
        if state is not None:
            spec.prime(tokens[:prompt_len], state)
        length, done = prompt_len, False
        while not done:
            threads.update()
            if d.costs is not None:
                threads.kernel_rows = d.costs.kernel_rows(length)
            t0 = time.perf_counter()
            tree = spec.propose(tokens[:length], room=end - length)
            t1 = time.perf_counter()
            path, bonus, rows, hidden = _verify(verifier, tree, tokens[:length], d, spec)
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
            stats.step_seconds += time.perf_counter() - t0
            if d.costs is not None:
                _time_step(d.costs, stats, length - keep, len(tree), drafter_set(spec.drafters), t0, t1, t2,
                           teach_host=stats.steps > 1)
            if d.streamer is not None:
                d.streamer.put(torch.tensor(new))
    stats.wait_seconds = verifier.wait_seconds
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
               t0: float, t1: float, t2: float, teach_host: bool = True) -> None:
    """Record the step's predicted and measured time, then teach ``costs`` what it took: the
    verification (t1 to t2) and, with ``teach_host``, the host time around it (the rest, up to
    now). A call's first step is not a sample of host time per step: its drafters index the
    whole prompt and load their kernels there. Taught, one such step at n nodes beside a
    next step at fewer gave d(n) a slope so steep that the budget sent 0 nodes from then on,
    and with every step at 0 nodes no pair of steps could correct the slope until the
    outlier left the window (the demo once ran 64 steps at 1.00 tokens a step, right after a
    CI run)."""
    total = time.perf_counter() - t0
    stats.predicted_step_seconds.append(costs.predict_seconds(context, nodes, drafting))
    stats.measured_step_seconds.append(total)
    host = total - (t2 - t1) if teach_host else None
    costs.observe(context, nodes, t2 - t1, host_seconds=host, drafting=drafting)



def _verify(verifier: TreeVerifier, tree: DraftTree, context: np.ndarray, d: Decoding,
            spec: Speculator) -> tuple[list[int], int, np.ndarray | None, np.ndarray | None]:
    """One forward of the target over [root + tree], the root being the context's last token
    (all before it cached): the accepted path (node indices), the next token and, as
    ``spec`` needs them, every verified row's top-k and last hidden state (float32 [n+1, d]).
    The cache is compacted to the accepted path. With logits processors (or scores kept),
    acceptance runs on the processed scores of each visited row."""
    accept = None
    if d.processors is not None or d.keep_scores or d.keep_logits:
        def accept(tree: DraftTree, logits_at: Callable[[int], torch.Tensor]) -> tuple[list[int], int]:
            return _accept_processed(tree, context, d, logits_at)
    return verifier.verify(tree, int(context[-1]), context.shape[0] - 1, d.sampling, spec.needs_topk,
                           spec.needs_hidden, accept=accept)


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
