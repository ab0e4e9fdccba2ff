"""The learned state of a datastore, per scope, in its LMDB ``state`` database.

Each generation call commits only what it learned, merged into the stored state in one LMDB
write transaction (LMDB serialises writers across processes): its output is appended to a
log, its calibration counts are added, the recycling rows it touched replace the stored ones
(the newer update wins). So any number of processes can generate with one writable datastore
and none overwrites another; a commit costs what the call learned, not what is stored.
A process picks up what others committed at the start of its next call: one read of the
scope's sequence counter tells whether anything is new.

Every value is framed by ``layout.pack`` (a CRC32 over key and value), like the rest of
the datastore's LMDB values: a damaged record raises CorruptDatastoreError naming it.

Keys, each under ``learned NUL SCOPE NUL`` (SCOPE: 1-64 of [A-Za-z0-9._-], first alphanumeric):
  ""              the scope exists (b"")
  "seq"           int64 LE: the last commit's sequence number (the staleness check)
  "epoch"         int64 LE: compactions so far (a reader behind one reloads)
  "out" seq       one commit (seq 8-byte big-endian, so log order is key order): int64 LE
                  [n, r], then its output int32 [n] and the recycling rows it touched int32 [r]
  "rec" token     int32 [k]: the target's latest top-k after ``token`` (8-byte big-endian key)
  "cal" name NUL verdict depth   float64 LE [3, BUCKETS]: calibration seen, hits and raw
                  of a source at one verdict and depth (one byte each), so a commit writes only
                  the cells its call observed
  "ngram" name    an ``NgramTable.state()`` array (.npy) over every output up to "folded"
  "folded"        int64 LE: the last seq counted in the "ngram" snapshot (0: none)

Compaction (``compact``) is explicit: it folds the log into the n-gram snapshot and drops the
log entries older than the suffix tree's window. Loading reads the n-gram snapshot, counts the
log after it, and fills the suffix tree with the newest window of the log.

Datastores written before scopes kept one ``online`` record (the whole state, rewritten each
call); it is read as the default scope and converted on the first write.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from retrodraft.retrieval.calibration import BUCKETS, DEPTHS, VERDICTS, Calibrator
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.errors import CorruptDatastoreError, DatastoreError
from retrodraft.retrieval.layout import key, pack, unpack
from retrodraft.retrieval.online import LearnedMemory, OnlineState

log = logging.getLogger(__name__)

DEFAULT_SCOPE = "default"
ROOT = b"learned\0"
LEGACY_NAME = "online"  # the single state record of datastores written before scopes
LEGACY = LEGACY_NAME.encode() + b"\0"
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CAL_SHAPE = (3, VERDICTS, DEPTHS, BUCKETS)


class ScopeError(DatastoreError, ValueError):
    """A scope name is malformed, or names no learned state."""


def check_scope(scope: str) -> str:
    """``scope`` if it is a valid scope name, else ScopeError saying what is allowed."""
    if not isinstance(scope, str) or not _SCOPE.fullmatch(scope):
        raise ScopeError(f"a scope name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; "
                         f"got {scope!r}")
    return scope


def _prefix(scope: str) -> bytes:
    return ROOT + check_scope(scope).encode() + b"\0"


def _int(v: bytes | None) -> int:
    return 0 if v is None else int(np.frombuffer(v, "<i8")[0])


def _i8(x: int) -> bytes:
    return np.int64(x).tobytes()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _from_npy(v: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(v), allow_pickle=False)


def _entry(output: np.ndarray, touched: np.ndarray) -> bytes:
    return np.array([len(output), len(touched)], "<i8").tobytes() + output.astype("<i4").tobytes() + \
        touched.astype("<i4").tobytes()


def _read_entry(v: bytes) -> tuple[np.ndarray, np.ndarray]:
    n, r = np.frombuffer(v, "<i8", 2)
    body = np.frombuffer(v, "<i4", offset=16)
    if body.shape[0] != n + r:
        raise DatastoreError(f"a learned-output record holds {body.shape[0]} ids, its header says {n} + {r}")
    return body[:n].astype(np.int32), body[n:].astype(np.int64)


def _checked(k: bytes, raw: bytes) -> bytes:
    """The value ``layout.pack`` framed under key ``k``; CorruptDatastoreError if it fails its checksum."""
    try:
        return unpack(raw, "", Path("."), k)
    except CorruptDatastoreError:
        raise CorruptDatastoreError(
            f"the learned-state record {bytes(k)!r} is damaged (checksum mismatch): forget its scope "
            "(retrodraft-datastore forget PATH --scope SCOPE) or rebuild the datastore") from None


def _get(txn, k: bytes, db) -> bytes | None:
    raw = txn.get(k, db=db)
    return None if raw is None else _checked(k, raw)


def _put(txn, k: bytes, value: bytes, db) -> None:
    txn.put(k, pack(value, k), db=db)


def _items(txn, prefix: bytes, db, reverse: bool = False):
    """(key without ``prefix``, value) of every key starting with ``prefix``."""
    cur = txn.cursor(db)
    if not reverse:
        ok = cur.set_range(prefix)
        while ok and cur.key().startswith(prefix):
            yield cur.key()[len(prefix):], _checked(cur.key(), cur.value())
            ok = cur.next()
        return
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    ok = cur.last() if not cur.set_range(end) else cur.prev()
    while ok and cur.key().startswith(prefix):
        yield cur.key()[len(prefix):], _checked(cur.key(), cur.value())
        ok = cur.prev()


def _read_calibration(txn, p: bytes, db) -> dict[str, np.ndarray]:
    """float64 [3, VERDICTS, DEPTHS, BUCKETS] per source, as stored under prefix ``p``."""
    out: dict[str, np.ndarray] = {}
    for k_, v in _items(txn, p + b"cal", db):
        cell = out.setdefault(k_[:-3].decode(), np.zeros(_CAL_SHAPE))
        cell[:, k_[-2], k_[-1]] = np.frombuffer(v, "<f8").reshape(3, BUCKETS)
    return out


def _add_calibration(txn, p: bytes, db, by_source: dict[str, np.ndarray]) -> None:
    """Add ``by_source`` (as ``_read_calibration`` returns) to the stored counts, writing only
    the (verdict, depth) rows where it is not zero."""
    for name, d in by_source.items():
        for v, depth in np.argwhere(d.any(axis=(0, 3))).tolist():
            k_ = p + b"cal" + name.encode() + b"\0" + bytes([v, depth])
            old = _get(txn, k_, db)
            row = d[:, v, depth] + (0 if old is None else np.frombuffer(old, "<f8").reshape(3, BUCKETS))
            _put(txn, k_, row.astype("<f8").tobytes(), db)


def _calibration_by_source(c: Calibrator) -> dict[str, np.ndarray]:
    return {n: np.stack([c.seen[i], c.hits[i], c.raw[i]]) for i, n in enumerate(c.names)}


def _set_calibration(c: Calibrator, by_source: dict[str, np.ndarray]) -> None:
    for name, cell in by_source.items():
        i = c._index(name)
        c.seen[i], c.hits[i], c.raw[i] = cell


# ---- what is stored ----------------------------------------------------------------------


@dataclass
class Stored:
    """A scope's state as read in one transaction: the commit counter, the compaction epoch,
    outputs (the newest window, oldest first), the n-gram snapshot and the log entries after
    it, recycling rows by token, calibration by source."""

    seq: int
    epoch: int
    window: list[np.ndarray]
    ngram: dict[str, np.ndarray] | None
    unfolded: list[np.ndarray]
    rows: tuple[np.ndarray, np.ndarray]
    calibration: dict[str, np.ndarray]


def read_scope(txn, db, scope: str, window_tokens: int, k: int = DEFAULT.topk) -> Stored:
    """The stored state of ``scope`` (empty if it was never written) in transaction ``txn``;
    ``k``: the recycling rows' width when there are none (else as stored)."""
    p = _prefix(scope)
    folded = _int(_get(txn, p + b"folded", db))
    window, unfolded, budget = [], [], window_tokens
    for k_, v in _items(txn, p + b"out", db, reverse=True):
        seq = int.from_bytes(k_, "big")
        if budget <= 0 and seq <= folded:
            break
        out, _ = _read_entry(v)
        if budget > 0:
            window.append(out)
            budget -= len(out)
        if seq > folded:
            unfolded.append(out)
    snap = {name.decode(): _from_npy(v) for name, v in _items(txn, p + b"ngram", db)} or None
    toks, rows = [], []
    for k_, v in _items(txn, p + b"rec", db):
        toks.append(int.from_bytes(k_, "big"))
        rows.append(np.frombuffer(v, "<i4"))
    cal = _read_calibration(txn, p, db)
    rows_a = np.array(rows, np.int32) if rows else np.empty((0, k), np.int32)
    return Stored(_int(_get(txn, p + b"seq", db)), _int(_get(txn, p + b"epoch", db)), window[::-1], snap,
                  unfolded[::-1], (np.array(toks, np.int64), rows_a), cal)


