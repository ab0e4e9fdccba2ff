"""NEST keys in the datastore: one projected hidden state per corpus token, and what NEST
needs to search them (the projection, the first-stage index, which model made them).

Written by ``KeyBuilder`` inside a build or append (so a killed key build leaves the
previous datastore, as any build does), read by ``NestIndex``. Two modes:

- ``all`` (``build_index.py --keys``): ``keys.arrow`` holds float16 [T + D, dims], row p
  the key of stream position p (separator rows are zero), checksummed like every Arrow file.
- ``lazy`` (``--keys lazy``, for corpora too big to encode up front): no key file; the
  documents NEST's first stage picks are encoded when first retrieved and their keys saved
  in the datastore's LMDB state, one entry per document (``nest_keys:ID``: the keys and
  their CRC32), in one write transaction each. LMDB rather than an append-only side file:
  a commit is atomic and durable with no torn tail to detect, writers in several processes
  are serialised for us, and appends carry the state over, so no document is encoded twice
  across restarts or appends. A read-only datastore keeps such keys in memory only.

Both modes store the projection (``key_projection.arrow``: PCA fitted on a sample of hidden
states, mean float32 [h] then components float32 [h, dims]), the BM25 index (``bm25/``)
and the model's name and fingerprint; opening NEST with another model raises
KeyModelMismatchError.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from retrodraft.retrieval.errors import CorruptDatastoreError, KeyModelMismatchError
from retrodraft.retrieval.layout import REBUILD
from retrodraft.retrieval.stage1 import Bm25Documents, build_bm25

if TYPE_CHECKING:
    from retrodraft.retrieval.store import Datastore

log = logging.getLogger(__name__)

MAX_DIMS = 128
SAMPLE_TOKENS = 8192  # hidden states the projection is fitted on
ENCODE_TOKENS = 4096  # tokens handed to the encoder per call while building (the bar moves per call)
KEYS_STATE = "nest_keys:{}"
MODES = ("all", "lazy")


class Encoder(Protocol):
    """Computes final hidden states for documents (``decode.keys.ModelEncoder`` is one).

    ``info``: {"name", "fingerprint"} of the model; ``hidden_size``: h; ``settings``: how it
    windows documents (recorded, and used again to encode lazily). Called with int32 token
    arrays, returns float32 [len(doc), h] per document.
    """

    info: dict
    hidden_size: int
    settings: dict

    def __call__(self, docs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Projection:
    """x -> (x - mean) @ components: float32 [h] and [h, dims] (orthonormal columns)."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, sample: np.ndarray, dims: int) -> Projection:
        """PCA of ``sample`` float32 [m >= 1, h]: the ``dims`` directions of largest variance
        (all h directions exist whatever m, from the eigenvectors of the covariance)."""
        x = np.asarray(sample, np.float64)
        mean = x.mean(0)
        c = x - mean
        _, vectors = np.linalg.eigh(c.T @ c / x.shape[0])  # ascending eigenvalues
        return cls(mean.astype(np.float32), np.ascontiguousarray(vectors[:, ::-1][:, :dims], np.float32))

    @classmethod
    def from_flat(cls, flat: np.ndarray, hidden: int, dims: int) -> Projection:
        if flat.shape != ((1 + dims) * hidden,):
            raise CorruptDatastoreError(f"key_projection holds {flat.shape[0]} values, expected {(1 + dims) * hidden}")
        return cls(flat[:hidden], flat[hidden:].reshape(hidden, dims))

    def flat(self) -> np.ndarray:
        return np.concatenate([self.mean, self.components.reshape(-1)])

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """float32 [n, dims] (or [dims] for one vector) of hidden states float32 [n, h]."""
        return (np.asarray(h, np.float32) - self.mean) @ self.components


def _documents(stream: np.ndarray, offsets: np.ndarray, ids) -> list[np.ndarray]:
    return [stream[offsets[d] : offsets[d + 1] - 1] for d in ids]


