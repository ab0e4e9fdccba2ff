"""NEST's first stage: the datastore documents most relevant to a request, by BM25 (bm25s).

Terms are the target tokenizer's token ids, so the index is built from the datastore's own
token stream (no second tokenizer, nothing to keep in sync) and queried with the prompt's
ids. bm25s keeps the BM25 weight of every (term, document) pair in a sparse matrix, so a
query costs one sparse row sum; it is saved with ``BM25.save`` into the datastore's
``bm25/`` directory and memory-mapped on load, its files checked against CRC32s recorded in
the datastore's metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retrodraft.retrieval.arrow_files import block_crcs
from retrodraft.retrieval.errors import CorruptDatastoreError
from retrodraft.retrieval.layout import REBUILD

log = logging.getLogger(__name__)

BM25_DIR = "bm25"


def _bm25s():
    try:
        import bm25s
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("NEST's first stage needs bm25s: pip install 'retrodraft[nest]' (or bm25s)") from e
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def build_bm25(stream: np.ndarray, offsets: np.ndarray, out: Path) -> dict:
    """Index every document of ``stream`` (int32, -1 after each; int64 ``offsets`` [D + 1])
    into ``out``/bm25/ and return {file name: {"bytes", "crc32"}} of what was written."""
    bm25s = _bm25s()
    vocab = int(stream.max(initial=-1)) + 1
    docs = [stream[offsets[d] : offsets[d + 1] - 1].tolist() for d in range(offsets.shape[0] - 1)]
    bm = bm25s.BM25()
    bm.index((docs, {t: t for t in range(max(vocab, 1))}), create_empty_token=False, show_progress=False)
    folder = out / BM25_DIR
    bm.save(str(folder), show_progress=False)
    return _file_crcs(folder)


def _file_crcs(folder: Path) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    bufs = [p.read_bytes() for p in files]
    return {p.name: {"bytes": len(b), "crc32": c} for p, b, c in zip(files, bufs, block_crcs(bufs))}


class Bm25Documents:
    """The documents of a datastore ranked by BM25 against a token-id query."""

    def __init__(self, datastore_path: Path, files: dict):
        folder = datastore_path / BM25_DIR
        found = _file_crcs(folder) if folder.is_dir() else {}
        if found != files:
            bad = sorted(set(files) ^ set(found) | {k for k in files if k in found and files[k] != found[k]})
            raise CorruptDatastoreError(
                f"{folder} differs from what the datastore recorded ({', '.join(bad) or 'missing'}): "
                f"the datastore is damaged; {REBUILD.format(datastore_path)} --keys"
            )
        self._bm = _bm25s().BM25.load(str(folder), mmap=True, show_progress=False)
        self._vocab = len(self._bm.scores["indptr"]) - 1

    def rank(self, query: np.ndarray) -> np.ndarray:
        """Document ids with a positive score for the distinct tokens of ``query``, best first
        (ties: lower id first); empty if no query token occurs in the corpus."""
        q = np.unique(np.asarray(query, np.int64))
        q = q[(q >= 0) & (q < self._vocab)]
        if q.size == 0:
            return np.empty(0, np.int64)
        scores = self._bm.get_scores_from_ids(q.tolist())
        hit = np.flatnonzero(scores > 0)
        return hit[np.lexsort((hit, -scores[hit]))].astype(np.int64)
