"""Writing a datastore version: tokenize, build the suffix array, write the files, swap in atomically.

Builds and appends write a sibling ``PATH.incomplete-XXXX`` and swap it in with one atomic
rename (renameat2 RENAME_EXCHANGE), so a crash at any moment leaves the old or the new
datastore at PATH, never a half-written one; debris of killed builds (their lock no longer
held) is removed by the next build.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
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
from retrodraft.retrieval.errors import ShardTooLargeError
from retrodraft.retrieval.layout import DBS, FORMAT_VERSION, MAP_SIZE, key

if TYPE_CHECKING:
    from retrodraft.retrieval.store import Datastore

BATCH_CHARS = 1 << 20
# Most stream positions (tokens + separators) one datastore takes. Positions are int64
# throughout, but the suffix array build holds ~17 bytes a position in memory (36 GiB here):
# past this, build in shards (retrieval.shard_build), which is also how builds use many cores.
MAX_STREAM = 1 << 31


@dataclass
class BuildStats:
    """What one build or append did.

    documents, tokens              added by this call (tokens exclude the -1 separators)
    total_documents, total_tokens  in the datastore afterwards
    bytes_on_disk                  size of the datastore's files afterwards
    seconds                        per phase: read, tokenize, suffix_array, write
    skipped                        the corpus walk's counts, if the caller passed them
    """

    documents: int
    tokens: int
    total_documents: int
    total_tokens: int
    bytes_on_disk: int
    seconds: dict[str, float]
    skipped: SkipCounts | None

    def tokens_per_second(self) -> dict[str, float]:
        """Per phase: read and tokenize over the tokens added, the rest over all tokens."""
        work = {"read": self.tokens, "tokenize": self.tokens}
        return {k: work.get(k, self.total_tokens) / max(s, 1e-9) for k, s in self.seconds.items()}



def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits of SHA-256 over the vocabulary (token -> id) and the special tokens.

    Equal for tokenizers that map the same strings to the same ids, whatever their file
    paths or names; ~0.1 s for a 50k vocabulary.
    """
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab)
    h = hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode("utf-8"))
    h.update(np.fromiter(map(vocab.__getitem__, tokens), np.int64, len(tokens)).tobytes())
    h.update(json.dumps(sorted(set(tokenizer.all_special_tokens)), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:16]


def tokenizer_info(tokenizer) -> dict:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return {"name": str(name), "fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer)}



def _tokenize(documents: Iterable[Document], tokenizer, progress: bool, seconds: dict) -> tuple:
    """Encode documents in batches of ~BATCH_CHARS characters.

    Returns (stream chunks: int32 arrays, each document followed by -1; lengths int64 [D];
    rows int64 [D, 2] of (path id, record); paths: list of source paths by id).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"building a datastore needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    chunks, lengths, rows, path_ids = [], [], [], {}
    batch: list[str] = []
    chars, t_read, t_tok = 0, 0.0, 0.0
    it = iter(documents)
    with tqdm(desc="read", unit=" docs", disable=not progress) as read_bar, \
            tqdm(desc="tokenize", unit=" tok", unit_scale=True, disable=not progress) as tok_bar:
        while True:
            t0 = time.perf_counter()
            doc = next(it, None)
            t_read += time.perf_counter() - t0
            if doc is not None:
                rows.append((path_ids.setdefault(doc.path, len(path_ids)), doc.index))
                batch.append(doc.text)
                chars += len(doc.text)
                read_bar.update()
            if batch and (doc is None or chars >= BATCH_CHARS):
                t0 = time.perf_counter()
                encoded = backend.encode_batch_fast(batch, add_special_tokens=False)
                ids = [np.asarray(e.ids, np.int32) for e in encoded]
                chunks.append(join_documents(ids)[0])
                lengths.extend(len(a) for a in ids)
                t_tok += time.perf_counter() - t0
                tok_bar.update(sum(len(a) for a in ids))
                batch, chars = [], 0
            if doc is None:
                break
    seconds.update(read=t_read, tokenize=t_tok)
    if not rows:
        raise EmptyCorpusError("no documents to add to the datastore")
    return chunks, np.asarray(lengths, np.int64), np.asarray(rows, np.int64).reshape(-1, 2), list(path_ids)


def write_version(path: Path, base: Datastore | None, documents, tokenizer, progress: bool, skipped) -> BuildStats:
    """Build the next version of the datastore at ``path`` (``base``'s documents first) and swap it in."""
    if path.exists() and not (path / "meta.lmdb").is_dir():
        raise FileExistsError(f"{path} exists and is not a datastore; not replacing it: choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_debris(path)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".incomplete-", dir=path.parent))
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
        with tqdm(total=stream.shape[0], desc="suffix array", unit=" tok", unit_scale=True, disable=not progress) as bar:
            sa = suffix_array.build(stream)
            bar.update(stream.shape[0])
        seconds["suffix_array"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        files = _write_arrays(tmp, {"tokens": stream, "doc_offsets": offsets, "suffix_array": sa}, progress)
        del stream, sa
        added = {
            "op": "append" if base else "build", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "documents": len(lengths), "tokens": int(lengths.sum()), "batch_chars": BATCH_CHARS,
            "skipped": skipped.as_dict() if skipped else None,
        }
        meta = {
            "format_version": FORMAT_VERSION, "tokenizer": info,
            "documents": offsets.shape[0] - 1, "tokens": (base.num_tokens if base else 0) + added["tokens"],
            "history": (base.meta["history"] if base else []) + [added], "files": files,
        }
        _write_tables_and_swap(tmp, path, base, meta, rows, offsets, lengths, paths)
        seconds["write"] = time.perf_counter() - t0
    finally:
        os.close(lock)
        # tmp now holds the partial build or, after the swap, the replaced version (or nothing):
        # debris either way, and what a failure here leaves is removed by the next build.
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return BuildStats(added["documents"], added["tokens"], meta["documents"], meta["tokens"], size, seconds, skipped)


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


def _write_tables_and_swap(tmp: Path, path: Path, base, meta: dict, rows, offsets, lengths, paths) -> None:
    """Fill meta.lmdb in ``tmp`` (the meta record last, marking it complete) and swap ``tmp`` in."""
    env = lmdb.open(str(tmp / "meta.lmdb"), max_dbs=len(DBS), map_size=MAP_SIZE)
    try:
        dbs = {name: env.open_db(name) for name in DBS}
        _write_documents(env, dbs, base, rows, offsets, lengths, paths)
        with _held_state(base) as state:
            with env.begin(write=True) as txn:
                txn.cursor(dbs[b"state"]).putmulti(state, append=True)
                txn.put(b"meta", json.dumps(meta).encode("utf-8"), db=dbs[b"meta"])
            env.close()
            _swap_in(tmp, path)
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
    with base._env.begin(write=True, db=base._dbs[b"state"]) as txn:
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
                    path_ids[v.decode("utf-8")] = int.from_bytes(k, "big")
                    txn.put(k, v, db=dbs[b"paths"], append=True)
        # A path seen before keeps its id; new ones are numbered after the old ones.
        remap = np.empty(len(paths), np.int64)
        for i, p in enumerate(paths):
            if p not in path_ids:
                path_ids[p] = len(path_ids)
                txn.put(key(path_ids[p]), p.encode("utf-8"), db=dbs[b"paths"])
            remap[i] = path_ids[p]
        first = offsets.shape[0] - 1 - lengths.shape[0]
        table = np.stack([remap[rows[:, 0]], rows[:, 1], offsets[first:-1], lengths], axis=1).astype("<i8")
        txn.cursor(dbs[b"docs"]).putmulti(((key(first + i), r.tobytes()) for i, r in enumerate(table)), append=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Make ``tmp`` the datastore at ``path``; the replaced version, if any, ends up at ``tmp``."""
    fsync(tmp)
    if not path.exists():
        os.rename(tmp, path)
    elif not _exchange(tmp, path):
        # No atomic exchange on this system: PATH is missing between these two renames,
        # and the old version waits aside until the new one is in.
        aside = tmp.with_name(tmp.name + "-old")
        os.rename(path, aside)
        os.rename(tmp, path)
        os.rename(aside, tmp)
    fsync(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove_debris(path: Path) -> None:
    """Delete PATH.incomplete-* directories whose build lock no process holds (killed builds)."""
    for d in glob.glob(glob.escape(str(path)) + ".incomplete-*"):
        try:
            fd = os.open(Path(d) / "build.lock", os.O_RDWR)
        except FileNotFoundError:
            continue  # a build that has not taken its lock yet, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(d)
        except BlockingIOError:
            pass  # a live build
        finally:
            os.close(fd)

