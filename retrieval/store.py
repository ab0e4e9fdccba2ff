"""The persistent datastore: a tokenized corpus, its suffix array and state learned online.

A datastore is a directory PATH:

  meta.lmdb/          LMDB environment with four named databases
      meta    b"meta" -> JSON: format version, tokenizer (name, fingerprint, vocab size),
              document and token counts, build history, size and block CRC32s of each
              Arrow file. Written last: a directory without it is incomplete.
      paths   path id (8-byte big-endian) -> source path (UTF-8)
      docs    doc id (8-byte big-endian) -> int64 LE (path id, record index, start, length)
      state   name NUL key -> one array in .npy format; name NUL alone marks that the name
              was saved (so an empty dict round-trips)
  tokens.arrow        int32 [T + D]  every document's tokens followed by -1
  doc_offsets.arrow   int64 [D + 1]  document d is tokens[offsets[d] : offsets[d + 1] - 1]
  suffix_array.arrow  int64 [T + D]  ``index.suffix_array.build(tokens)``
  build.lock          flock-ed by the process that builds the directory

(T tokens in D documents.) Builds and appends write a sibling ``PATH.incomplete-XXXX`` and
swap it in with one atomic rename (renameat2 RENAME_EXCHANGE), so a crash at any moment
leaves the old or the new datastore at PATH, never a half-written one; debris of killed
builds (their lock no longer held) is removed by the next build.

Concurrency: any number of processes may read; state is written in single LMDB write
transactions, which LMDB serialises across processes. A process whose datastore was
replaced under it (rebuilt, or appended to by another process) keeps reading its old
version; saving state then raises StaleDatastoreError instead of writing into the old one.
One Datastore per path per process (an LMDB rule).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import lmdb
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from retrodraft.index import suffix_array
from retrodraft.retrieval.corpus import Document, EmptyCorpusError, SkipCounts
from retrodraft.retrieval.drafters import CorpusDrafter, Drafter, join_documents
from retrodraft.retrieval.online import OnlineState

FORMAT_VERSION = 1
ONLINE_STATE = "online"  # what generation learns: outputs, lengths, recycling, calibration_*
# Address space reserved for meta.lmdb (the file grows only as written). Every opener uses
# the same value, so a reader never meets a map grown by a writer (MDB_MAP_RESIZED).
_MAP_SIZE = 1 << 36
_CRC_BLOCK = 1 << 25
_BATCH_CHARS = 1 << 20
_ARROW = {"tokens": ("token", np.int32), "doc_offsets": ("offset", np.int64), "suffix_array": ("position", np.int64)}
_DBS = (b"meta", b"paths", b"docs", b"state")
_BUILD = "python tools/build_index.py CORPUS --out {}"
_REBUILD = "rebuild it with: " + _BUILD


class DatastoreError(Exception):
    """Base of the errors a datastore raises about itself."""


class IncompleteDatastoreError(DatastoreError):
    """The directory has no completed metadata (an interrupted build, or not a datastore)."""


class CorruptDatastoreError(DatastoreError):
    """An Arrow file's size or checksum differs from the metadata."""


class FormatVersionError(DatastoreError):
    """The datastore was written in a format this code does not read."""


class TokenizerMismatchError(DatastoreError):
    """The datastore's tokenizer is not the one given."""


class ReadOnlyDatastoreError(DatastoreError):
    """A write was asked of a datastore opened with readonly=True."""


class StaleDatastoreError(DatastoreError):
    """The datastore at the path was replaced after this process opened it."""


class Location(NamedTuple):
    """Where a stream position came from: source file, record in it, token offset in the document."""

    path: str
    record: int
    offset: int


class DocumentEntry(NamedTuple):
    """A row of the document table: source, record, and the document's span in the stream."""

    path: str
    record: int
    start: int
    length: int


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