class KeyBuilder:
    """Computes a datastore version's NEST files; ``Datastore.build(..., keys=KeyBuilder(...))``.

    encoder:        the target's hidden states (decode.keys.ModelEncoder(model))
    mode:           "all" encodes every new document now; "lazy" only fits the projection
                    (on ``sample_tokens`` tokens of seeded random documents) and leaves
                    documents to be encoded when first retrieved
    dims:           projected key size (at most MAX_DIMS and h)
    sample_tokens:  hidden states the PCA is fitted on (the first documents' in mode "all")
    An append keeps the base's mode, projection and keys, and encodes the new documents.
    """

    def __init__(self, encoder: Encoder, mode: str = "all", dims: int = MAX_DIMS, sample_tokens: int = SAMPLE_TOKENS):
        if mode not in MODES:
            raise ValueError(f"keys mode must be one of {MODES}, got {mode!r}")
        if not 1 <= dims <= MAX_DIMS:
            raise ValueError(f"dims must be in [1, {MAX_DIMS}], got {dims}")
        if sample_tokens < 1:
            raise ValueError(f"sample_tokens must be >= 1, got {sample_tokens}")
        self.encoder, self.mode, self.sample_tokens = encoder, mode, sample_tokens
        self.dims = min(dims, encoder.hidden_size)

    def __call__(self, tmp: Path, stream: np.ndarray, offsets: np.ndarray, base: Datastore | None,
                 progress: bool) -> tuple[dict[str, np.ndarray], dict, dict]:
        """(Arrow arrays to write, the metadata entry "keys", seconds per phase) for the
        version in ``tmp`` whose stream is ``stream``; documents of ``base`` come first."""
        seconds: dict[str, float] = {}
        first = 0
        projection = None
        mode, dims = self.mode, self.dims
        if base is not None and base.nest_index() is not None:
            old = base.nest_index()
            old.check_model(self.encoder.info)
            mode, dims, projection = old.meta["mode"], old.dims, old.projection
            first = base.num_documents
        new = range(first, offsets.shape[0] - 1)
        arrays: dict[str, np.ndarray] = {}
        t0 = time.perf_counter()
        if mode == "all":
            keys = np.zeros((stream.shape[0], dims), np.float16)
            if first:
                keys[: base.tokens.shape[0]] = base.nest_index().keys
            projection = self._encode_all(stream, offsets, new, keys, projection, progress)
            arrays["keys"] = keys.reshape(-1)
        elif projection is None:
            projection = self._fit_on_sample(stream, offsets, new)
        seconds["keys"] = time.perf_counter() - t0
        arrays["key_projection"] = projection.flat()
        t0 = time.perf_counter()
        bm25 = build_bm25(stream, offsets, tmp)
        seconds["bm25"] = time.perf_counter() - t0
        meta = {"mode": mode, "model": self.encoder.info, "hidden_size": self.encoder.hidden_size, "dims": dims,
                "metric": "l2", "encoder": self.encoder.settings, "bm25": bm25}
        return arrays, meta, seconds

    def _encode_all(self, stream, offsets, new: range, keys: np.ndarray, projection: Projection | None,
                    progress: bool) -> Projection:
        """Fill ``keys`` rows of the ``new`` documents; fit the projection first if there is none."""
        lengths = offsets[1:] - offsets[:-1] - 1
        pending: list[tuple[int, np.ndarray]] = []  # (doc, hidden) waiting for the projection
        with tqdm(total=int(lengths[new.start : new.stop].sum()), desc="keys", unit=" tok", unit_scale=True,
                  disable=not progress) as bar:
            batch: list[int] = []
            for d in list(new) + [None]:
                if d is not None:
                    batch.append(d)
                    if lengths[batch].sum() < ENCODE_TOKENS:
                        continue
                if batch:
                    hidden = self.encoder(_documents(stream, offsets, batch))
                    pending.extend(zip(batch, hidden))
                    bar.update(int(lengths[batch].sum()))
                    batch = []
                if projection is None and (d is None or sum(len(h) for _, h in pending) >= self.sample_tokens):
                    sample = np.concatenate([h for _, h in pending])[: self.sample_tokens]
                    projection = Projection.fit(sample, self.dims) if len(sample) else _identity(self)
                if projection is not None:
                    for doc, h in pending:
                        keys[offsets[doc] : offsets[doc + 1] - 1] = projection(h)
                    pending = []
        return projection if projection is not None else _identity(self)

    def _fit_on_sample(self, stream, offsets, new: range) -> Projection:
        """PCA on up to ``sample_tokens`` tokens: the first 1024 of seeded random new documents."""
        order = np.random.default_rng(0).permutation(np.asarray(new))
        docs, total = [], 0
        for d in order:
            doc = stream[offsets[d] : min(offsets[d + 1] - 1, offsets[d] + 1024)]
            docs.append(doc)
            total += len(doc)
            if total >= self.sample_tokens:
                break
        hidden = [h for h in self.encoder(docs) if len(h)]
        return Projection.fit(np.concatenate(hidden)[: self.sample_tokens], self.dims) if hidden else _identity(self)


def _identity(builder: KeyBuilder) -> Projection:
    """For a corpus without a single token: any projection will do."""
    h = builder.encoder.hidden_size
    return Projection(np.zeros(h, np.float32), np.eye(h, builder.dims, dtype=np.float32))


def _crc(keys: np.ndarray) -> np.ndarray:
    return np.array([zlib.crc32(np.ascontiguousarray(keys).view(np.uint8))], np.uint32)


