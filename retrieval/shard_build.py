"""Building and appending to a sharded datastore: one ordinary datastore build per shard.

The driver walks the corpus (file names only), gives each file to the shard its path hashes
to, and hands one job per shard to a runner: ``run_locally`` (in this process, one shard
after the other) or ``ray_runner`` (Ray tasks, on this machine or a cluster). A job reads
and tokenizes its own files and builds or appends its shard with ``Datastore.build`` /
``Datastore.append``: same format, checksums and atomic swap as any datastore. The driver
then writes each shard's document keys and, last, the manifest (``retrieval.manifest``).

A fresh build stages everything in a sibling ``DIR.incomplete-XXXX`` and swaps it in at
once, like a single datastore. An append changes shards in place (each atomically), then
the manifest; if it dies in between, opening reports which shard no longer matches the
manifest.
"""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator

import lmdb
import numpy as np
from tqdm import tqdm

from retrodraft.retrieval.build import tokenizer_info
from retrodraft.retrieval.swap import make_build_dir, swap_in, tidy, writer_lock
from retrodraft.retrieval.corpus import (
    DEFAULT_EXCLUDE, Document, EmptyCorpusError, SkipCounts, corpus_files, file_documents,
)
from retrodraft.retrieval.errors import StaleDatastoreError, TokenizerMismatchError
from retrodraft.retrieval.layout import DBS, MAP_SIZE
from retrodraft.retrieval.manifest import (
    fingerprint, is_sharded, read_keys, read_manifest, shard_for, shard_name, write_keys, write_manifest,
)
from retrodraft.retrieval.store import Datastore


@dataclass
class ShardJob:
    """One shard's share of a build or append.

    name       the shard's directory under the datastore (or its staging directory)
    exists     append to it (else build it)
    files      (key, path) of the source files it reads itself
    documents  or (key, Document) pairs handed over (Python callers' documents)
    fields     record fields holding text (``corpus.file_documents``)
    """

    name: str
    exists: bool
    files: list[tuple[int, str]] = field(default_factory=list)
    documents: list[tuple[int, Document]] = field(default_factory=list)
    fields: list[str] | None = None


@dataclass
class ShardResult:
    """What one job did: the shard's metadata fingerprint, the keys of the documents it added
    (int64, in stream order), counts, its own wall time and the worker's peak memory."""

    name: str
    fingerprint: str | None
    keys: np.ndarray
    documents: int
    tokens: int
    skipped: SkipCounts
    seconds: float
    peak_rss: int


@dataclass
class ShardedBuildStats:
    """What a sharded build or append did (documents/tokens added; totals afterwards)."""

    documents: int
    tokens: int
    total_documents: int
    total_tokens: int
    shards: list[ShardResult]
    seconds: float
    skipped: SkipCounts

    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


Runner = Callable[[list[ShardJob], str, object], Iterator[ShardResult]]


def run_job(root: str, job: ShardJob, tokenizer) -> ShardResult:
    """Build or append one shard under ``root`` (runs in a worker process or in this one)."""
    t0 = time.perf_counter()
    skipped = SkipCounts()
    keys: list[int] = []

    def documents() -> Iterator[Document]:
        for k, doc in job.documents:
            keys.append(k)
            yield doc
        for k, path in job.files:
            for doc in file_documents(Path(path), job.fields, skipped):
                keys.append(k)
                yield doc

    path = Path(root) / job.name
    meta, tokens = None, 0
    try:
        if job.exists:
            with Datastore.open(path, readonly=False) as ds:
                tokens = ds.append(documents(), tokenizer, progress=False, skipped=skipped).tokens
                meta = ds.meta
        else:
            with Datastore.build(path, documents(), tokenizer, progress=False, skipped=skipped) as ds:
                tokens, meta = ds.stats.tokens, ds.meta
    except EmptyCorpusError:
        keys.clear()  # every file of this shard was skipped: the shard stays as it was
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ShardResult(job.name, fingerprint(meta) if meta else None, np.array(keys, np.int64), len(keys), tokens,
                       skipped, time.perf_counter() - t0, peak)


def run_locally(jobs: list[ShardJob], root: str, tokenizer) -> Iterator[ShardResult]:
    """The runner without Ray: each job in this process, in turn."""
    for job in jobs:
        yield run_job(root, job, tokenizer)


