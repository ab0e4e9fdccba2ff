"""Sharded datastores: real files, real tokenizer, built in-process and on a real local Ray;
drafts and greedy output equal to one datastore over the same documents."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from retrodraft.retrieval import (
    CorruptDatastoreError, Datastore, Document, ShardTooLargeError, StaleDatastoreError, TokenizerMismatchError,
    iter_documents,
)
from retrodraft.retrieval import build as build_module
from retrodraft.retrieval.drafters import CorpusDrafter
from retrodraft.retrieval.shard_build import append_sharded, build_sharded
from retrodraft.retrieval.shard_drafter import ShardedCorpusDrafter
from retrodraft.retrieval.shards import ShardedDatastore

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="module")
def tok():
    from retrodraft.decode import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~40 stdlib sources, two exact copies (equal documents in different shards: the merge's
    tie-break) and a JSON Lines file whose records must stay together in one shard."""
    root = tmp_path_factory.mktemp("corpus")
    for f in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:30]:
        (root / f"{f.parent.name}_{f.name}").write_text(f.read_text())
    for name in ("copy_a.py", "sub/copy_b.py"):
        (root / name).parent.mkdir(exist_ok=True)
        shutil.copy(STDLIB / "json" / "encoder.py", root / name)
    (root / "qa.jsonl").write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{2 * i}"})
                                             for i in range(50)))
    return root


@pytest.fixture(scope="module")
def stores(corpus, tok, tmp_path_factory):
    """One datastore, and the same corpus as 1 and as 4 shards (built in this process)."""
    d = tmp_path_factory.mktemp("stores")
    Datastore.build(d / "one", iter_documents(corpus), tok, progress=False).close()
    for n in (1, 4):
        build_sharded(d / f"s{n}", tok, n, corpus=corpus, progress=False)
    return d


def queries(ds: Datastore, rng, n: int):
    """Contexts ending inside real documents (long and short matches) and random ones."""
    for _ in range(n):
        if rng.random() < 0.8:
            end = int(rng.integers(2, ds.tokens.shape[0]))
            ctx = ds.tokens[max(0, end - int(rng.integers(1, 24))) : end]
            ctx = ctx[ctx >= 0]
        else:
            ctx = rng.integers(0, 2000, int(rng.integers(1, 8)))
        if ctx.shape[0]:
            yield ctx.astype(np.int32), int(rng.integers(1, 80))


def assert_same_drafts(one: Datastore, many: ShardedDatastore, n: int = 300, **kw):
    rng = np.random.default_rng(0)
    a_drafter = CorpusDrafter(one.tokens, one.suffix_array, one._source, **kw)
    b_drafter = ShardedCorpusDrafter(many.index, many._source, **kw)
    nonempty = 0
    for ctx, budget in queries(one, rng, n):
        a, b = a_drafter.propose(ctx, budget), b_drafter.propose(ctx, budget)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.parents, b.parents)
        assert np.array_equal(a.scores, b.scores)
        assert [a_drafter.locate(int(o)) for o in a.origins] == [b_drafter.locate(int(o)) for o in b.origins]
        nonempty += len(a) > 0
    assert nonempty > n // 2


@pytest.mark.parametrize("shards", [1, 4])
@pytest.mark.parametrize("max_positions", [256, 8])
def test_drafts_equal_one_datastore(stores, shards, max_positions):
    with Datastore.open(stores / "one") as one, Datastore.open(stores / f"s{shards}") as many:
        assert isinstance(many, ShardedDatastore) and len(many.shards) == shards
        assert (many.num_documents, many.num_tokens) == (one.num_documents, one.num_tokens)
        assert_same_drafts(one, many, max_positions=max_positions)


