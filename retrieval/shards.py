"""A sharded datastore, opened as one: every shard memory-mapped, queried in parallel, one
place for learned state. ``Datastore.open`` returns one for a directory with a manifest;
the layout is in ``retrieval.manifest``, building in ``retrieval.shard_build``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import lmdb
import numpy as np

from retrodraft.retrieval.corpus import Document, SkipCounts
from retrodraft.retrieval.errors import (
    CorruptDatastoreError, IncompleteDatastoreError, StaleDatastoreError, TokenizerMismatchError,
)
from retrodraft.retrieval.layout import DBS, MAP_SIZE
from retrodraft.retrieval.manifest import REBUILD_SHARDED, fingerprint, read_keys, read_manifest
from retrodraft.retrieval.shard_drafter import ShardedCorpusDrafter, ShardIndex
from retrodraft.retrieval.store import Datastore, DocumentEntry, Location


class ShardedDatastore(Datastore):
    """The shards of a sharded datastore, read as one datastore over all their documents.

    A subclass so that learned state (``online``, ``commit``, ``save_state``,
    ``load_state``) is the very same code as a single datastore's, kept in DIR/meta.lmdb.
    Document ids run in document order (as one datastore built from the same corpus would
    number them); stream positions are virtual (``ShardIndex``). There is no single
    stream: ``tokens``, ``doc_offsets`` and ``suffix_array`` raise; each shard is in
    ``shards`` (read-only Datastores). ``threads`` of ``ShardIndex`` search the shards.
    """

    shards: list[Datastore]
    index: ShardIndex | None

    def append(self, documents: Iterable[Document], tokenizer, *, progress: bool = True,
               skipped: SkipCounts | None = None):
        """Add ``documents``, each to the shard its path hashes to, in this process (for a Ray
        build use ``shard_build.append_sharded`` with ``ray_runner``). Needs readonly=False;
        StaleDatastoreError if another process appended since this one opened (if that
        append lands while this one starts, this object has already moved to the new
        version). Afterwards this object reads the new version. Returns the
        ShardedBuildStats (also in ``self.stats``)."""
        from retrodraft.retrieval.shard_build import append_sharded

        self._writable("append to")
        self.check_tokenizer(tokenizer)
        expect = self.meta["checksum"]
        if read_manifest(self.path)["checksum"] != expect:
            raise StaleDatastoreError(f"the sharded datastore at {self.path} changed after this process opened "
                                      "it; nothing was written: open it again and retry")
        # The shards' LMDB environments must be closed before this process opens them to write.
        self.close()
        try:
            self.stats = append_sharded(self.path, tokenizer, documents=documents, progress=progress,
                                        skipped=skipped, expect=expect)
        finally:
            self._attach(self.path, readonly=False)
        return self.stats

    @property
    def tokens(self) -> np.ndarray:
        raise TypeError(f"{self.path} is sharded: there is one stream per shard (.shards[i].tokens)")

    doc_offsets = suffix_array = tokens

    def document(self, doc_id: int) -> DocumentEntry:
        """Document ``doc_id`` in document order; ``start`` is a virtual position."""
        if not 0 <= doc_id < self.num_documents:
            raise ValueError(f"doc_id must be in [0, {self.num_documents}), got {doc_id}")
        s, local = self._doc_order[doc_id]
        e = self.shards[s].document(int(local))
        return DocumentEntry(e.path, e.record, e.start + int(self.index.bases[s]), e.length)

    def locate(self, position: int) -> Location:
        """Source of virtual position ``position`` (ValueError outside the shards or on a separator)."""
        s, local = self._live_index().shard_of(position)
        return self.shards[s].locate(local)

    def close(self) -> None:
        for ds in getattr(self, "shards", []):
            ds.close()
        if getattr(self, "index", None) is not None:
            self.index.close()
        self.shards, self.index = [], None
        super().close()

    def _corpus_drafter(self):
        return ShardedCorpusDrafter(self._live_index(), self._source)

    def _live_index(self) -> ShardIndex:
        self._live()
        return self.index

    def _attach(self, path: Path, readonly: bool) -> None:
        self.path, self.readonly = path, readonly
        self._learned = None
        self._env, self._arrays, self.shards, self.index = None, None, [], None
        self.meta = read_manifest(path)
        data = path / "meta.lmdb" / "data.mdb"
        if not data.is_file():
            raise IncompleteDatastoreError(f"{path} has no meta.lmdb/ for its learned state; "
                                           f"{REBUILD_SHARDED.format(path)}")
        st = os.stat(data)
        self._ident = (st.st_dev, st.st_ino)
        self._env = lmdb.open(str(data.parent), readonly=readonly, max_dbs=len(DBS), map_size=MAP_SIZE, create=False)
        try:
            self._dbs = {b"state": self._env.open_db(b"state", create=False)}
            parts, order = [], []
            for i, entry in enumerate(e for e in self.meta["shards"] if e["documents"]):
                ds = Datastore.open(path / entry["name"])
                self.shards.append(ds)
                if fingerprint(ds.meta) != entry["fingerprint"]:
                    raise CorruptDatastoreError(
                        f"{ds.path} is not the shard the manifest lists (an append interrupted between the shard "
                        f"and the manifest?); {REBUILD_SHARDED.format(path)}")
                if ds.fingerprint != self.fingerprint:
                    raise TokenizerMismatchError(f"{ds.path} was built with another tokenizer than {path}'s manifest "
                                                 f"says; {REBUILD_SHARDED.format(path)}")
                keys = read_keys(path, entry["keys"])
                if keys.shape != (ds.num_documents,):
                    raise CorruptDatastoreError(f"{path / entry['keys']['name']} has {keys.shape[0]} keys for "
                                                f"{ds.num_documents} documents; {REBUILD_SHARDED.format(path)}")
                parts.append((ds.tokens, ds.suffix_array, ds.doc_offsets, keys))
                order.append(np.stack([np.full(keys.shape[0], i), np.arange(keys.shape[0]), keys], axis=1))
            if not parts:
                raise IncompleteDatastoreError(f"{path}'s manifest lists no documents; {REBUILD_SHARDED.format(path)}")
            # The largest token id of any shard: what check_model compares with a model's vocabulary.
            self.meta = {**self.meta, "max_token": max(ds.meta["max_token"] for ds in self.shards)}
            table = np.concatenate(order)
            # Keys are unique to a source file and a file's records sit in order in one shard.
            self._doc_order = table[np.lexsort((table[:, 1], table[:, 2])), :2]
            self.index = ShardIndex(parts)
            self._arrays = {}
        except BaseException:
            self.close()
            raise