def ray_runner(address: str | None = None, workers: int | None = None) -> Runner:
    """A runner that builds shards as Ray tasks (one CPU each).

    ``address`` None starts a new local Ray instance with ``workers`` CPUs (default: all
    cores), even where a cluster started by ``ray start`` runs on this machine; otherwise connects to that cluster ("auto", "ray://host:10001", "host:6379"), whose
    nodes must all see the datastore's path (a shared file system) and have retrodraft
    installed. Raises ModuleNotFoundError, saying how to install it, if Ray is missing.
    """
    try:
        import ray
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "sharded builds run on Ray, which is not installed: pip install -e \".[scale]\" (or pip install ray)"
        ) from e
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def run(jobs: list[ShardJob], root: str, tokenizer) -> Iterator[ShardResult]:
        import retrodraft

        here = str(Path(retrodraft.__file__).resolve().parents[1])
        env = {"RAYON_NUM_THREADS": "1",  # one tokenizer thread per task: the task holds one CPU
               "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        local = {"num_cpus": workers or os.cpu_count(), "object_store_memory": 1 << 28,
                 "include_dashboard": False} if address is None else {}
        ray.init(address=address or "local", runtime_env={"env_vars": env}, log_to_driver=False, **local)
        try:
            task = ray.remote(num_cpus=1, max_retries=0)(run_job)
            tok = ray.put(tokenizer)
            pending = [task.remote(root, job, tok) for job in jobs]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            ray.shutdown()

    return run


def build_sharded(out, tokenizer, shards: int, *, corpus=None, documents: Iterable[Document] | None = None,
                  fields: list[str] | None = None, exclude: Collection[str] = DEFAULT_EXCLUDE,
                  runner: Runner = run_locally, progress: bool = True,
                  skipped: SkipCounts | None = None) -> ShardedBuildStats:
    """Build a sharded datastore of ``shards`` shards at ``out``, replacing any datastore there.

    Give either ``corpus`` (a directory or file: each job reads its own files, walked as
    ``iter_documents`` does) or ``documents`` (held in memory until handed out). The new
    directory appears atomically, as for ``Datastore.build``; FileExistsError if ``out``
    exists and is not a datastore; EmptyCorpusError if no document was found. Errors of a
    shard's build (ShardTooLargeError: use more shards) are raised here.
    """
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")
    out = Path(out).absolute()
    _check_replaceable(out)  # before the lock: refusing leaves nothing beside a user's directory
    with writer_lock(out):
        tidy(out)
        _check_replaceable(out)
        return _build_in(out, tokenizer, shards, corpus, documents, fields, exclude, runner, progress, skipped)


