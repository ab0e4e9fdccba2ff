"""What a datastore directory holds, and the checks and framing every reader and writer shares.

A datastore is a directory PATH:

  retrodraft-datastore.json  {"magic": MAGIC, "format_version": N}: the marker by which a
                      directory is known to be a datastore (a build replaces, and housekeeping
                      deletes, only directories carrying it)
  meta.lmdb/          LMDB environment with four named databases; every value is framed by
                      ``pack`` (CRC32 of key and value, then the value)
      meta    b"meta" -> JSON: format version, tokenizer (name, fingerprint, vocab size),
              document and token counts, largest token id, build history, size and block
              CRC32s of each Arrow file. Written last: a directory without it is incomplete.
      paths   path id (8-byte big-endian) -> source path (UTF-8)
      docs    doc id (8-byte big-endian) -> int64 LE (path id, record index, start, length)
      state   name NUL key -> one array in .npy format; name NUL alone -> JSON list of the
              keys saved under name (so an empty dict round-trips and a lost key is noticed)
  tokens.arrow        int32 [T + D]  every document's tokens followed by -1
  doc_offsets.arrow   int64 [D + 1]  document d is tokens[offsets[d] : offsets[d + 1] - 1]
  suffix_array.arrow  int64 [T + D]  ``index.suffix_array.build(tokens)``
  build.lock          flock-ed by the process that builds the directory

(T tokens in D documents.) Any other file in PATH belongs to the user: rebuilds and appends
carry it over (hard-linked) into the new version. Beside PATH, writers of PATH hold
``PATH.lock`` (flock) for a whole build or append; builds write ``PATH.incomplete-XXXX`` and
swap it in atomically (see ``retrieval.build``).

Concurrency: any number of processes may read; state is written in single LMDB write
transactions, which LMDB serialises across processes. A process whose datastore was
replaced under it (rebuilt, or appended to by another process) keeps reading its old
version; saving state then raises StaleDatastoreError instead of writing into the old one.
One Datastore per path per process (an LMDB rule).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

from retrodraft.retrieval.errors import CorruptDatastoreError, FormatVersionError, IncompleteDatastoreError

# 2: marker file, checksummed LMDB values, full-state tokenizer fingerprint, max_token in meta.
FORMAT_VERSION = 2
MAGIC = "retrodraft-datastore"
MARKER = "retrodraft-datastore.json"
# Every name a build writes into PATH. Anything else there is the user's and is carried over.
# NEST adds keys.arrow, key_projection.arrow and bm25/ (retrieval.keys_store, retrieval.stage1).
OWN_FILES = frozenset({MARKER, "meta.lmdb", "tokens.arrow", "doc_offsets.arrow", "suffix_array.arrow", "build.lock",
                       "keys.arrow", "key_projection.arrow", "bm25"})
# Address space reserved for meta.lmdb (the file grows only as written). Every opener uses
# the same value, so a reader never meets a map grown by a writer (MDB_MAP_RESIZED).
MAP_SIZE = 1 << 36
DBS = (b"meta", b"paths", b"docs", b"state")
BUILD = "python tools/build_index.py CORPUS --out {}"
REBUILD = "rebuild it with: " + BUILD


def key(i: int) -> bytes:
    """Big-endian, so LMDB's byte order is numeric order (and appends go at the end)."""
    return i.to_bytes(8, "big")


def pack(value: bytes, k: bytes = b"") -> bytes:
    """``value`` framed for LMDB: CRC32 over key ``k`` and ``value`` (4 bytes LE), then ``value``.

    The key is covered so that a damaged key cannot pass another entry's value off as its own.
    """
    return zlib.crc32(value, zlib.crc32(k)).to_bytes(4, "little") + value


def unpack(raw: bytes | None, what: str, path: Path, k: bytes = b"") -> bytes:
    """The value ``pack`` framed in ``raw`` (stored under key ``k``); CorruptDatastoreError
    naming ``what`` (e.g. "document 7") and how to rebuild the datastore at ``path`` if it is
    missing or fails its checksum."""
    if raw is None or len(raw) < 4 or int.from_bytes(raw[:4], "little") != zlib.crc32(raw[4:], zlib.crc32(k)):
        state = "missing" if raw is None else "damaged (checksum mismatch)"
        raise CorruptDatastoreError(f"{what} in {path / 'meta.lmdb'} is {state}; {REBUILD.format(path)}")
    return bytes(raw[4:])