class NestIndex:
    """A datastore's NEST keys, projection and first stage, for reading (``Datastore.nest_index``).

    ``keys`` (mode "all"): float16 [T + D, dims], a read-only view into the memory map.
    """

    def __init__(self, datastore: Datastore):
        self.datastore = datastore
        self.meta = datastore.meta["keys"]
        self.dims, hidden = int(self.meta["dims"]), int(self.meta["hidden_size"])
        self.projection = Projection.from_flat(datastore.array("key_projection"), hidden, self.dims)
        self.keys = datastore.array("keys").reshape(-1, self.dims) if self.meta["mode"] == "all" else None
        self.encoder_settings: dict = dict(self.meta["encoder"])
        self._stage1: Bm25Documents | None = None
        self._encoded: dict[int, np.ndarray] = {}  # lazy mode: keys encoded or loaded in this process

    def check_model(self, info: dict) -> None:
        """Raise KeyModelMismatchError, naming both models, unless ``info`` is the keys' model."""
        ours = self.meta["model"]
        if info["fingerprint"] != ours["fingerprint"]:
            path = self.datastore.path
            raise KeyModelMismatchError(
                f"the NEST keys of the datastore at {path} were made by model {ours['name']!r} (fingerprint "
                f"{ours['fingerprint']}), not {info['name']!r} (fingerprint {info['fingerprint']}): hidden states "
                f"of another model are not comparable. Rebuild the keys with that model: "
                f"python tools/build_index.py CORPUS --keys --model MODEL --out {path}"
            )

    def documents(self, query: np.ndarray, max_rows: int) -> np.ndarray:
        """Stage 1: BM25's best documents for ``query`` (token ids), best first, as many as
        fit in ``max_rows`` key rows (the best one always, if any scores)."""
        if self._stage1 is None:
            self._stage1 = Bm25Documents(self.datastore.path, self.meta["bm25"])
        ranked = self._stage1.rank(query)
        if ranked.size == 0:
            return ranked
        offsets = self.datastore.doc_offsets
        rows = np.cumsum(offsets[ranked + 1] - offsets[ranked] - 1)
        return ranked[: max(1, int(np.searchsorted(rows, max_rows, side="right")))]

    def rows(self, docs: Sequence[int], encoder: Encoder | None) -> tuple[np.ndarray, np.ndarray]:
        """(keys float16 [m, dims] C-contiguous, stream positions int64 [m]) of every token of
        ``docs`` that has a next-but-one token in its document (what a hit's span needs).

        Mode "lazy": documents without keys are encoded with ``encoder`` (one call for all
        of them) and saved, or kept in memory if the datastore is read-only.
        """
        offsets = self.datastore.doc_offsets
        spans = [(int(offsets[d]), int(offsets[d + 1]) - 3) for d in docs]  # keep positions [a, b)
        positions = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans if b > a] or
                                   [np.empty(0, np.int64)])
        if self.keys is not None:
            return np.ascontiguousarray(self.keys[positions]), positions
        per_doc = self._lazy_keys([int(d) for d in docs], encoder)
        keys = [per_doc[d][: max(b - a, 0)] for d, (a, b) in zip(docs, spans)]
        return np.ascontiguousarray(np.concatenate(keys or [np.empty((0, self.dims), np.float16)])), positions

    def _lazy_keys(self, docs: list[int], encoder: Encoder | None) -> dict[int, np.ndarray]:
        ds = self.datastore
        missing = []
        for d in docs:
            if d in self._encoded:
                continue
            saved = ds.load_state(KEYS_STATE.format(d))
            if saved is None:
                missing.append(d)
                continue
            length = int(ds.doc_offsets[d + 1] - ds.doc_offsets[d] - 1)
            keys = saved.get("keys")
            if keys is None or keys.shape != (length, self.dims) or not np.array_equal(saved.get("crc32"), _crc(keys)):
                raise CorruptDatastoreError(f"the saved NEST keys of document {d} in {ds.path} are damaged; "
                                            f"{REBUILD.format(ds.path)} --keys lazy")
            self._encoded[d] = keys
        if missing:
            if encoder is None:
                raise ValueError("these documents have no keys yet: an encoder is needed to make them")
            t0 = time.perf_counter()
            hidden = encoder(_documents(ds.tokens, ds.doc_offsets, missing))
            for d, h in zip(missing, hidden):
                keys = self.projection(h).astype(np.float16)
                self._encoded[d] = keys
                if not ds.readonly:
                    ds.save_state(KEYS_STATE.format(d), {"keys": keys, "crc32": _crc(keys)})
            log.info("encoded NEST keys of %d documents (%d tokens) in %.1f s%s", len(missing),
                     sum(len(h) for h in hidden), time.perf_counter() - t0,
                     "" if not ds.readonly else " (read-only datastore: kept in memory only)")
        return {d: self._encoded[d] for d in docs}
