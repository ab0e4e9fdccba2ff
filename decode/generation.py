"""The speculative generation loop: propose -> fuse -> prune -> verify -> accept -> observe."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from retrodraft.decode.budget import CostModel
from retrodraft.decode.keys import nest_drafters
from retrodraft.decode.tree_attention import verification_kernels
from retrodraft.decode.verifier import TreeVerifier
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT, SpeculationConfig
from retrodraft.retrieval.drafters import Drafter, PromptLookupDrafter, ReferenceDrafter, as_token_array
from retrodraft.retrieval.errors import StaleDatastoreError
from retrodraft.retrieval.online import OnlineState
from retrodraft.retrieval.speculator import Span, Speculator

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


def _eos_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


def _check_inputs(model, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        shape = list(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor [1, prompt_length], got {shape}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"batch size {input_ids.shape[0]} is not supported yet: pass one sequence, [1, prompt_length]")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    vocab = _vocab_size(model)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary), got values in "
                         f"[{low}, {high}]")
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


def _check_settings(budget, do_sample, temperature, top_k, top_p, seed) -> None:
    """ValueError, stating the valid range, for a setting ``generate`` cannot use."""
    if budget is not None and (not _is_int(budget) or not 0 <= budget <= MAX_BUDGET):
        raise ValueError(f"budget must be None (automatic) or an int in [0, {MAX_BUDGET}] (0: no drafts), "
                         f"got {budget!r}")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be None or an int, got {seed!r}")
    if not do_sample:
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be > 0 and finite when sampling, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


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
        _check_references(docs, _vocab_size(model))
        drafters.append(ReferenceDrafter(docs, names, **dataclasses.asdict(config.reference)))
    if datastore is not None:
        datastore.check_model(_vocab_size(model), tokenizer)
        return drafters + datastore.drafters(model.config.vocab_size) + nest_drafters(model, datastore)
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
    cuda_graphs: bool | None = None,
) -> GenerationOutput:
    """Generate like ``model.generate``, verifying retrieved drafts with tree attention.

    input_ids:  LongTensor [1, prompt_length] (batch size 1).
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
    budget:     draft tree nodes verified per step, in [0, MAX_BUDGET]. None chooses each step's size from the
                drafts' scores and this hardware's cost of a step, c(n) + d(n) (see
                decode.budget: measured once per model and device, cached, then learned
                from every step's time, so the sizes follow the machine's load).
    config:     the speculation knobs (``retrieval.SpeculationConfig``).
    cuda_graphs: None is on iff the model is on CUDA: trees are padded to the cost curve's
                sizes (``config.cost_sizes``) and each size's verification forward is
                replayed from a CUDA graph (captured on first use, kept per model). True on
                a CPU runs the same padded static shapes without capture. See decode.verifier.
    Stops after max_new_tokens tokens or at the first EOS (``eos_token_id`` or the model's).
    """
    _check_inputs(model, input_ids, max_new_tokens)
    _check_settings(budget, do_sample, temperature, top_k, top_p, seed)
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
                                    streamer, costs if seed is None else None, drafting, cuda_graphs)
    prompt_len = input_ids.shape[1]
    if datastore is not None:
        try:
            datastore.commit(tokens[prompt_len:length])
        except StaleDatastoreError as e:
            # The output is the caller's whatever happens to the datastore; what was learned
            # stays in this process's copy of the state.
            log.warning("not saved: %s", e)
            warnings.warn(f"what this call learned was not saved: {e}", RuntimeWarning, stacklevel=2)
    sequences = torch.from_numpy(tokens[:length].astype(np.int64)).view(1, -1).to(input_ids.device)
    return GenerationOutput(sequences=sequences, stats=stats, spans=spec.spans)


def _decode(model, input_ids: torch.Tensor, max_new_tokens: int, spec: Speculator, sampling: dict | None,
            eos: set[int], streamer, costs: CostModel | None = None, drafting: str = "",
            cuda_graphs: bool | None = None) -> tuple[np.ndarray, int, GenerationStats]:
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
    verifier = TreeVerifier.of(model, end + spec.max_nodes + 1, spec.max_nodes, cuda_graphs,
                               spec.config.cost_sizes, spec.config.topk)
    with verification_kernels(model):
        verifier.prefill(input_ids)
        length, done = prompt_len, False
        while not done:
            t0 = time.perf_counter()
            tree = spec.propose(tokens[:length], room=end - length)
            t1 = time.perf_counter()
            path, bonus, rows, hidden = verifier.verify(tree, int(tokens[length - 1]), length - 1, sampling,
                                                        spec.needs_topk, spec.needs_hidden)
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
            stats.step_seconds += time.perf_counter() - t0
            if costs is not None:
                _time_step(costs, stats, length - len(new), len(tree), drafting, t0, t1, t2)
            if streamer is not None:
                streamer.put(torch.tensor(new))
    stats.wait_seconds = verifier.wait_seconds
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