def scopes(txn, db) -> list[str]:
    """Names of the scopes with learned state (sorted), plus "default" for a legacy record."""
    out, cur = [], txn.cursor(db)
    ok = cur.set_range(ROOT)
    while ok and cur.key().startswith(ROOT):
        name = cur.key()[len(ROOT):].split(b"\0", 1)[0]
        out.append(name.decode())
        ok = cur.set_range(ROOT + name + b"\1")  # skip the rest of this scope
    if DEFAULT_SCOPE not in out and _get(txn, LEGACY, db) is not None:
        out.append(DEFAULT_SCOPE)
    return sorted(out)


def scope_sizes(txn, db, scope: str) -> dict[str, tuple[int, int]]:
    """Per kind of record of ``scope`` ("out", "rec", "cal", "ngram"): (records, bytes stored)."""
    sizes: dict[str, list[int]] = {}
    for kind in ("out", "rec", "cal", "ngram"):
        s = sizes.setdefault(kind, [0, 0])
        for k_, v in _items(txn, _prefix(scope) + kind.encode(), db):
            s[0] += 1
            s[1] += len(k_) + len(v)
    return {k: (a, b) for k, (a, b) in sizes.items()}


def _legacy(txn, db) -> dict[str, np.ndarray] | None:
    if _get(txn, LEGACY, db) is None:
        return None
    return {k.decode(): _from_npy(v) for k, v in _items(txn, LEGACY, db) if k}


