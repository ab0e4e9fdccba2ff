"""The speculative generation loop: propose -> fuse -> prune -> verify -> accept -> observe."""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from retrodraft.decode.acceptance import accept_greedy, accept_sampling
from retrodraft.decode.budget import CostModel
from retrodraft.decode.tree_attention import compact_cache, new_cache, verification_kernels, tree_inputs
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT, SpeculationConfig
from retrodraft.retrieval.drafters import Drafter, PromptLookupDrafter, ReferenceDrafter, as_token_array
from retrodraft.retrieval.online import OnlineState
from retrodraft.retrieval.speculator import Span, Speculator
from retrodraft.retrieval.tree import DraftTree


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


def _eos_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}


def _check_inputs(model, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        shape = list(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor [1, prompt_length], got {shape}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"batch size {input_ids.shape[0]} is not supported yet: pass one sequence, [1, prompt_length]")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
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
    """Every drafter that applies."""
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


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    drafters: Sequence[Drafter] | None = None,
    calibrator: Calibrator | None = None,
    datastore=None,
    references: Sequence[str | Sequence[int]] | None = None,
    tokenizer=None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    budget: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    streamer=None,
    seed: int | None = None,
    config: SpeculationConfig = DEFAULT,
) -> GenerationOutput:
    """Generate like ``model.generate``, verifying retrieved drafts with tree attention.

    input_ids:  LongTensor [1, prompt_length] (batch size 1).
    drafters:   None uses every drafter that applies: prompt lookup over the context, the
                ``references``, past outputs (suffix tree) and token recycling, kept per
                model in this process or, with a ``datastore``, in it, plus its corpus;
                [] turns speculation off.
    calibrator: maps explicit ``drafters``' raw scores to acceptance rates, learning as it
                goes (None: raw scores); the default drafters use ``online_state``'s.
    datastore:  a ``retrieval.Datastore``; opened writable, it keeps what this call learned.
    references: texts (tokenized with ``tokenizer``) or token-id sequences to copy from.
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
    Stops after max_new_tokens tokens or at the first EOS (``eos_token_id`` or the model's).
    """
    _check_inputs(model, input_ids, max_new_tokens)
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if drafters is None:
        drafters = _default_drafters(model, references, tokenizer, datastore, config)
        calibrator = online_state(model, datastore).calibrator
    costs = CostModel.of(model) if budget is None else None
    drafting = "+".join(d.name for d in drafters)  # host time per step is learned per drafter set
    spec = Speculator(drafters, calibrator, budget=budget, config=config,
                      cost=(lambda length: costs.step_table(length, drafting)) if costs is not None else None)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator) if do_sample else None
    tokens, length, stats = _decode(model, input_ids, max_new_tokens, spec, sampling, _eos_ids(model, eos_token_id),
                                    streamer, costs if seed is None else None, drafting)
    prompt_len = input_ids.shape[1]
    if datastore is not None:
        datastore.commit(tokens[prompt_len:length])
    sequences = torch.from_numpy(tokens[:length].astype(np.int64)).view(1, -1).to(input_ids.device)
    return GenerationOutput(sequences=sequences, stats=stats, spans=spec.spans)


def _decode(model, input_ids: torch.Tensor, max_new_tokens: int, spec: Speculator, sampling: dict | None,
            eos: set[int], streamer, costs: CostModel | None = None,
            drafting: str = "") -> tuple[np.ndarray, int, GenerationStats]:
    """The step loop: propose -> verify -> accept -> observe, until max_new_tokens or EOS.
    ``costs`` (the automatic budget's) learns each step's time, keyed by ``drafting``.
    Returns the token buffer (int32), its filled length and the stats."""
    stats = GenerationStats()
    prompt_len = input_ids.shape[1]
    end = prompt_len + max_new_tokens
    tokens = np.empty(end, np.int32)  # the context, grown in place
    tokens[:prompt_len] = input_ids[0].cpu().numpy()
    if streamer is not None:
        streamer.put(input_ids.cpu())
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
            path, bonus, rows, hidden = _verify(model, cache, tree, int(tokens[length - 1]), length - 1, sampling,
                                                spec)
            t2 = time.perf_counter()

            new = [int(t) for t in tree.tokens[path]] + [bonus]  # <= end - length: depth < that
            if eos & set(new):
                new = new[: next(i for i, t in enumerate(new) if t in eos) + 1]
                done = True
            tokens[length : length + len(new)] = new
            length += len(new)
            done = done or length == end
            spec.observe(tokens[:length], len(new), rows, hidden)
            stats.steps += 1
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += t2 - t1
            if costs is not None:
                _time_step(costs, stats, length - len(new), len(tree), drafting, t0, t1, t2)
            if streamer is not None:
                streamer.put(torch.tensor(new))
    if streamer is not None:
        streamer.end()
    if costs is not None:
        costs.save()
    stats.new_tokens = length - prompt_len
    stats.accepted_per_drafter = dict(spec.accepted)
    return tokens, length, stats


def _time_step(costs: CostModel, stats: GenerationStats, context: int, nodes: int, drafting: str,
               t0: float, t1: float, t2: float) -> None:
    """Record the step's predicted and measured time, then teach ``costs`` what it took: the
    verification (t1 to t2) and the host time around it (the rest, up to now)."""
    total = time.perf_counter() - t0
    stats.predicted_step_seconds.append(costs.predict_seconds(context, nodes, drafting))
    stats.measured_step_seconds.append(total)
    costs.observe(context, nodes, t2 - t1, host_seconds=total - (t2 - t1), drafting=drafting)


def _verify(model, cache, tree: DraftTree, root: int, past: int, sampling: dict | None,
            spec: Speculator) -> tuple[list[int], int, np.ndarray | None, np.ndarray | None]:
    """One forward of the target over [root + tree] after ``past`` cached tokens: the
    accepted path (node indices), the bonus token and, as ``spec`` needs them, every
    verified row's top-k (see ``_topk_rows``) and last hidden state (float [n+1, d]). The
    cache is compacted to the accepted path. ``sampling``: accept_sampling's settings,
    None for greedy."""
    ids, positions, mask = tree_inputs(root, tree, past, model.device, model.dtype)
    hidden = model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                              use_cache=True).last_hidden_state[0]  # [n+1, d]
    head = model.get_output_embeddings()
    logits = head(hidden) if spec.needs_topk or sampling is None else None  # [n+1, vocab]
    if sampling is None:
        path, bonus = accept_greedy(tree, logits.argmax(-1).cpu().numpy())
    else:
        path, bonus = accept_sampling(tree, lambda row: head(hidden[row]), **sampling)
    compact_cache(cache, past, [0] + [i + 1 for i in path])
    rows = _topk_rows(ids, logits, spec.config.topk) if spec.needs_topk else None
    return path, bonus, rows, hidden.float().cpu().numpy() if spec.needs_hidden else None


def _topk_rows(ids: torch.Tensor, logits: torch.Tensor, k: int) -> np.ndarray:
    """int32 [n+1, 1 + k]: each verified row's input token, then the target's top-k after it."""
    top = logits.topk(k, dim=-1).indices
    return torch.cat([ids[0, :, None], top], dim=1).cpu().numpy().astype(np.int32)