def marker_bytes() -> bytes:
    return json.dumps({"magic": MAGIC, "format_version": FORMAT_VERSION}).encode("utf-8")


def read_marker(path: Path) -> dict | None:
    """The marker of the directory ``path`` as a dict with our magic, or None if it has none
    (or a file there that is not ours). Reads at most 4 KiB."""
    try:
        with open(path / MARKER, "rb") as f:
            marker = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("magic") == MAGIC else None


def check_marker(path: Path) -> None:
    """Raise unless ``path`` carries the marker of a datastore of this FORMAT_VERSION."""
    marker = read_marker(path)
    if marker is None:
        if (path / "meta.lmdb").is_dir() and not (path / MARKER).exists():
            raise FormatVersionError(
                f"{path} has a meta.lmdb/ but no {MARKER}: a datastore of format version 1 (retrodraft "
                f"before the marker) or not a datastore; this code reads version {FORMAT_VERSION}. Move it "
                f"aside (a build will not replace it) and {REBUILD.format(path)}"
            )
        if (path / MARKER).exists():
            raise CorruptDatastoreError(f"{path / MARKER} is damaged; {REBUILD.format(path)}")
        raise IncompleteDatastoreError(f"{path} is not a datastore (no {MARKER}); build one with: {BUILD.format(path)}")
    if marker.get("format_version") != FORMAT_VERSION:
        raise FormatVersionError(
            f"the datastore at {path} has format version {marker.get('format_version')}; this code reads "
            f"version {FORMAT_VERSION}: {REBUILD.format(path)}"
        )


# LMDB 0.9 on a 64-bit host: a page header (pgno u64, pad u16, flags u16, lower u16, upper u16),
# then MDB_meta: magic u32, version u32, address u64, mapsize u64, two MDB_db of 48 bytes
# (pad u32 = page size in the free DB, flags u16, depth u16, branch, leaf, overflow, entries,
# root: u64), last_pg u64, txnid u64. Meta pages are pages 0 and 1.
_META = struct.Struct("<QHHHHIIQQ" + "IHHQQQQQ" * 2 + "QQ")
_P_META, _MDB_MAGIC, _MDB_VERSION, _P_INVALID = 0x08, 0xBEEFC0DE, 1, (1 << 64) - 1


def check_lmdb_header(data: Path, path: Path) -> None:
    """Check ``data`` (a data.mdb) against LMDB's own meta pages before LMDB maps it.

    LMDB trusts its file: pages past the end of a truncated file, or a damaged map size or
    page count, make it read beyond the file (SIGBUS). Here both meta pages must carry
    LMDB's magic and version, a map size within this store's, alternating transaction ids, roots and
    last page inside the file. CorruptDatastoreError otherwise.
    """
    def bad(why: str) -> CorruptDatastoreError:
        return CorruptDatastoreError(f"{data} is damaged ({why}); {REBUILD.format(path)}")

    try:
        with open(data, "rb") as f:
            head = f.read(_META.size)
            size = os.fstat(f.fileno()).st_size
            psize = struct.unpack_from("<I", head, 40)[0] if len(head) == _META.size else 0
            if psize not in (1 << n for n in range(9, 17)) or size < 2 * psize or size % psize:
                raise bad(f"{size} bytes, page size {psize}")
            f.seek(psize)
            metas = [_META.unpack(head), _META.unpack(f.read(_META.size))]
    except OSError as e:
        raise CorruptDatastoreError(f"cannot read {data} ({e}); {REBUILD.format(path)}") from e
    pages = size // psize
    txnids = []
    for i, m in enumerate(metas):
        pgno, _, flags, _, _, magic, version, _, mapsize = m[:9]
        last_pg, txnid = m[-2:]
        roots = (m[9 + 7], m[9 + 8 + 7])  # md_root of the free and the main DB
        if pgno != i or not flags & _P_META or magic != _MDB_MAGIC or version != _MDB_VERSION:
            raise bad(f"meta page {i} has no valid LMDB header")
        if not (last_pg + 1) * psize <= mapsize <= MAP_SIZE or last_pg >= pages or \
                any(r != _P_INVALID and r > last_pg for r in roots):
            raise bad(f"meta page {i}: map size {mapsize}, last page {last_pg}, file of {pages} pages")
        txnids.append(txnid)
    newest = max(txnids)
    # Commit n writes meta page n % 2, so the pages hold n and n - 1 (or both 0, never committed).
    if txnids[newest % 2] != newest or min(txnids) != max(newest - 1, 0):
        raise bad(f"meta pages hold transactions {txnids}")
