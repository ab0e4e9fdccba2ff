"""The persistent datastore: a tokenized corpus, its suffix array and state learned online.

The directory layout and concurrency rules are described in ``retrieval.layout``, building
in ``retrieval.build``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Iterable, NamedTuple

import lmdb
import numpy as np

from retrodraft.retrieval.arrow_files import map_arrays
from retrodraft.retrieval.build import BuildStats, tokenizer_info, write_version
from retrodraft.retrieval.corpus import Document, SkipCounts
from retrodraft.retrieval.drafters import CorpusDrafter, Drafter
from retrodraft.retrieval.errors import (
    CorruptDatastoreError,
    DatastoreError,
    DatastorePermissionError,
    FormatVersionError,
    IncompleteDatastoreError,
    MissingKeysError,
    ReadOnlyDatastoreError,
    StaleDatastoreError,
    TokenizerMismatchError,
)
from retrodraft.retrieval import learned
from retrodraft.retrieval.layout import (
    BUILD, DBS, FORMAT_VERSION, MAP_SIZE, REBUILD, check_lmdb_header, check_marker, key, pack, unpack,
)
from retrodraft.retrieval.manifest import is_sharded
from retrodraft.retrieval.online import LearnedMemory, OnlineState
from retrodraft.retrieval.swap import tidy_if_idle

log = logging.getLogger(__name__)


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
    def open(cls, path: str | os.PathLike, readonly: bool = True, tokenizer=None, *,
             scope: str = learned.DEFAULT_SCOPE, memory: LearnedMemory | int | None = None) -> Datastore:
        """Open the datastore at ``path``, checking it before anything is read from it.

        ``scope`` names whose learned state (past outputs, recycling, calibration) this
        object drafts from and commits to, over the shared corpus: outputs learned in one
        scope are never drafted in another. ``memory``: bytes the past outputs may take in
        this process (``retrieval.online.LearnedMemory``; an int is a total, None the default).

        A directory with a manifest opens as a ``shards.ShardedDatastore`` (every shard
        opened and checked, learned state in one place). Otherwise verifies the datastore's
        marker and format version (FormatVersionError), that the
        build completed (IncompleteDatastoreError), LMDB's header, the checksum of every
        metadata value it reads, each Arrow file's size and CRC32 (CorruptDatastoreError)
        and, if ``tokenizer`` is given, its fingerprint (TokenizerMismatchError naming
        both). Raises FileNotFoundError if there is nothing at ``path``. With
        ``readonly=False`` the state can be written (``save_state``, ``append``); without
        write access that raises DatastorePermissionError. Read-only, a datastore this
        process may not write to is opened without LMDB's lock file (a warning says so):
        reads are then not isolated from another process's state commit, which shows as a
        CorruptDatastoreError at worst, never as wrong values (every value is checksummed).
        If no writer holds ``PATH.lock`` and the directory is writable, first puts back a
        version an interrupted swap left aside and removes killed builds' debris.
        """
        path = Path(path).absolute()
        if cls is Datastore and is_sharded(path):
            from retrodraft.retrieval.shards import ShardedDatastore

            return ShardedDatastore.open(path, readonly, tokenizer, scope=scope, memory=memory)
        tidy_if_idle(path)
        ds = cls.__new__(cls)
        ds.scope, ds.memory = learned.check_scope(scope), LearnedMemory.of(memory)
        ds._attach(path, readonly)
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
        keep_state: bool = False,
        keys=None,
    ) -> Datastore:
        """Tokenize ``documents`` and write a datastore at ``path``, replacing any there.

        ``tokenizer``: a Hugging Face fast tokenizer (it needs ``backend_tokenizer``);
        texts are encoded without special tokens, in batches, on all cores (the Rust
        tokenizer's own threads: measured faster than a process pool here). ``skipped``:
        the SkipCounts the corpus walk fills, recorded in the stats and metadata.
        ``progress`` shows a bar per phase on stderr. An existing directory at ``path``
        is replaced only if it is a datastore or empty (FileExistsError otherwise); the
        swap is atomic; files in it the datastore did not create are kept. The replaced
        datastore's learned state is dropped (``stats.state`` says "dropped") unless
        ``keep_state``, which carries it over (the same tokenizer is required). Writers of
        one path run one after another. Raises EmptyCorpusError if there are no documents.
        ``keys``: a ``keys_store.KeyBuilder`` to add NEST keys (see retrieval.keys_store).
        Returns the new datastore, opened read-only, with ``stats`` set.
        """
        path = Path(path).absolute()
        if keep_state and path.exists():
            with cls.open(path, readonly=False, tokenizer=tokenizer) as old:
                stats = write_version(path, None, documents, tokenizer, progress, skipped, state_from=old, keys=keys)
        else:
            stats = write_version(path, None, documents, tokenizer, progress, skipped, keys=keys)
        ds = cls.open(path)
        ds.stats = stats
        return ds

    def append(
        self, documents: Iterable[Document], tokenizer, *, progress: bool = True, skipped: SkipCounts | None = None,
        keys=None,
    ) -> BuildStats:
        """Add ``documents`` after the existing ones and swap the new version in atomically.

        Old documents are copied, not re-tokenized; the suffix array is rebuilt over the
        whole stream; online state is carried over. Needs readonly=False and the same
        tokenizer (TokenizerMismatchError). If another process replaced the datastore
        since this one opened it, raises StaleDatastoreError and changes nothing. Other
        state writers wait only while the state is copied and the version swapped. This
        object then reads the new version; returns the stats (also in ``self.stats``).
        A datastore with NEST keys needs ``keys`` (a KeyBuilder of the same model) to extend
        them to the new documents (MissingKeysError, KeyModelMismatchError).
        """
        self._writable("append to")
        self.check_tokenizer(tokenizer)
        if keys is None and "keys" in self.meta:
            raise MissingKeysError(
                f"the datastore at {self.path} holds NEST keys: appending needs the model that made them "
                f"({self.meta['keys']['model']['name']!r}) to encode the new documents: "
                f"python tools/build_index.py CORPUS --append --model MODEL --out {self.path}"
            )
        self.stats = write_version(self.path, self, documents, tokenizer, progress, skipped, keys=keys)
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

    def check_model(self, vocab_size: int, tokenizer=None) -> None:
        """Raise unless this datastore can draft for a model of ``vocab_size`` ids: ValueError
        if its tokens reach past the vocabulary (built with a larger tokenizer), and
        TokenizerMismatchError if ``tokenizer`` is given and is not the datastore's (checked
        once per tokenizer object: the fingerprint takes a fraction of a second)."""
        if self.meta["max_token"] >= vocab_size:
            raise ValueError(
                f"the datastore at {self.path} holds token id {self.meta['max_token']}, outside the model's "
                f"vocabulary [0, {vocab_size}): it was built with another tokenizer "
                f"({self.tokenizer_name!r}); rebuild it with this model's: "
                f"python tools/build_index.py CORPUS --model MODEL --out {self.path}"
            )
        if tokenizer is not None and tokenizer not in self._checked:
            self.check_tokenizer(tokenizer)
            self._checked.add(tokenizer)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise TokenizerMismatchError, naming both tokenizers, unless ``tokenizer`` is the datastore's."""
        theirs = tokenizer_info(tokenizer)
        if theirs["fingerprint"] != self.fingerprint:
            raise TokenizerMismatchError(
                f"the datastore at {self.path} was built with tokenizer {self.tokenizer_name!r} "
                f"(fingerprint {self.fingerprint}), not {theirs['name']!r} (fingerprint "
                f"{theirs['fingerprint']}); drafts would be the wrong token ids. Rebuild it with "
                f"that model's tokenizer: python tools/build_index.py CORPUS --model MODEL --out {self.path}"
            )

    def array(self, name: str) -> np.ndarray | None:
        """The Arrow file ``name`` as a 1-D read-only view into its memory map, or None if
        this datastore has no such file."""
        return self._live().get(name)

    def nest_index(self):
        """The NEST keys, projection and first stage (``keys_store.NestIndex``), or None if
        the datastore was built without --keys. Made on first use, then shared."""
        if "keys" not in self.meta:
            return None
        if self._nest is None:
            from retrodraft.retrieval.keys_store import NestIndex

            self._nest = NestIndex(self)
        return self._nest

    def document(self, doc_id: int) -> DocumentEntry:
        """The document table's row for ``doc_id`` in [0, num_documents) (ValueError outside)."""
        if not 0 <= doc_id < self.num_documents:
            raise ValueError(f"doc_id must be in [0, {self.num_documents}), got {doc_id}")
        k = key(doc_id)
        with self._live_env().begin() as txn:
            row = unpack(txn.get(k, db=self._dbs[b"docs"]), f"document {doc_id}", self.path, k)
            path_id, record, start, length = np.frombuffer(row, "<i8") if len(row) == 32 else (-1,) * 4
            k = key(int(path_id)) if 0 <= path_id < 1 << 62 else b""
            path = unpack(txn.get(k, db=self._dbs[b"paths"]) if k else None, f"path {path_id}", self.path, k)
        return DocumentEntry(path.decode("utf-8", "replace"), int(record), int(start), int(length))

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
            full = prefix + k.encode("utf-8")
            blobs[full] = pack(buf.getvalue(), full)
        with env.begin(write=True, db=self._dbs[b"state"]) as txn:
            self._check_current()
            cur = txn.cursor()
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    cur.delete()
            txn.put(prefix, pack(json.dumps(sorted(arrays)).encode("utf-8"), prefix))
            for k, blob in blobs.items():
                txn.put(k, blob)

    def load_state(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays last committed under ``name`` (new arrays, copies), or None if never saved.

        CorruptDatastoreError if a saved array is missing or fails its checksum.
        """
        prefix = _state_prefix(name)
        with self._live_env().begin(db=self._dbs[b"state"]) as txn:
            raw = txn.get(prefix)
            if raw is None:
                return None
            what = f"state {name!r}"
            try:
                keys = json.loads(unpack(raw, what, self.path, prefix))
                out = {}
                for k in keys:
                    full = prefix + k.encode("utf-8")
                    blob = unpack(txn.get(full), f"{what} array {k!r}", self.path, full)
                    out[k] = np.lib.format.read_array(io.BytesIO(blob), allow_pickle=False)
            except (ValueError, TypeError, AttributeError) as e:  # a checksummed value we cannot parse
                raise CorruptDatastoreError(f"{what} in {self.path} is unreadable ({e}); {REBUILD.format(self.path)}")
            return out

    # ---- drafting ----------------------------------------------------------------------------

    def online(self, vocab_size: int) -> OnlineState:
        """What generation learned in this datastore's scope (past outputs, recycling matrix,
        calibration), loaded on first use and shared by every call in this process."""
        if self._learned is None:
            self._learned = learned.ScopeState(self._live_env(), self._dbs[b"state"], self.scope, vocab_size,
                                               self.memory, not self.readonly)
        elif self._learned.vocab_size != vocab_size:
            raise ValueError(f"this datastore's learned state is loaded for a vocabulary of "
                             f"{self._learned.vocab_size} tokens, not {vocab_size}: one model per open datastore")
        return self._learned.online

    def drafters(self, vocab_size: int) -> list[Drafter]:
        """Fresh per-call drafters: the corpus (REST over the suffix array) and the scope's
        learned ones (past outputs, n-grams of them, token recycling), after bringing in
        what other processes committed to the scope since the last call."""
        state = self.online(vocab_size)
        self._learned.refresh()
        return [self._corpus_drafter(), *state.drafters()]

    def _corpus_drafter(self) -> Drafter:
        return CorpusDrafter(self.tokens, self.suffix_array, self._source)

    def _source(self, position: int) -> tuple[str, int]:
        """(document name, offset) of a stream position, as drafters' ``locate`` reports it."""
        loc = self.locate(position)
        return (loc.path if loc.record == 0 else f"{loc.path}#{loc.record}"), loc.offset

    def commit(self, output: np.ndarray) -> None:
        """Merge what this process learned since its last commit into the scope: ``output``
        (one call's new tokens) appended to the log, the recycling rows it touched, its
        calibration counts added; one write transaction whose cost grows with that, not with
        the stored state (see ``retrieval.learned``). Does nothing on a read-only datastore
        (what was learned then lives only in this process). StaleDatastoreError if the
        datastore at the path was replaced since this object opened it."""
        if self.readonly or self._learned is None:
            return
        self._writable("commit to")
        self._learned.commit(output, check=self._check_current)

    def scopes(self) -> list[str]:
        """Names of the scopes that hold learned state, sorted."""
        with self._live_env().begin() as txn:
            return learned.scopes(txn, self._dbs[b"state"])

    def scope_sizes(self, scope: str | None = None) -> dict[str, tuple[int, int]]:
        """(records, bytes) stored per kind of record of ``scope`` (default: this object's)."""
        with self._live_env().begin() as txn:
            return learned.scope_sizes(txn, self._dbs[b"state"], scope or self.scope)

    def export_scope(self, path: str | os.PathLike, scope: str | None = None) -> dict[str, int]:
        """Write a scope's learned state (default: this object's) to ``path`` (.npz); see
        ``retrieval.learned.export``. ScopeError if the scope holds nothing."""
        return learned.export(self._live_env(), self._dbs[b"state"], scope or self.scope, path)

    def forget(self, scope: str | None = None) -> int:
        """Delete a scope's learned state (default: this object's) in one transaction;
        returns the records deleted. Needs readonly=False; ScopeError if it holds nothing.
        This object's loaded state is dropped if it was that scope."""
        env = self._writable("forget a scope of")
        scope = scope or self.scope
        n = learned.forget(env, self._dbs[b"state"], scope)
        if scope == self.scope:
            self._learned = None
        return n

    def compact(self, scope: str | None = None) -> dict[str, int]:
        """Fold a scope's output log into its n-gram snapshot and drop the entries older than
        the suffix window (``retrieval.learned.compact``). Needs readonly=False."""
        env = self._writable("compact")
        return learned.compact(env, self._dbs[b"state"], scope or self.scope, self.memory)

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
        return (f"Datastore({str(self.path)!r}, {self.num_documents} documents, {self.num_tokens} tokens, "
                f"scope {self.scope!r}, {state})")

    def _attach(self, path: Path, readonly: bool) -> None:
        self.path, self.readonly = path, readonly
        self._learned: learned.ScopeState | None = None
        self._nest = None
        self._env, self._arrays = None, None
        self._checked = weakref.WeakSet()  # tokenizers check_model has verified
        if not path.is_dir():
            raise FileNotFoundError(f"no datastore at {path}: build one with: {BUILD.format(path)}")
        check_marker(path)
        data = path / "meta.lmdb" / "data.mdb"
        if not data.is_file():
            raise CorruptDatastoreError(f"{data} is missing: the datastore is damaged; {REBUILD.format(path)}")
        check_lmdb_header(data, path)
        st = os.stat(data)
        self._ident = (st.st_dev, st.st_ino)
        self._env = _open_env(path, readonly)
        try:
            self.meta = self._read_meta()
            self._arrays = map_arrays(path, self.meta["files"])
        except BaseException:
            self.close()
            raise

    def _read_meta(self) -> dict:
        try:
            self._dbs = {name: self._env.open_db(name, create=False) for name in DBS}
            with self._env.begin(db=self._dbs[b"meta"]) as txn:
                raw = txn.get(b"meta")
                entries = {name: txn.stat(db)["entries"] for name, db in self._dbs.items() if name != b"meta"}
        except lmdb.Error as e:
            raise CorruptDatastoreError(f"{self.path / 'meta.lmdb'} is damaged ({e}); {REBUILD.format(self.path)}") from e
        if raw is None:
            raise IncompleteDatastoreError(
                f"{self.path} has no completed metadata (an interrupted build?); {REBUILD.format(self.path)}"
            )
        try:
            meta = json.loads(unpack(raw, "the metadata record", self.path, b"meta"))
            version = meta["format_version"]
            counts_match = entries[b"docs"] == meta["documents"] and entries[b"paths"] <= meta["documents"]
            missing = [k for k in ("files", "tokenizer", "max_token", "tokens", "history") if k not in meta]
            if missing or "fingerprint" not in meta["tokenizer"]:
                raise KeyError(missing or "tokenizer fingerprint")
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptDatastoreError(f"the metadata in {self.path} is unreadable ({e}); {REBUILD.format(self.path)}")
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"the datastore at {self.path} has format version {version}; this code reads version "
                f"{FORMAT_VERSION}: {REBUILD.format(self.path)}"
            )
        if not counts_match:
            raise CorruptDatastoreError(
                f"{self.path / 'meta.lmdb'} holds {entries[b'docs']} document rows for {meta['documents']} "
                f"documents: it is damaged; {REBUILD.format(self.path)}"
            )
        return meta

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



