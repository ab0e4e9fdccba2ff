"""What a datastore directory holds, and the constants every reader and writer shares.

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

FORMAT_VERSION = 1
# Address space reserved for meta.lmdb (the file grows only as written). Every opener uses
# the same value, so a reader never meets a map grown by a writer (MDB_MAP_RESIZED).
MAP_SIZE = 1 << 36
DBS = (b"meta", b"paths", b"docs", b"state")
BUILD = "python tools/build_index.py CORPUS --out {}"
REBUILD = "rebuild it with: " + BUILD


def key(i: int) -> bytes:
    """Big-endian, so LMDB's byte order is numeric order (and appends go at the end)."""
    return i.to_bytes(8, "big")

