"""The target's hidden states as NEST keys: corpus documents in overlapping windows, whole
traces for replay, and the fingerprint that ties a datastore's keys to one model.

Only this module runs the model for keys; ``retrieval.keys_store`` stores and projects what
it returns (numpy only).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Sequence

import numpy as np
import torch

from retrodraft.retrieval.drafters import Drafter

log = logging.getLogger(__name__)

WINDOW = 512  # tokens per forward window
OVERLAP = 128  # tokens of context a window repeats from the one before; their outputs are dropped
BATCH_TOKENS = 4096  # padded tokens per batched prefill
_HASHED_WEIGHTS = 1 << 16  # leading elements of each hashed weight tensor


def model_info(model) -> dict:
    """{"name", "fingerprint"}: 16 hex digits of SHA-256 over the model's config (its name
    and dtype left out) and the leading values of its input embedding and of the final
    norm (or LM head) as float32. Two models share it only if they agree on both; the name
    is for messages."""
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "torch_dtype", "dtype", "transformers_version", "_commit_hash"):
        cfg.pop(k, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode("utf-8"))
    weights = [model.get_input_embeddings().weight]
    norm = getattr(model.base_model, "norm", None) or getattr(model.base_model, "ln_f", None)
    weights.append(norm.weight if norm is not None else model.get_output_embeddings().weight)
    for w in weights:
        h.update(w.detach().reshape(-1)[:_HASHED_WEIGHTS].float().cpu().numpy().tobytes())
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return {"name": name, "fingerprint": h.hexdigest()[:16]}


class ModelEncoder:
    """Final hidden states (what the LM head reads) of token sequences, as float32 numpy.

    Each document is cut into windows of ``window`` tokens (default: WINDOW, or the model's
    context if shorter, with at most a quarter of it as overlap) that repeat the last ``overlap``
    tokens of the window before (so every token past the first window sees at least
    ``overlap`` tokens of context); windows are right-padded into batches of about
    ``batch_tokens`` tokens, one prefill each. ``info`` and ``hidden_size`` describe the
    model to the datastore (``retrieval.keys_store.Encoder``).
    """

    def __init__(self, model, window: int | None = None, overlap: int = OVERLAP, batch_tokens: int = BATCH_TOKENS):
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if window is None:
            window = min(WINDOW, limit or WINDOW)
            overlap = min(overlap, window // 4)
        if not 0 <= overlap < window:
            raise ValueError(f"need 0 <= overlap < window, got overlap={overlap} window={window}")
        if limit is not None and window > limit:
            raise ValueError(f"window {window} exceeds the model's context of {limit} tokens")
        self.model, self.window, self.overlap, self.batch_tokens = model, window, overlap, batch_tokens
        self.info = model_info(model)
        self.hidden_size = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd)
        self.settings = {"window": window, "overlap": overlap}

    @torch.inference_mode()
    def __call__(self, docs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """float32 [len(doc), hidden_size] per document (int32 token ids, any length >= 0)."""
        out = [np.empty((len(d), self.hidden_size), np.float32) for d in docs]
        # (doc, window start, first kept position): every position is kept from exactly one window
        step = self.window - self.overlap
        jobs = [(i, s, 0 if s == 0 else s + self.overlap)
                for i, d in enumerate(docs) for s in range(0, max(len(d) - self.overlap, 1), step) if len(d)]
        # longest first, so a batch pads little; a batch holds about batch_tokens padded tokens
        jobs.sort(key=lambda j: -min(self.window, len(docs[j[0]]) - j[1]))
        while jobs:
            n = min(self.window, len(docs[jobs[0][0]]) - jobs[0][1])  # the batch's longest window
            take = max(1, self.batch_tokens // n)
            batch, jobs = jobs[:take], jobs[take:]
            pieces = [docs[i][s : s + self.window] for i, s, _ in batch]
            ids = torch.zeros((len(pieces), n), dtype=torch.long)
            mask = torch.zeros((len(pieces), n), dtype=torch.long)
            for r, p in enumerate(pieces):
                ids[r, : len(p)] = torch.from_numpy(p.astype(np.int64))
                mask[r, : len(p)] = 1
            # right padding: causal attention keeps real positions blind to the pad after them
            hidden = self.model.base_model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                           use_cache=False).last_hidden_state.float().cpu().numpy()
            for r, (i, s, keep) in enumerate(batch):
                end = s + len(pieces[r])
                out[i][keep:end] = hidden[r, keep - s : end - s]
        return out


@torch.inference_mode()
def sequence_hidden(model, tokens: np.ndarray) -> np.ndarray:
    """float32 [len(tokens), hidden]: the final hidden state at every position of one
    sequence, in one prefill (replay's stand-in for what verification computed)."""
    ids = torch.from_numpy(np.asarray(tokens, np.int64)).view(1, -1).to(model.device)
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0].float().cpu().numpy()


def nest_drafters(model, datastore, **options) -> list[Drafter]:
    """[a NestDrafter over ``datastore``] when it holds keys (built with --keys), else [].

    Raises KeyModelMismatchError if the keys were made by another model than ``model``.
    A datastore with keys on first use encodes the documents stage 1 picks with ``model``
    (stored if the datastore is writable). ``options`` go to NestDrafter.
    """
    from retrodraft.retrieval.nest import NestDrafter

    index = datastore.nest_index()
    if index is None:
        return []
    encoder = ModelEncoder(model, **index.encoder_settings)
    index.check_model(encoder.info)
    return [NestDrafter(index, encoder, **options)]
