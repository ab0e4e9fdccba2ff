"""What a sharded datastore directory holds, and its manifest.

A sharded datastore is a directory DIR:

  manifest.json        the shards, written last and atomically (rename), checksummed:
                       format, format_version, tokenizer, documents, tokens, files (source
                       files seen so far: the next document key), history, and per shard
                       {name, documents, tokens, fingerprint, keys: {name, bytes, crc32}};
                       checksum = SHA-256 of the JSON of everything else (sorted keys)
  shard-NNNNN/         an ordinary datastore (``retrieval.layout``), absent while empty
  keys-NNNNN-G.npy     int64 [shard documents]: each document's key, the sequence number
                       of its source file in build order, so a merge can order documents
                       as one datastore would (``index.shard_merge``); G = generation
  meta.lmdb/           learned state only (the ``state`` database of ``layout.DBS``): one
                       place for all shards
  append.lock          flock-ed while an append runs

A document goes to shard ``shard_for(path, n)``: a stable hash of its source path, so every
record of a file lands in one shard and an append finds the shard its path went to before.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

from retrodraft.retrieval.arrow_files import fsync
from retrodraft.retrieval.errors import CorruptDatastoreError, FormatVersionError, IncompleteDatastoreError
from retrodraft.retrieval.layout import BUILD

MANIFEST = "manifest.json"
FORMAT = "retrodraft-sharded"
SHARDED_FORMAT_VERSION = 1
REBUILD_SHARDED = "rebuild it with: python tools/build_index.py CORPUS --shards N --out {}"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_for(path: str, shards: int) -> int:
    """The shard of documents from source ``path``: BLAKE2b of its UTF-8 bytes mod ``shards``
    (the same on every machine and Python, unlike ``hash``)."""
    digest = hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def is_sharded(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def fingerprint(meta: dict) -> str:
    """16 hex digits of SHA-256 over a shard's metadata (it records every build and append)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def read_manifest(path: Path) -> dict:
    """The manifest of the sharded datastore at ``path``, checked (format, version, checksum)."""
    f = path / MANIFEST
    if not path.is_dir():
        raise FileNotFoundError(f"no datastore at {path}: build one with: {BUILD.format(path)}")
    if not f.is_file():
        raise IncompleteDatastoreError(f"{path} has no {MANIFEST}: not a sharded datastore; "
                                       f"{REBUILD_SHARDED.format(path)}")
    try:
        manifest = json.loads(f.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptDatastoreError(f"{f} is not valid JSON ({e}); {REBUILD_SHARDED.format(path)}") from e
    if not isinstance(manifest, dict) or manifest.get("checksum") != _checksum(manifest):
        raise CorruptDatastoreError(f"{f} fails its checksum: the manifest is damaged; {REBUILD_SHARDED.format(path)}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != SHARDED_FORMAT_VERSION:
        raise FormatVersionError(
            f"{f} is format {manifest.get('format')!r} version {manifest.get('format_version')}; this code "
            f"reads {FORMAT!r} version {SHARDED_FORMAT_VERSION}: {REBUILD_SHARDED.format(path)}")
    return manifest


def write_manifest(path: Path, manifest: dict) -> dict:
    """Checksum ``manifest`` and replace ``path``/manifest.json with it atomically (write, fsync, rename)."""
    manifest = {**manifest, "format": FORMAT, "format_version": SHARDED_FORMAT_VERSION}
    manifest["checksum"] = _checksum(manifest)
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    fsync(tmp)
    os.replace(tmp, path / MANIFEST)
    fsync(path)
    return manifest


def write_keys(path: Path, shard: int, generation: int, keys: np.ndarray) -> dict:
    """Write a shard's document keys as keys-NNNNN-G.npy; return its manifest entry."""
    name = f"keys-{shard:05d}-{generation}.npy"
    np.save(path / name, np.ascontiguousarray(keys, np.int64))
    fsync(path / name)
    data = (path / name).read_bytes()
    return {"name": name, "bytes": len(data), "crc32": zlib.crc32(data)}


def read_keys(path: Path, entry: dict) -> np.ndarray:
    """A shard's document keys, checked against their manifest entry (CorruptDatastoreError)."""
    f = path / entry["name"]
    data = f.read_bytes() if f.is_file() else None
    if data is None or len(data) != entry["bytes"] or zlib.crc32(data) != entry["crc32"]:
        what = "missing" if data is None else "damaged"
        raise CorruptDatastoreError(f"{f} is {what}; {REBUILD_SHARDED.format(path)}")
    return np.load(f, allow_pickle=False)