def test_documents_and_locate_match_one_datastore(stores, corpus):
    with Datastore.open(stores / "one") as one, Datastore.open(stores / "s4") as many:
        for i in range(one.num_documents):
            a, b = one.document(i), many.document(i)
            assert (a.path, a.record, a.length) == (b.path, b.record, b.length)
            assert many.locate(b.start + a.length // 2) == one.locate(a.start + a.length // 2)
        # every record of the JSON Lines file sits in one shard
        qa = str(corpus / "qa.jsonl")
        assert sum(any(s.document(j).path == qa for j in range(s.num_documents)) for s in many.shards) == 1
        with pytest.raises(TypeError, match="one stream per shard"):
            many.tokens
        with pytest.raises(ValueError, match="position must be in"):
            many.locate(-1)


def test_learned_state_lives_in_the_manifest_lmdb(stores, tmp_path, tok):
    path = tmp_path / "s"
    shutil.copytree(stores / "s4", path)
    with Datastore.open(path, readonly=False, tokenizer=tok, scope="team-a") as ds:
        ds.online(len(tok))
        ds.commit(np.array([1, 2, 3], np.int32))
        assert ds.scopes() == ["team-a"] and all(s.scopes() == [] for s in ds.shards)
    with Datastore.open(path, scope="team-a") as ds:
        ds.export_scope(tmp_path / "a.npz")
        assert np.load(tmp_path / "a.npz")["outputs"].tolist() == [1, 2, 3]


def test_append_goes_to_the_hashed_shard_and_stays_equal(stores, corpus, tmp_path, tok):
    one, many = tmp_path / "one", tmp_path / "many"
    shutil.copytree(stores / "one", one)
    shutil.copytree(stores / "s4", many)
    more = [Document(str(corpus / "qa.jsonl"), 50, "What is 50 + 50?\n\n100"),
            Document("/new/notes.md", 0, open(STDLIB / "json" / "decoder.py").read())]
    with Datastore.open(one, readonly=False) as ds:
        ds.append(more, tok, progress=False)
    with Datastore.open(many, readonly=False) as ds:
        total = ds.num_documents
        ds.append(more[:1], tok, progress=False)
        assert ds.stats.documents == 1 and ds.num_documents == total + 1
        # another process appends meanwhile (one LMDB environment per path per process)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from retrodraft.decode import load_tokenizer; "
                "from retrodraft.retrieval import Document; from retrodraft.retrieval.shard_build import append_sharded; "
                "append_sharded(sys.argv[2], load_tokenizer(), documents=[Document(sys.argv[3], 0, sys.argv[4])], "
                "progress=False)")
        subprocess.run([sys.executable, "-c", code, str(ROOT), str(many), more[1].path, more[1].text], check=True,
                       timeout=120)
        with pytest.raises(StaleDatastoreError):
            ds.append(more[1:], tok, progress=False)
    with Datastore.open(one) as a, Datastore.open(many) as b:
        assert_same_drafts(a, b, n=150)
        assert b.document(b.num_documents - 1).path == "/new/notes.md"