def _open_env(path: Path, readonly: bool) -> lmdb.Environment:
    """meta.lmdb's environment; read-only without write access to it: without its lock file."""
    where = str(path / "meta.lmdb")
    try:
        return lmdb.open(where, readonly=readonly, max_dbs=len(DBS), map_size=MAP_SIZE, create=False)
    except (lmdb.ReadonlyError, PermissionError) as e:
        if not readonly:
            raise DatastorePermissionError(
                f"cannot open the datastore at {path} for writing: no write permission on {where} ({e}); open it "
                "with readonly=True, or run as a user who may write there"
            ) from None
    except lmdb.Error as e:
        raise CorruptDatastoreError(f"{where} cannot be opened ({e}); {REBUILD.format(path)}") from e
    log.warning("no write access to %s: opened without LMDB's lock file, so reads are not isolated from a "
                "concurrent state commit (a torn read shows as CorruptDatastoreError)", where)
    try:
        return lmdb.open(where, readonly=True, lock=False, max_dbs=len(DBS), map_size=MAP_SIZE, create=False)
    except lmdb.Error as e:
        raise CorruptDatastoreError(f"{where} cannot be opened ({e}); {REBUILD.format(path)}") from e


def _state_prefix(name: str) -> bytes:
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"state name must be a non-empty str without NUL, got {name!r}")
    return name.encode("utf-8") + b"\0"

