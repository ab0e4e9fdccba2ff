"""Writing a datastore version: tokenize, build the suffix array, write the files, swap in atomically.

How the version is put in place at PATH (lock, swap, recovery) is ``retrieval.swap``'s job.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import lmdb
import numpy as np
from tqdm import tqdm

from retrodraft.index import suffix_array
from retrodraft.retrieval.arrow_files import fsync, write_arrow
from retrodraft.retrieval.corpus import Document, EmptyCorpusError, SkipCounts
from retrodraft.retrieval.drafters import join_documents
from retrodraft.retrieval.errors import DatastoreError, ShardTooLargeError
from retrodraft.retrieval.layout import (
    DBS, FORMAT_VERSION, MAP_SIZE, MARKER, check_lmdb_header, key, marker_bytes, pack, unpack,
)
from retrodraft.retrieval.swap import carry_user_files, check_replaceable, make_build_dir, swap_in, tidy, writer_lock

if TYPE_CHECKING:
    from retrodraft.retrieval.store import Datastore

BATCH_CHARS = 1 << 20
# Most stream positions (tokens + separators) one datastore takes. Positions are int64
# throughout, but the suffix array build holds ~17 bytes a position in memory (36 GiB here):
# past this, build in shards (retrieval.shard_build), which is also how builds use many cores.
MAX_STREAM = 1 << 31

PIECE_CHARS = 1 << 16  # longest text handed to the tokenizer at once: its memory is ~100x the text's

log = logging.getLogger(__name__)


@dataclass
class BuildStats:
    """What one build or append did.

    documents, tokens              added by this call (tokens exclude the -1 separators)
    total_documents, total_tokens  in the datastore afterwards
    bytes_on_disk                  size of the datastore's files afterwards
    seconds                        per phase: read, tokenize, suffix_array, [keys, bm25,] write
    skipped                        the corpus walk's counts, if the caller passed them
    state                          the learned state: "carried" over, "dropped" with the version
                                   this build replaced, or "none" (there was none)
    """

    documents: int
    tokens: int
    total_documents: int
    total_tokens: int
    bytes_on_disk: int
    seconds: dict[str, float]
    skipped: SkipCounts | None
    state: str = "none"

    def tokens_per_second(self) -> dict[str, float]:
        """Per phase: read and tokenize over the tokens added, the rest over all tokens."""
        work = {"read": self.tokens, "tokenize": self.tokens, "keys": self.tokens}
        return {k: work.get(k, self.total_tokens) / max(s, 1e-9) for k, s in self.seconds.items()}


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits of SHA-256 over the tokenizer's full state.

    For a fast tokenizer: the backend's JSON (vocabulary, merges, added tokens with their
    flags, normaliser, pre-tokeniser, post-processor, decoder) without the truncation and
    padding settings a call may change; for a slow one: the vocabulary and the added tokens
    with their flags. Both: the special tokens. Equal for tokenizers that turn every text
    into the same ids, whatever their file paths or names; ~0.3-0.8 s for a 50k vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for volatile in ("truncation", "padding"):
            state.pop(volatile, None)
    else:
        added = getattr(tokenizer, "added_tokens_decoder", {})
        state = [sorted(tokenizer.get_vocab().items()), sorted((i, repr(t)) for i, t in added.items())]
    h = hashlib.sha256(json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(sorted(set(tokenizer.all_special_tokens)), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:16]


def tokenizer_info(tokenizer) -> dict:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return {"name": str(name), "fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer)}


# A cut before a space that follows a non-space splits no pre-token of byte-level BPE
# (GPT-2, Llama 3 and Qwen patterns attach a space to the word after it, never to the one
# before), WordPiece or Metaspace tokenizers: the pieces' ids, concatenated, are the
# document's. PROBES checks that once per build for the tokenizer at hand.
_CUT = re.compile(r"(?<=\S) ")
PROBES = ("Hello world, this is  a test.", "def f(x):\n    return x + 1  # done", "3.14 is pi;  ok!\n\nNext")


def pieces(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters, each cut before the
    last space that follows a non-space in its window, or at ``limit`` where a window has
    none (a hard cut: the tokens right at it may differ from the whole text's)."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        last = None
        for last in _CUT.finditer(text, start + 1, end + 1):
            pass
        cut = last.start() if last is not None else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _pieces_of(documents: Iterable[Document], rows: list, path_ids: dict, bar, timing: dict) -> Iterator[tuple[str, bool]]:
    """(piece, whether it ends its document) for every document, recording its row and path."""
    it = iter(documents)
    while True:
        t0 = time.perf_counter()
        doc = next(it, None)
        timing["read"] += time.perf_counter() - t0
        if doc is None:
            return
        rows.append((path_ids.setdefault(doc.path, len(path_ids)), doc.index))
        bar.update()
        held = None
        for p in pieces(doc.text, PIECE_CHARS):
            if held is not None:
                yield held, False
            held = p
        yield held, True


def _cuts_cleanly(backend) -> bool:
    """Whether cutting at each place ``pieces`` may cut keeps the ids of the whole text (on PROBES)."""
    def ids(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    return all(ids(t[: m.start()]) + ids(t[m.start():]) == ids(t) for t in PROBES for m in _CUT.finditer(t))


def _tokenize(documents: Iterable[Document], tokenizer, progress: bool, seconds: dict) -> tuple:
    """Encode documents in batches of ~BATCH_CHARS characters, each document in ``pieces``
    of at most PIECE_CHARS, so memory does not grow with the longest document.

    Returns (stream chunks: int32 arrays, each document followed by -1; lengths int64 [D];
    rows int64 [D, 2] of (path id, record); paths: list of source paths by id).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"building a datastore needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    if not _cuts_cleanly(backend):
        log.warning("this tokenizer merges across spaces: documents longer than %d characters are tokenized in "
                    "pieces whose ids may differ from the whole document's at each cut", PIECE_CHARS)
    chunks, lengths, rows, path_ids = [], [], [], {}
    partial: list[np.ndarray] = []  # ids of the pieces so far of the document being encoded
    timing = {"read": 0.0, "tokenize": 0.0}

    def encode(batch: list[tuple[str, bool]]) -> None:
        t0 = time.perf_counter()
        encoded = backend.encode_batch_fast([p for p, _ in batch], add_special_tokens=False)
        done = []
        for (_, last), e in zip(batch, encoded):
            partial.append(np.asarray(e.ids, np.int32))
            if last:
                done.append(np.concatenate(partial))
                partial.clear()
        if done:
            chunks.append(join_documents(done)[0])
            lengths.extend(len(a) for a in done)
        timing["tokenize"] += time.perf_counter() - t0
        tok_bar.update(sum(len(e.ids) for e in encoded))

    with tqdm(desc="read", unit=" docs", disable=not progress) as read_bar, \
            tqdm(desc="tokenize", unit=" tok", unit_scale=True, disable=not progress) as tok_bar:
        batch, chars = [], 0
        for piece, last in _pieces_of(documents, rows, path_ids, read_bar, timing):
            batch.append((piece, last))
            chars += len(piece)
            if chars >= BATCH_CHARS:
                encode(batch)
                batch, chars = [], 0
        if batch:
            encode(batch)
    seconds.update(timing)
    if not rows:
        raise EmptyCorpusError("no documents to add to the datastore")
    return chunks, np.asarray(lengths, np.int64), np.asarray(rows, np.int64).reshape(-1, 2), list(path_ids)