def _check_replaceable(out: Path) -> None:
    """FileExistsError unless nothing is at ``out``, an empty directory or a sharded datastore: a
    sharded build replaces only those (an unsharded datastore or a user's directory is kept)."""
    if out.exists() and not (is_sharded(out) or (out.is_dir() and not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a datastore a sharded build may replace (a sharded datastore or an "
                              "empty directory); not replacing it: choose another --out")


def _build_in(out: Path, tokenizer, shards: int, corpus, documents, fields, exclude, runner, progress,
              skipped) -> ShardedBuildStats:
    """``build_sharded``'s work, holding ``out``'s writer lock."""
    tmp = make_build_dir(out)
    lock = os.open(tmp / "build.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        os.chmod(tmp, 0o755)
        skipped = SkipCounts() if skipped is None else skipped
        base = {"tokenizer": tokenizer_info(tokenizer), "files": 0, "documents": 0, "tokens": 0, "history": [],
                "shards": [{"name": shard_name(i), "documents": 0, "tokens": 0, "fingerprint": None, "keys": None}
                           for i in range(shards)]}
        jobs, files = _plan(base, corpus, documents, fields, exclude, skipped)
        stats = _run(tmp, base, jobs, files, tokenizer, runner, progress, skipped, "build")
        env = lmdb.open(str(tmp / "meta.lmdb"), max_dbs=len(DBS), map_size=MAP_SIZE)
        env.open_db(b"state")
        env.close()
        swap_in(tmp, out)
    finally:
        os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def append_sharded(out, tokenizer, *, corpus=None, documents: Iterable[Document] | None = None,
                   fields: list[str] | None = None, exclude: Collection[str] = DEFAULT_EXCLUDE,
                   runner: Runner = run_locally, progress: bool = True, skipped: SkipCounts | None = None,
                   expect: str | None = None) -> ShardedBuildStats:
    """Add documents (``corpus`` or ``documents``) to the sharded datastore at ``out``, each to
    the shard its path hashes to; shards without new documents are not touched.

    Appends wait for each other (a lock). TokenizerMismatchError if ``tokenizer`` is not the
    datastore's; StaleDatastoreError if ``expect`` (a manifest checksum) is given and the
    manifest changed since; EmptyCorpusError if there is nothing to add.
    """
    out = Path(out).absolute()
    # The same writer lock as builds of ``out`` take: an append and a build never interleave.
    with writer_lock(out):
        manifest = read_manifest(out)
        if expect is not None and manifest["checksum"] != expect:
            raise StaleDatastoreError(f"the sharded datastore at {out} changed after this process opened it; "
                                      "nothing was written: open it again and retry")
        info = tokenizer_info(tokenizer)
        if info["fingerprint"] != manifest["tokenizer"]["fingerprint"]:
            raise TokenizerMismatchError(
                f"the datastore at {out} was built with tokenizer {manifest['tokenizer']['name']!r} (fingerprint "
                f"{manifest['tokenizer']['fingerprint']}), not {info['name']!r} (fingerprint {info['fingerprint']})")
        skipped = SkipCounts() if skipped is None else skipped
        jobs, files = _plan(manifest, corpus, documents, fields, exclude, skipped)
        return _run(out, manifest, jobs, files, tokenizer, runner, progress, skipped, "append")


def _plan(manifest: dict, corpus, documents, fields, exclude, skipped) -> tuple[list[ShardJob], int]:
    """One job per shard that gets something; keys continue from ``manifest["files"]``.
    Returns the jobs and how many source files they cover."""
    if (corpus is None) == (documents is None):
        raise ValueError("pass either corpus (a path) or documents")
    n = len(manifest["shards"])
    jobs = {i: ShardJob(shard_name(i), manifest["shards"][i]["documents"] > 0, fields=fields) for i in range(n)}
    keys: dict[str, int] = {}
    if corpus is not None:
        for path in corpus_files(corpus, skipped, exclude):
            keys[str(path)] = k = manifest["files"] + len(keys)
            jobs[shard_for(str(path), n)].files.append((k, str(path)))
    else:
        for doc in documents:
            k = keys.setdefault(doc.path, manifest["files"] + len(keys))
            jobs[shard_for(doc.path, n)].documents.append((k, doc))
    return [j for j in jobs.values() if j.files or j.documents], len(keys)


def _run(root: Path, manifest: dict, jobs: list[ShardJob], files: int, tokenizer, runner: Runner, progress: bool,
         skipped: SkipCounts, op: str) -> ShardedBuildStats:
    """Run the jobs, then write their keys and the new manifest into ``root``."""
    t0 = time.perf_counter()
    results = []
    with tqdm(total=len(jobs), desc="shards", unit=" shard", disable=not progress) as shard_bar, \
            tqdm(desc="tokens", unit=" tok", unit_scale=True, disable=not progress) as tok_bar:
        for res in runner(jobs, str(root), tokenizer):
            results.append(res)
            shard_bar.update()
            tok_bar.update(res.tokens)
    for res in results:
        for k, v in res.skipped.as_dict().items():
            setattr(skipped, k, getattr(skipped, k) + v)
    added = [r for r in results if r.documents]
    if not added:
        raise EmptyCorpusError(f"no documents to add to the datastore (skipped: {skipped.as_dict()})")
    generation = len(manifest["history"])
    shards = [dict(s) for s in manifest["shards"]]
    for res in added:
        i = int(res.name.rsplit("-", 1)[1])
        entry = shards[i]
        old = read_keys(root, entry["keys"]) if entry["keys"] else np.empty(0, np.int64)
        entry["keys"] = write_keys(root, i, generation, np.concatenate([old, res.keys]))
        entry.update(documents=entry["documents"] + res.documents, tokens=entry["tokens"] + res.tokens,
                     fingerprint=res.fingerprint)
    seconds = time.perf_counter() - t0
    documents, tokens = sum(r.documents for r in added), sum(r.tokens for r in added)
    history = {"op": op, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "documents": documents, "tokens": tokens,
               "files": files, "seconds": round(seconds, 3), "skipped": skipped.as_dict()}
    before = {s["keys"]["name"] for s in manifest["shards"] if s["keys"]}
    new = write_manifest(root, {**manifest, "shards": shards, "files": manifest["files"] + files,
                                "documents": manifest["documents"] + documents, "tokens": manifest["tokens"] + tokens,
                                "history": manifest["history"] + [history]})
    for name in before - {s["keys"]["name"] for s in new["shards"] if s["keys"]}:
        (root / name).unlink(missing_ok=True)
    return ShardedBuildStats(documents, tokens, new["documents"], new["tokens"], results, seconds, skipped)