def _migrate(txn, db) -> None:
    """Rewrite a legacy ``online`` record as the default scope's records (in ``txn``)."""
    old = _legacy(txn, db)
    p = _prefix(DEFAULT_SCOPE)
    if old is None or _get(txn, p, db) is not None:
        return
    _put(txn, p, b"", db)
    seq = 0
    if "outputs" in old:
        bounds = np.concatenate(([0], np.cumsum(old["lengths"])))
        for a, b in zip(bounds[:-1], bounds[1:]):
            seq += 1
            _put(txn, p + b"out" + key(seq), _entry(old["outputs"][a:b], np.empty(0, np.int64)), db)
    _put(txn, p + b"seq", _i8(seq), db)
    if "recycling" in old:
        rows = old["recycling"].astype(np.int32)
        for t in np.flatnonzero(rows[:, 0] >= 0).tolist():
            _put(txn, p + b"rec" + key(t), rows[t].astype("<i4").tobytes(), db)
    cal = {k[len("calibration_"):]: v for k, v in old.items() if k.startswith("calibration_")}
    if cal:
        try:
            _add_calibration(txn, p, db, _calibration_by_source(Calibrator.from_state(cal)))
        except (ValueError, KeyError) as e:
            # Kept, it would switch speculation off and be added to by every commit.
            log.warning("the score calibration saved in the datastore is invalid (%s): starting it afresh", e)
    for k_, _ in list(_items(txn, LEGACY, db)):
        txn.delete(LEGACY + k_, db=db)
    txn.delete(LEGACY, db=db)
    log.info("converted the datastore's single online record into scope %r (%d outputs)", DEFAULT_SCOPE, seq)