def write_version(path: Path, base: Datastore | None, documents, tokenizer, progress: bool, skipped,
                  state_from: Datastore | None = None, keys=None) -> BuildStats:
    """Build the next version of the datastore at ``path`` (``base``'s documents first) and swap it in.

    Holds ``PATH.lock`` throughout, so writers of one path run one after another. The state
    of ``state_from`` (``base`` when appending) is carried over; files in ``path`` that the
    datastore did not create are carried over too. FileExistsError if ``path`` holds
    something that is not a datastore; DatastorePermissionError where a write is refused.
    ``keys``: a ``keys_store.KeyBuilder`` whose NEST files join this version, or None for none.
    """
    state_from = base or state_from
    check_replaceable(path)  # before the lock: refusing leaves nothing beside a user's directory
    with writer_lock(path):
        tidy(path)
        check_replaceable(path)
        if base is not None:
            base._check_current()  # another writer swapped a new version in while this one waited
        tmp = make_build_dir(path)
        lock = os.open(tmp / "build.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            os.chmod(tmp, 0o755)
            info = tokenizer_info(tokenizer)
            seconds: dict[str, float] = {}
            chunks, lengths, rows, paths = _tokenize(documents, tokenizer, progress, seconds)
            stream, offsets = _extend(base, chunks, lengths)
            del chunks

            t0 = time.perf_counter()
            with tqdm(total=stream.shape[0], desc="suffix array", unit=" tok", unit_scale=True,
                      disable=not progress) as bar:
                sa = suffix_array.build(stream)
                bar.update(stream.shape[0])
            seconds["suffix_array"] = time.perf_counter() - t0

            key_arrays, key_meta = {}, None
            if keys is not None:
                key_arrays, key_meta, key_seconds = keys(tmp, stream, offsets, base, progress)
                seconds.update(key_seconds)

            t0 = time.perf_counter()
            max_token = int(stream.max(initial=-1))
            files = _write_arrays(tmp, {"tokens": stream, "doc_offsets": offsets, "suffix_array": sa, **key_arrays},
                                  progress)
            del stream, sa, key_arrays
            added = {
                "op": "append" if base else "build", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "documents": len(lengths), "tokens": int(lengths.sum()), "batch_chars": BATCH_CHARS,
                "skipped": skipped.as_dict() if skipped else None,
            }
            meta = {
                "format_version": FORMAT_VERSION, "tokenizer": info, "max_token": max_token,
                "documents": offsets.shape[0] - 1, "tokens": (base.num_tokens if base else 0) + added["tokens"],
                "history": (base.meta["history"] if base else []) + [added], "files": files,
                **({"keys": key_meta} if key_meta is not None else {}),
            }
            (tmp / MARKER).write_bytes(marker_bytes())
            fsync(tmp / MARKER)
            state = "carried" if state_from else "dropped" if _has_state(path) else "none"
            _write_tables_and_swap(tmp, path, base, state_from, meta, rows, offsets, lengths, paths)
            seconds["write"] = time.perf_counter() - t0
        finally:
            os.close(lock)
            # tmp now holds the partial build or, after the swap, the replaced version (or
            # nothing): debris either way, and what a failure here leaves is removed by the next
            # build or opener.
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return BuildStats(added["documents"], added["tokens"], meta["documents"], meta["tokens"], size, seconds, skipped,
                      state)


def _has_state(path: Path) -> bool:
    """Whether the datastore at ``path`` (about to be replaced) holds learned state."""
    try:
        check_lmdb_header(path / "meta.lmdb" / "data.mdb", path)
        env = lmdb.open(str(path / "meta.lmdb"), readonly=True, lock=False, max_dbs=len(DBS), map_size=MAP_SIZE,
                        create=False)
    except (lmdb.Error, DatastoreError):
        return False
    try:
        with env.begin() as txn:
            return txn.stat(env.open_db(b"state", txn=txn, create=False))["entries"] > 0
    except lmdb.Error:
        return False
    finally:
        env.close()


def _extend(base: Datastore | None, chunks: list[np.ndarray], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The new version's stream and doc offsets: ``base``'s documents (copied), then the new ones."""
    old = base.doc_offsets if base else np.zeros(1, np.int64)
    size = int(old[-1]) + int(np.sum(lengths + 1))
    if size > MAX_STREAM:
        raise ShardTooLargeError(
            f"{size:,} tokens and separators would go into one datastore, more than its limit of {MAX_STREAM:,}; "
            f"build it in shards of at most that size: python tools/build_index.py CORPUS --out DIR "
            f"--shards {-(-size // MAX_STREAM) * 2} (or more)")
    stream = np.concatenate(([base.tokens] if base else []) + chunks)
    return stream, np.concatenate([old, old[-1] + np.cumsum(lengths + 1)])


def _write_arrays(tmp: Path, arrays: dict[str, np.ndarray], progress: bool) -> dict:
    with tqdm(total=sum(a.nbytes for a in arrays.values()), desc="write", unit="B", unit_scale=True,
              disable=not progress) as bar:
        files = {}
        for name, a in arrays.items():
            files[name] = write_arrow(tmp, name, a)
            bar.update(a.nbytes)
    return files


def _write_tables_and_swap(tmp: Path, path: Path, base, state_from, meta: dict, rows, offsets, lengths,
                           paths) -> None:
    """Fill meta.lmdb in ``tmp`` (the meta record last, marking it complete), carry the
    user's files over and swap ``tmp`` in."""
    env = lmdb.open(str(tmp / "meta.lmdb"), max_dbs=len(DBS), map_size=MAP_SIZE)
    try:
        dbs = {name: env.open_db(name) for name in DBS}
        _write_documents(env, dbs, base, rows, offsets, lengths, paths)
        with _held_state(state_from) as state:
            with env.begin(write=True) as txn:
                txn.cursor(dbs[b"state"]).putmulti(state, append=True)
                txn.put(b"meta", pack(json.dumps(meta).encode("utf-8"), b"meta"), db=dbs[b"meta"])
            env.close()
            if path.is_dir():
                carry_user_files(path, tmp)
            swap_in(tmp, path)
    finally:
        env.close()


@contextmanager
def _held_state(base: Datastore | None) -> Iterator:
    """(key, value) pairs of ``base``'s state, its write lock held until the block ends.

    Held across the swap: no state committed to the old version can be missed, and no
    other append can swap in between (it would find the old version replaced: stale).
    """
    if base is None:
        yield iter(())
        return
    with base._env.begin(write=True, db=base._dbs[b"state"]) as txn:  # values stay framed: copied as they are
        base._check_current()
        yield txn.cursor().iternext()


def _write_documents(env, dbs, base: Datastore | None, rows, offsets, lengths, paths: list[str]) -> None:
    """Fill the paths and docs tables: ``base``'s rows first (copied), then the new documents."""
    with env.begin(write=True) as txn:
        path_ids: dict[str, int] = {}
        if base:
            with base._env.begin() as old:
                txn.cursor(dbs[b"docs"]).putmulti(old.cursor(base._dbs[b"docs"]).iternext(), append=True)
                for k, v in old.cursor(base._dbs[b"paths"]).iternext():
                    name = unpack(v, f"path {int.from_bytes(k, 'big')}", base.path, k).decode("utf-8")
                    path_ids[name] = int.from_bytes(k, "big")
                    txn.put(k, v, db=dbs[b"paths"], append=True)
        # A path seen before keeps its id; new ones are numbered after the old ones.
        remap = np.empty(len(paths), np.int64)
        for i, p in enumerate(paths):
            if p not in path_ids:
                path_ids[p] = len(path_ids)
                k = key(path_ids[p])
                txn.put(k, pack(p.encode("utf-8"), k), db=dbs[b"paths"])
            remap[i] = path_ids[p]
        first = offsets.shape[0] - 1 - lengths.shape[0]
        table = np.stack([remap[rows[:, 0]], rows[:, 1], offsets[first:-1], lengths], axis=1).astype("<i8")
        framed = ((k, pack(r.tobytes(), k)) for k, r in ((key(first + i), r) for i, r in enumerate(table)))
        txn.cursor(dbs[b"docs"]).putmulti(framed, append=True)