def _tokenizer_info(tokenizer) -> dict:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return {"name": str(name), "fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer)}


class Datastore:
    """A datastore directory, open for reading (and for writing state if readonly=False).

    Get one from ``Datastore.open`` or ``Datastore.build``; use it as a context manager or
    call ``close``. Arrays it hands out are read-only views into memory maps; they stay
    valid after ``close`` (the mapping lives as long as a view does).
    """

    path: Path
    readonly: bool
    meta: dict
    stats: BuildStats | None

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = True, tokenizer=None) -> Datastore:
        """Open the datastore at ``path``, checking it before anything is read from it.

        Verifies the format version (FormatVersionError), that the build completed
        (IncompleteDatastoreError), each Arrow file's size and CRC32 (CorruptDatastoreError)
        and, if ``tokenizer`` is given, its fingerprint (TokenizerMismatchError naming
        both). Raises FileNotFoundError if there is nothing at ``path``. With
        ``readonly=False`` the state can be written (``save_state``, ``append``).
        """
        ds = cls.__new__(cls)
        ds._attach(Path(path).absolute(), readonly)
        ds.stats = None
        if tokenizer is not None:
            try:
                ds.check_tokenizer(tokenizer)
            except DatastoreError:
                ds.close()
                raise
        return ds

    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        documents: Iterable[Document],
        tokenizer,
        *,
        progress: bool = True,
        skipped: SkipCounts | None = None,
    ) -> Datastore:
        """Tokenize ``documents`` and write a datastore at ``path``, replacing any there.

        ``tokenizer``: a Hugging Face fast tokenizer (it needs ``backend_tokenizer``);
        texts are encoded without special tokens, in batches, on all cores (the Rust
        tokenizer's own threads: measured faster than a process pool here). ``skipped``:
        the SkipCounts the corpus walk fills, recorded in the stats and metadata.
        ``progress`` shows a bar per phase on stderr. An existing directory at ``path``
        is replaced only if it is a datastore (FileExistsError otherwise); the swap is
        atomic. Raises EmptyCorpusError if there are no documents. Returns the new
        datastore, opened read-only, with ``stats`` set.
        """
        path = Path(path).absolute()
        stats = _write_version(path, None, documents, tokenizer, progress, skipped)
        ds = cls.open(path)
        ds.stats = stats
        return ds

    def append(
        self, documents: Iterable[Document], tokenizer, *, progress: bool = True, skipped: SkipCounts | None = None
    ) -> BuildStats:
        """Add ``documents`` after the existing ones and swap the new version in atomically.

        Old documents are copied, not re-tokenized; the suffix array is rebuilt over the
        whole stream; online state is carried over. Needs readonly=False and the same
        tokenizer (TokenizerMismatchError). If another process replaced the datastore
        since this one opened it, raises StaleDatastoreError and changes nothing. Other
        state writers wait only while the state is copied and the version swapped. This
        object then reads the new version; returns the stats (also in ``self.stats``).
        """
        self._writable("append to")
        self.check_tokenizer(tokenizer)
        self.stats = _write_version(self.path, self, documents, tokenizer, progress, skipped)
        self.close()
        self._attach(self.path, readonly=False)
        return self.stats

    # ---- reading -----------------------------------------------------------------------

    @property
    def tokens(self) -> np.ndarray:
        """int32 [num_tokens + num_documents]: the stream, -1 after each document (read-only view)."""
        return self._live()["tokens"]

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 [num_documents + 1]: document d is tokens[o[d] : o[d + 1] - 1] (read-only view)."""
        return self._live()["doc_offsets"]

    @property
    def suffix_array(self) -> np.ndarray:
        """int64 [len(tokens)]: suffix array of ``tokens`` (read-only view)."""
        return self._live()["suffix_array"]

    @property
    def num_documents(self) -> int:
        return self.meta["documents"]

    @property
    def num_tokens(self) -> int:
        """Tokens of all documents, separators not counted."""
        return self.meta["tokens"]

    @property
    def tokenizer_name(self) -> str:
        return self.meta["tokenizer"]["name"]

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def check_tokenizer(self, tokenizer) -> None:
        """Raise TokenizerMismatchError, naming both tokenizers, unless ``tokenizer`` is the datastore's."""
        theirs = _tokenizer_info(tokenizer)
        if theirs["fingerprint"] != self.fingerprint:
            raise TokenizerMismatchError(
                f"the datastore at {self.path} was built with tokenizer {self.tokenizer_name!r} "
                f"(fingerprint {self.fingerprint}), not {theirs['name']!r} (fingerprint "
                f"{theirs['fingerprint']}); drafts would be the wrong token ids. Rebuild it with "
                f"that model's tokenizer: python tools/build_index.py CORPUS --model MODEL --out {self.path}"
            )

    def document(self, doc_id: int) -> DocumentEntry:
        """The document table's row for ``doc_id`` in [0, num_documents) (ValueError outside)."""
        if not 0 <= doc_id < self.num_documents:
            raise ValueError(f"doc_id must be in [0, {self.num_documents}), got {doc_id}")
        with self._env.begin() as txn:
            path_id, record, start, length = np.frombuffer(txn.get(_key(doc_id), db=self._dbs[b"docs"]), "<i8")
            path = txn.get(_key(int(path_id)), db=self._dbs[b"paths"]).decode("utf-8")
        return DocumentEntry(path, int(record), int(start), int(length))

    def locate(self, position: int) -> Location:
        """Source of stream position ``position``: (path, record index, token offset in the document).

        ValueError if the position is outside the stream or on a separator.
        """
        tokens = self.tokens
        if not 0 <= position < tokens.shape[0] or tokens[position] < 0:
            raise ValueError(f"position must be a token of the stream [0, {tokens.shape[0]}), got {position}")
        doc = int(np.searchsorted(self.doc_offsets, position, side="right")) - 1
        entry = self.document(doc)
        return Location(entry.path, entry.record, position - entry.start)

    # ---- online state --------------------------------------------------------------------

    def save_state(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Replace the state saved under ``name`` with ``arrays``, in one write transaction.

        Either all of ``arrays`` is committed or none (a crash keeps the previous state).
        Blocks while another process writes. Arrays are stored as copies (any shape and
        dtype but object). Needs readonly=False; StaleDatastoreError if the datastore at
        the path is no longer the one this object opened (reopen it and save again).
        """
        env = self._writable("save state in")
        prefix = _state_prefix(name)
        blobs = {}
        for k, a in arrays.items():
            if not isinstance(k, str) or "\0" in k or not isinstance(a, np.ndarray) or a.dtype.hasobject:
                raise ValueError(
                    f"state arrays need str keys without NUL and non-object ndarrays, got {k!r}: {type(a).__name__}"
                )
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, allow_pickle=False)
            blobs[prefix + k.encode("utf-8")] = buf.getvalue()
        with env.begin(write=True, db=self._dbs[b"state"]) as txn:
            self._check_current()
            cur = txn.cursor()
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    cur.delete()
            txn.put(prefix, b"")
            for k, blob in blobs.items():
                txn.put(k, blob)

    def load_state(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays last committed under ``name`` (new arrays, copies), or None if never saved."""
        prefix = _state_prefix(name)
        with self._live_env().begin(db=self._dbs[b"state"]) as txn:
            cur = txn.cursor()
            if not cur.set_key(prefix):
                return None
            out = {}
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                if k != prefix:
                    out[k[len(prefix):].decode("utf-8")] = np.lib.format.read_array(io.BytesIO(v), allow_pickle=False)
            return out

    # ---- drafting ----------------------------------------------------------------------------

    def online(self, vocab_size: int) -> OnlineState:
        """What generation learned with this datastore (past outputs, recycling matrix),
        loaded on first use and shared by every call in this process."""
        if self._online is None:
            saved = self.load_state(ONLINE_STATE) or {}
            outputs = []
            if "outputs" in saved:
                bounds = np.concatenate(([0], np.cumsum(saved["lengths"])))
                outputs = [saved["outputs"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            rows = saved.get("recycling")
            calibration = {k[len("calibration_"):]: v for k, v in saved.items() if k.startswith("calibration_")}
            if rows is not None and rows.shape[0] != vocab_size:
                raise ValueError(f"the datastore's recycling matrix has {rows.shape[0]} rows, the model's "
                                 f"vocabulary {vocab_size}: was it built for another model?")
            self._online = OnlineState(vocab_size, outputs=outputs, recycling_rows=rows, calibration=calibration)
            self._outputs = outputs
        return self._online

    def drafters(self, vocab_size: int) -> list[Drafter]:
        """Fresh per-call drafters: the corpus (REST over the suffix array), past outputs
        and token recycling."""
        def locate(position: int) -> tuple[str, int]:
            loc = self.locate(position)
            return (loc.path if loc.record == 0 else f"{loc.path}#{loc.record}"), loc.offset

        return [CorpusDrafter(self.tokens, self.suffix_array, locate), *self.online(vocab_size).drafters()]

    def commit(self, output: np.ndarray) -> None:
        """Persist one call's output, the recycling matrix and the score calibration, in one
        write transaction.

        Keeps the newest outputs within the suffix tree's token budget. Does nothing on a
        read-only datastore (what was learned then lives only in this process).
        """
        if self.readonly or self._online is None:
            return
        self._outputs.append(np.asarray(output, np.int32).copy())
        budget = self._online.output_tree.max_tokens
        while sum(len(o) for o in self._outputs) > budget:
            self._outputs.pop(0)
        lengths = np.array([len(o) for o in self._outputs], np.int64)
        self.save_state(ONLINE_STATE, {
            "outputs": np.concatenate(self._outputs) if self._outputs else np.empty(0, np.int32),
            "lengths": lengths,
            "recycling": self._online.recycling.state()["rows"],
            **{f"calibration_{k}": v for k, v in self._online.calibrator.state().items()},
        })

    # ---- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the LMDB environment and drop this object's views (yours stay valid)."""
        if self._env is not None:
            self._env.close()
        self._env = None
        self._arrays = None

    def __enter__(self) -> Datastore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._env is None else "read-only" if self.readonly else "writable"
        return f"Datastore({str(self.path)!r}, {self.num_documents} documents, {self.num_tokens} tokens, {state})"

    def _attach(self, path: Path, readonly: bool) -> None:
        self.path, self.readonly = path, readonly
        self._online: OnlineState | None = None
        self._outputs: list[np.ndarray] = []
        self._env, self._arrays = None, None
        if not path.is_dir():
            raise FileNotFoundError(f"no datastore at {path}: build one with: {_BUILD.format(path)}")
        data = path / "meta.lmdb" / "data.mdb"
        if not data.is_file():
            raise IncompleteDatastoreError(
                f"{path} has no meta.lmdb/: not a datastore, or its build never finished; {_REBUILD.format(path)}"
            )
        st = os.stat(data)
        self._ident = (st.st_dev, st.st_ino)
        self._env = lmdb.open(str(data.parent), readonly=readonly, max_dbs=len(_DBS), map_size=_MAP_SIZE, create=False)
        try:
            self.meta = self._read_meta()
            version = self.meta.get("format_version")
            if version != FORMAT_VERSION:
                raise FormatVersionError(
                    f"the datastore at {path} has format version {version}; this code reads version "
                    f"{FORMAT_VERSION}: {_REBUILD.format(path)}"
                )
            self._arrays = _map_arrays(path, self.meta["files"])
        except BaseException:
            self.close()
            raise

    def _read_meta(self) -> dict:
        try:
            self._dbs = {name: self._env.open_db(name, create=False) for name in _DBS}
            with self._env.begin(db=self._dbs[b"meta"]) as txn:
                raw = txn.get(b"meta")
        except lmdb.NotFoundError:
            raw = None
        except (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError) as e:
            where = self.path / "meta.lmdb"
            raise CorruptDatastoreError(f"{where} is damaged ({e}); {_REBUILD.format(self.path)}") from e
        if raw is None:
            raise IncompleteDatastoreError(
                f"{self.path} has no completed metadata (an interrupted build?); {_REBUILD.format(self.path)}"
            )
        return json.loads(raw)

    def _live(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            raise ValueError(f"the datastore at {self.path} is closed")
        return self._arrays

    def _live_env(self) -> lmdb.Environment:
        self._live()
        return self._env

    def _writable(self, what: str) -> lmdb.Environment:
        env = self._live_env()
        if self.readonly:
            raise ReadOnlyDatastoreError(f"cannot {what} the datastore at {self.path}: open it with readonly=False")
        return env

    def _check_current(self) -> None:
        """Call inside a write transaction: replacing PATH happens only while holding it."""
        try:
            st = os.stat(self.path / "meta.lmdb" / "data.mdb")
            current = (st.st_dev, st.st_ino) == self._ident
        except FileNotFoundError:
            current = False
        if not current:
            raise StaleDatastoreError(
                f"the datastore at {self.path} was rebuilt or appended to by another process after "
                "this one opened it; nothing was written: open it again and retry"
            )


def _key(i: int) -> bytes:
    """Big-endian, so LMDB's byte order is numeric order (and appends go at the end)."""
    return i.to_bytes(8, "big")


def _state_prefix(name: str) -> bytes:
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"state name must be a non-empty str without NUL, got {name!r}")
    return name.encode("utf-8") + b"\0"


# ---- Arrow files ----------------------------------------------------------------------------


def _schema(name: str) -> pa.Schema:
    column, dtype = _ARROW[name]
    return pa.schema([(column, pa.from_numpy_dtype(dtype))])


def _block_crcs(bufs: list) -> list[list[int]]:
    """CRC32 of each _CRC_BLOCK-byte block of each buffer, on all cores (crc32 drops the GIL)."""
    views = [memoryview(b) for b in bufs]
    jobs = [(i, v[s : s + _CRC_BLOCK]) for i, v in enumerate(views) for s in range(0, len(v), _CRC_BLOCK)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        crcs = list(pool.map(lambda job: zlib.crc32(job[1]), jobs))
    out: list[list[int]] = [[] for _ in bufs]
    for (i, _), c in zip(jobs, crcs):
        out[i].append(c)
    return out


def _map_arrays(path: Path, files: dict) -> dict[str, np.ndarray]:
    """Map each Arrow file, check size and CRCs against ``files``, return zero-copy arrays."""
    bufs = {}
    for name, want in files.items():
        f = path / f"{name}.arrow"
        size = f.stat().st_size if f.is_file() else None
        if size != want["bytes"]:
            raise CorruptDatastoreError(
                f"{f} is {'missing' if size is None else f'{size} bytes'}, expected {want['bytes']} bytes: "
                f"the datastore is damaged; {_REBUILD.format(path)}"
            )
        with pa.memory_map(str(f)) as mm:
            bufs[name] = mm.read_buffer()
    for (name, buf), crcs in zip(bufs.items(), _block_crcs(list(bufs.values()))):
        bad = [i for i, (a, b) in enumerate(zip(crcs, files[name]["crc32"])) if a != b]
        if bad:
            raise CorruptDatastoreError(
                f"{path / f'{name}.arrow'} fails its checksum at byte {bad[0] * _CRC_BLOCK} "
                f"(block of {_CRC_BLOCK} bytes): the datastore is damaged; {_REBUILD.format(path)}"
            )
    arrays = {}
    for name, buf in bufs.items():
        reader = pa.ipc.open_file(buf)
        if reader.num_record_batches != 1 or reader.schema != _schema(name):
            raise CorruptDatastoreError(f"{path / f'{name}.arrow'} has an unexpected layout; {_REBUILD.format(path)}")
        arrays[name] = reader.get_batch(0).column(0).to_numpy(zero_copy_only=True)
    return arrays


def _write_arrow(path: Path, name: str, array: np.ndarray) -> dict:
    """Write ``array`` as the one-column Arrow IPC file ``name``.arrow, fsync it, return its size and CRCs."""
    schema = _schema(name)
    f = path / f"{name}.arrow"
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(array.astype(_ARROW[name][1], copy=False))], schema=schema))
    _fsync(f)
    with pa.memory_map(str(f)) as mm:
        buf = mm.read_buffer()
    return {"bytes": buf.size, "crc32": _block_crcs([buf])[0]}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- building -------------------------------------------------------------------------------


def _tokenize(documents: Iterable[Document], tokenizer, progress: bool, seconds: dict) -> tuple:
    """Encode documents in batches of ~_BATCH_CHARS characters.

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
            if batch and (doc is None or chars >= _BATCH_CHARS):
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


def _write_version(path: Path, base: Datastore | None, documents, tokenizer, progress: bool, skipped) -> BuildStats:
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
        info = _tokenizer_info(tokenizer)
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
            "documents": len(lengths), "tokens": int(lengths.sum()), "batch_chars": _BATCH_CHARS,
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
    stream = np.concatenate(([base.tokens] if base else []) + chunks)
    return stream, np.concatenate([old, old[-1] + np.cumsum(lengths + 1)])


def _write_arrays(tmp: Path, arrays: dict[str, np.ndarray], progress: bool) -> dict:
    with tqdm(total=sum(a.nbytes for a in arrays.values()), desc="write", unit="B", unit_scale=True,
              disable=not progress) as bar:
        files = {}
        for name, a in arrays.items():
            files[name] = _write_arrow(tmp, name, a)
            bar.update(a.nbytes)
    return files


def _write_tables_and_swap(tmp: Path, path: Path, base, meta: dict, rows, offsets, lengths, paths) -> None:
    """Fill meta.lmdb in ``tmp`` (the meta record last, marking it complete) and swap ``tmp`` in."""
    env = lmdb.open(str(tmp / "meta.lmdb"), max_dbs=len(_DBS), map_size=_MAP_SIZE)
    try:
        dbs = {name: env.open_db(name) for name in _DBS}
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
                txn.put(_key(path_ids[p]), p.encode("utf-8"), db=dbs[b"paths"])
            remap[i] = path_ids[p]
        first = offsets.shape[0] - 1 - lengths.shape[0]
        table = np.stack([remap[rows[:, 0]], rows[:, 1], offsets[first:-1], lengths], axis=1).astype("<i8")
        txn.cursor(dbs[b"docs"]).putmulti(((_key(first + i), r.tobytes()) for i, r in enumerate(table)), append=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Make ``tmp`` the datastore at ``path``; the replaced version, if any, ends up at ``tmp``."""
    _fsync(tmp)
    if not path.exists():
        os.rename(tmp, path)
    elif not _exchange(tmp, path):
        # No atomic exchange on this system: PATH is missing between these two renames,
        # and the old version waits aside until the new one is in.
        aside = tmp.with_name(tmp.name + "-old")
        os.rename(path, aside)
        os.rename(tmp, path)
        os.rename(aside, tmp)
    _fsync(path.parent)


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