def _legacy_stored(old: dict[str, np.ndarray], window_tokens: int, k: int) -> Stored:
    """A legacy record read as a Stored default scope, for read-only opens (no write to convert)."""
    outputs = []
    if "outputs" in old:
        bounds = np.concatenate(([0], np.cumsum(old["lengths"])))
        outputs = [old["outputs"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    window, budget = [], window_tokens
    for o in reversed(outputs):
        if budget <= 0:
            break
        window.append(o)
        budget -= len(o)
    rows = old.get("recycling", np.full((0, k), -1, np.int32))
    filled = np.flatnonzero(rows[:, 0] >= 0) if len(rows) else np.empty(0, np.int64)
    cal = {k_[len("calibration_"):]: v for k_, v in old.items() if k_.startswith("calibration_")}
    by_source = _calibration_by_source(Calibrator.from_state(cal)) if cal else {}
    return Stored(0, 0, window[::-1], None, outputs, (filled, rows[filled].reshape(-1, k)), by_source)


# ---- one process's view of one scope -------------------------------------------------------


def _check_outputs(stored: Stored, scope: str, vocab_size: int) -> None:
    """ValueError naming the scope if its past outputs hold ids outside [0, vocab_size)."""
    outs = [o for o in list(stored.window) + list(stored.unfolded) if o.size]
    if not outs:
        return
    low, high = min(int(o.min()) for o in outs), max(int(o.max()) for o in outs)
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"the past outputs saved in the datastore (scope {scope!r}) hold token ids in [{low}, {high}], outside the "
            f"model's vocabulary "
            f"[0, {vocab_size}): they were generated by another model; use another scope, or forget this one: "
            f"retrodraft-datastore forget PATH --scope {scope}")


class ScopeState:
    """The learned state of one scope of an open datastore, in this process.

    ``online`` holds the structures drafters use. ``refresh`` (call before drafting) brings in
    what other processes committed since; ``commit`` (after a call) stores what this process
    learned since its last commit. Not thread-safe: one per datastore object.
    """

    def __init__(self, env: lmdb.Environment, db, scope: str, vocab_size: int, memory: LearnedMemory,
                 writable: bool):
        self.env, self.db, self.scope, self.writable = env, db, check_scope(scope), writable
        self.vocab_size, self.memory = vocab_size, memory
        self.p = _prefix(scope)
        if writable and scope == DEFAULT_SCOPE:
            with env.begin(db=db) as txn:
                legacy = _get(txn, LEGACY, db) is not None
            if legacy:  # checked first: a write transaction costs an fsync
                with env.begin(write=True, db=db) as txn:
                    _migrate(txn, db)
        self._load()

    def _load(self) -> None:
        k = DEFAULT.topk
        with self.env.begin(db=self.db) as txn:
            stored = read_scope(txn, self.db, self.scope, self.memory.window_tokens, k)
            old = _legacy(txn, self.db) if self.scope == DEFAULT_SCOPE and _get(txn, self.p, self.db) is None else None
        if old is not None:
            stored = _legacy_stored(old, self.memory.window_tokens, k)
        _check_outputs(stored, self.scope, self.vocab_size)
        calibration = stored.calibration
        if any(not np.isfinite(v).all() or (v < 0).any() for v in calibration.values()):
            # Kept, it would switch speculation off and be written back by every commit.
            log.warning("the score calibration of scope %r is invalid (not finite, or negative counts): "
                        "starting it afresh", self.scope)
            calibration = {}
        online = OnlineState(self.vocab_size, self.memory, ngram=stored.ngram)
        for out in stored.window:
            online.output_tree.add_sequence(out)
        for out in stored.unfolded:
            online.ngram.update(np.concatenate(([-1], out)).astype(np.int32))
        toks, rows = stored.rows
        if len(toks) and (toks.max() >= self.vocab_size or rows.shape[1] != online.recycling.k):
            raise DatastoreError(
                f"scope {self.scope!r} holds recycling rows for token {int(toks.max())} with {rows.shape[1]} ids each; "
                f"the model's vocabulary is {self.vocab_size} (k {online.recycling.k}): was it learned with another "
                f"model? Use another scope, or forget this one: retrodraft-datastore forget PATH --scope {self.scope}")
        online.recycling.set_rows(toks, rows)
        _set_calibration(online.calibrator, calibration)
        self.online = online
        self.seq, self.epoch = stored.seq, stored.epoch
        self._own: set[int] = set()
        self._base = _calibration_by_source(online.calibrator)

    def refresh(self) -> int:
        """Bring in the commits other processes made since this one last looked; returns how
        many. Costs one small read when there are none."""
        with self.env.begin(db=self.db) as txn:
            seq = _int(_get(txn, self.p + b"seq", self.db))
            if seq == self.seq:
                return 0
            if _int(_get(txn, self.p + b"epoch", self.db)) != self.epoch:
                self._load()
                return 1
            new, touched = [], []
            cur = txn.cursor(self.db)
            ok = cur.set_range(self.p + b"out" + key(self.seq + 1))
            while ok and cur.key().startswith(self.p + b"out"):
                s = int.from_bytes(cur.key()[len(self.p) + 3:], "big")
                if s not in self._own:
                    out, rows = _read_entry(_checked(cur.key(), cur.value()))
                    new.append(out)
                    touched.append(rows)
                ok = cur.next()
            rows_at = np.unique(np.concatenate(touched)) if touched else np.empty(0, np.int64)
            rows = [_get(txn, self.p + b"rec" + key(int(t)), self.db) for t in rows_at.tolist()]
            cal = _read_calibration(txn, self.p, self.db)
        for out in new:
            self.online.add_output(out)
        have = [i for i, r in enumerate(rows) if r is not None]
        if have:
            self.online.recycling.set_rows(rows_at[have], np.stack([np.frombuffer(rows[i], "<i4") for i in have]))
        # stored totals, plus whatever this process learned and has not committed
        mine = _calibration_by_source(self.online.calibrator)
        _set_calibration(self.online.calibrator, {
            n: cal.get(n, 0) + mine.get(n, 0) - self._base.get(n, 0) for n in set(cal) | set(mine)})
        self._base = {n: cal[n].copy() for n in cal}
        self.seq = seq
        self._own = {s for s in self._own if s > seq}
        return len(new)

    def commit(self, output: np.ndarray, check=None) -> int:
        """Store one call's output, the recycling rows touched and the calibration counts
        learned since the last commit, merged into the scope in one write transaction;
        returns the commit's sequence number. ``check()`` runs first inside the transaction
        (an exception there writes nothing)."""
        output = np.asarray(output, np.int32)
        touched = self.online.recycling.take_touched()
        rows = self.online.recycling.state()["rows"][touched]
        now = _calibration_by_source(self.online.calibrator)
        delta = {n: c - self._base[n] if n in self._base else c for n, c in now.items()}
        delta = {n: d for n, d in delta.items() if d.any()}
        with self.env.begin(write=True, db=self.db) as txn:
            if check is not None:
                check()
            if _get(txn, self.p, self.db) is None:
                _put(txn, self.p, b"", self.db)
            seq = _int(_get(txn, self.p + b"seq", self.db)) + 1
            _put(txn, self.p + b"seq", _i8(seq), self.db)
            _put(txn, self.p + b"out" + key(seq), _entry(output, touched), self.db)
            for t, row in zip(touched.tolist(), rows):
                _put(txn, self.p + b"rec" + key(t), row.astype("<i4").tobytes(), self.db)
            _add_calibration(txn, self.p, self.db, delta)
        self._base = now
        self._own.add(seq)
        if seq == self.seq + 1:
            self.seq = seq  # nothing from others in between: no refresh needed
            self._own.discard(seq)
        return seq


# ---- whole-scope operations ------------------------------------------------------------------


def append_outputs(env: lmdb.Environment, db, scope: str, outputs) -> int:
    """Append many outputs (1-D int32 arrays) to ``scope``'s log in one write transaction, as
    if each had been committed by a call that touched no recycling row and learned no
    calibration (for imports and benchmarks); returns the last sequence number."""
    p = _prefix(scope)
    with env.begin(write=True, db=db) as txn:
        _put(txn, p, b"", db)
        seq = _int(_get(txn, p + b"seq", db))
        none = np.empty(0, np.int64)
        for out in outputs:
            seq += 1
            _put(txn, p + b"out" + key(seq), _entry(np.asarray(out, np.int32), none), db)
        _put(txn, p + b"seq", _i8(seq), db)
    return seq


def forget(env: lmdb.Environment, db, scope: str) -> int:
    """Delete every record of ``scope`` in one transaction; returns how many (ScopeError if none)."""
    p = _prefix(scope)
    with env.begin(write=True, db=db) as txn:
        if scope == DEFAULT_SCOPE:
            _migrate(txn, db)
        keys = [p + k_ for k_, _ in _items(txn, p, db)]
        if not keys:
            raise ScopeError(f"there is no learned state in scope {scope!r}; scopes: {', '.join(scopes(txn, db)) or 'none'}")
        for k_ in keys:
            txn.delete(k_, db=db)
    return len(keys)


def compact(env: lmdb.Environment, db, scope: str, memory: LearnedMemory) -> dict[str, int]:
    """Fold ``scope``'s log into its n-gram snapshot and drop the log entries older than the
    suffix tree's window (``memory.window_tokens``), in one write transaction. Returns
    counts: entries folded, entries dropped, entries kept."""
    p = _prefix(scope)
    with env.begin(write=True, db=db) as txn:
        if scope == DEFAULT_SCOPE:
            _migrate(txn, db)
        if _get(txn, p, db) is None:
            raise ScopeError(f"there is no learned state in scope {scope!r}; scopes: {', '.join(scopes(txn, db)) or 'none'}")
        stored = read_scope(txn, db, scope, memory.window_tokens)
        online = OnlineState(1, memory, ngram=stored.ngram)
        for out in stored.unfolded:
            online.ngram.update(np.concatenate(([-1], out)).astype(np.int32))
        for k_, _ in list(_items(txn, p + b"ngram", db)):
            txn.delete(p + b"ngram" + k_, db=db)
        for name, a in online.ngram.state().items():
            _put(txn, p + b"ngram" + name.encode(), _npy(a), db)
        _put(txn, p + b"folded", _i8(stored.seq), db)
        entries = [k_ for k_, _ in _items(txn, p + b"out", db)]
        drop = entries[: len(entries) - len(stored.window)]
        for k_ in drop:
            txn.delete(p + b"out" + k_, db=db)
        _put(txn, p + b"epoch", _i8(stored.epoch + 1), db)
        _put(txn, p + b"seq", _i8(stored.seq + 1), db)  # so open readers notice and reload
    return {"folded": len(stored.unfolded), "dropped": len(drop), "kept": len(entries) - len(drop)}


def export(env: lmdb.Environment, db, scope: str, path: str | Path) -> dict[str, int]:
    """Write ``scope``'s learned state to ``path`` as .npz (numpy arrays, no pickles):
    outputs (int32, concatenated) with output_lengths and output_seqs, recycling_tokens and
    recycling_rows, calibration_names and calibration (float64 [sources, 3, ...]), and the
    n-gram snapshot as ngram_* with ngram_folded. Returns counts of what was written."""
    p = _prefix(scope)
    with env.begin(db=db) as txn:
        if _get(txn, p, db) is None and not (scope == DEFAULT_SCOPE and _get(txn, LEGACY, db) is not None):
            raise ScopeError(f"there is no learned state in scope {scope!r}; scopes: {', '.join(scopes(txn, db)) or 'none'}")
        if _get(txn, p, db) is None:
            old = _legacy(txn, db)
            stored = _legacy_stored(old, 0, old["recycling"].shape[1] if "recycling" in old else DEFAULT.topk)
            outs, seqs, folded = stored.unfolded, list(range(1, len(stored.unfolded) + 1)), 0
        else:
            stored = read_scope(txn, db, scope, 0)
            outs, seqs = [], []
            for k_, v in _items(txn, p + b"out", db):
                outs.append(_read_entry(v)[0])
                seqs.append(int.from_bytes(k_, "big"))
            folded = _int(_get(txn, p + b"folded", db))
    names = sorted(stored.calibration)
    arrays = {
        "outputs": np.concatenate(outs) if outs else np.empty(0, np.int32),
        "output_lengths": np.array([len(o) for o in outs], np.int64),
        "output_seqs": np.array(seqs, np.int64),
        "recycling_tokens": stored.rows[0], "recycling_rows": stored.rows[1],
        "calibration_names": np.array(names, dtype="U64"),
        "calibration": np.array([stored.calibration[n] for n in names]).reshape(-1, *_CAL_SHAPE),
        "ngram_folded": np.array([folded], np.int64),
        **{f"ngram_{k_}": v for k_, v in (stored.ngram or {}).items()},
    }
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return {"outputs": len(outs), "tokens": int(arrays["outputs"].shape[0]), "recycling_rows": len(stored.rows[0]),
            "calibration_sources": len(names)}