def test_damage_and_mismatch_are_reported(stores, tmp_path, tok):
    path = tmp_path / "s"
    shutil.copytree(stores / "s4", path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tokens"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptDatastoreError, match="checksum"):
        Datastore.open(path)
    shutil.copy(stores / "s4" / "manifest.json", path / "manifest.json")
    # a shard replaced behind the manifest's back
    victim = next(p for p in sorted(path.glob("shard-*")))
    shutil.rmtree(victim)
    Datastore.build(victim, [Document("/x.txt", 0, "something else")], tok, progress=False).close()
    with pytest.raises(CorruptDatastoreError, match="not the shard the manifest lists"):
        Datastore.open(path)
    with pytest.raises(TokenizerMismatchError):
        append_sharded(stores / "s1", tiny_tokenizer(), documents=[Document("/y.txt", 0, "y")], progress=False)
    with pytest.raises(ValueError, match="shards must be"):
        build_sharded(tmp_path / "bad", tok, 0, documents=[Document("/y.txt", 0, "y")])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a datastore"):
        build_sharded(tmp_path / "plain", tok, 2, documents=[Document("/y.txt", 0, "y")], progress=False)
    assert (tmp_path / "plain" / "keep.txt").read_text() == "mine"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(["y z"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", name_or_path="tiny")


def test_one_datastore_refuses_more_than_its_limit(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(build_module, "MAX_STREAM", 20)
    docs = [Document(f"/d{i}.txt", 0, "one two three four five six seven") for i in range(6)]
    with pytest.raises(ShardTooLargeError, match="--shards"):
        Datastore.build(tmp_path / "one", docs, tok, progress=False)
    assert not (tmp_path / "one").exists()
    # in shards of at most the limit it builds (6 documents of ~8 tokens over 8 shards)
    build_sharded(tmp_path / "many", tok, 16, documents=docs, progress=False)
    with Datastore.open(tmp_path / "many") as ds:
        assert ds.num_documents == 6 and all(s.tokens.shape[0] <= 20 for s in ds.shards)


def build_index(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "build_index.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install -e '.[scale]')")
def test_cli_builds_shards_on_a_local_ray_equal_to_the_in_process_build(stores, corpus, tmp_path):
    p = build_index(corpus, "--out", tmp_path / "ray", "--shards", 4, "--workers", 2, "--quiet")
    assert p.returncode == 0, p.stderr
    assert "4 shards" in p.stdout and "worker peak memory" in p.stdout and "tok/s" in p.stdout
    with Datastore.open(stores / "s4") as a, Datastore.open(tmp_path / "ray") as b:
        assert [s.path.name for s in a.shards] == [s.path.name for s in b.shards]
        for x, y in zip(a.shards, b.shards):
            assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.suffix_array, y.suffix_array)
        assert a.num_tokens == b.num_tokens


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install -e '.[scale]')")
def test_cli_builds_on_a_running_ray_cluster_given_its_address(stores, corpus, tmp_path):
    """--ray-address: a head started apart (as on a cluster's head node), the build as its driver."""
    import socket
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    short = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    ray = Path(sys.executable).with_name("ray")
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard=false", "--temp-dir", str(short)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the Ray head did not come up within 60 s"
            time.sleep(0.5)
        p = build_index(corpus, "--out", tmp_path / "c", "--shards", 4, "--ray-address", f"127.0.0.1:{port}",
                        "--quiet", env=env)
        assert p.returncode == 0, p.stderr
        with Datastore.open(stores / "s4") as a, Datastore.open(tmp_path / "c") as b:
            for x, y in zip(a.shards, b.shards, strict=True):
                assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.suffix_array, y.suffix_array)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(short, ignore_errors=True)


def test_cli_without_ray_says_how_to_install_it_and_builds_unsharded(stores, corpus, tmp_path):
    # A ray package that fails to import the way a missing one does.
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])}
    p = build_index(corpus, "--out", tmp_path / "s", "--shards", 2, "--quiet", env=env)
    assert p.returncode != 0 and 'pip install -e ".[scale]"' in p.stderr and not (tmp_path / "s").exists()
    p = build_index(corpus, "--out", tmp_path / "one", "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    with Datastore.open(tmp_path / "one") as ds:
        assert not isinstance(ds, ShardedDatastore) and ds.num_documents > 40
    p = build_index(corpus, "--out", tmp_path / "s", "--shards", 0)
    assert p.returncode != 0 and "--shards must be >= 1" in p.stderr
    p = build_index(corpus, "--out", tmp_path / "s", "--ray-address", "auto")
    assert p.returncode != 0 and "add --shards" in p.stderr
    p = build_index(corpus, "--out", stores / "s4", "--append", "--shards", 3)
    assert p.returncode != 0 and "has 4 shards" in p.stderr


@pytest.mark.model
def test_greedy_output_equal_with_one_and_four_shards(smollm, stores):
    from conftest import chat_ids
    from retrodraft.decode import generate

    model, tok = smollm
    ids = chat_ids(tok, "Write a Python function that encodes a dict as JSON with sorted keys.")
    ref = model.generate(ids, max_new_tokens=48, do_sample=False)
    outs = []
    for name in ("one", "s4"):
        with Datastore.open(stores / name) as ds:
            corpus = [d for d in ds.drafters(model.config.vocab_size) if d.name == "corpus"]
            outs.append(generate(model, ids, max_new_tokens=48, drafters=corpus, budget=16))
    assert torch.equal(outs[0].sequences, ref) and torch.equal(outs[1].sequences, ref)
    assert outs[0].stats.accepted_per_drafter == outs[1].stats.accepted_per_drafter
    assert outs[0].stats.steps == outs[1].stats.steps
