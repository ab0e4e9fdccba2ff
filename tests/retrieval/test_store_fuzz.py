"""Issue 12: random damage to every file of a small datastore: the same answer or a DatastoreError.

Each trial flips one byte (XOR with a random non-zero value) or truncates one file at a random
length, opens the datastore, reads everything (documents, the document table, learned state),
compares with the undamaged answer, and puts the file back. The loop runs in a child process:
a signal (SIGBUS from a mapped file) fails the test instead of killing pytest.
RETRODRAFT_FUZZ_TRIALS sets the number of trials (default 300, a few seconds); RETRODRAFT_FUZZ_SEED
the seed.
"""

import json
import os
import subprocess
import sys

import numpy as np

from retrodraft.retrieval import Datastore
from test_store import DIGEST, DOCS_A, DOCS_B, ROOT
from test_store_hardening import tok  # noqa: F401 (fixture)

TRIALS = int(os.environ.get("RETRODRAFT_FUZZ_TRIALS", "300"))
SEED = int(os.environ.get("RETRODRAFT_FUZZ_SEED", "12"))

FUZZ = DIGEST + """
import collections, random, sys
from pathlib import Path
from retrodraft.retrieval import Datastore, DatastoreError

path, trials, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def answer():
    with Datastore.open(path) as ds:
        state = {k: v.tolist() for k, v in sorted((ds.load_state("s") or {}).items())}
        return digest(ds) + json.dumps([ds.meta, state, ds.load_state("never")])

want = answer()
files = sorted(f for f in path.rglob("*") if f.is_file() and f.stat().st_size)
rng = random.Random(seed)
outcomes, wrong = collections.Counter(), []
for trial in range(trials):
    f = rng.choice(files)
    original = f.read_bytes()
    if rng.random() < 0.75:
        at = rng.randrange(len(original))
        damaged = bytearray(original)
        damaged[at] ^= rng.randrange(1, 256)
        how = f"flip byte {at}"
    else:
        at = rng.randrange(len(original))
        damaged = original[:at]
        how = f"truncate to {at}"
    f.write_bytes(bytes(damaged))
    try:
        outcome = "same" if answer() == want else "DIFFERENT"
    except DatastoreError as e:
        outcome = type(e).__name__
    except Exception as e:
        outcome = "RAW " + type(e).__name__
    finally:
        f.write_bytes(original)
    outcomes[outcome] += 1
    if outcome == "DIFFERENT" or outcome.startswith("RAW"):
        wrong.append(f"{f.relative_to(path)}: {how}: {outcome}")
print(json.dumps({"outcomes": outcomes, "wrong": wrong[:20], "files": [str(f.relative_to(path)) for f in files]}))
"""


def test_random_damage_gives_the_same_answer_or_a_datastore_error(tmp_path, tok):
    path = tmp_path / "ds"
    Datastore.build(path, DOCS_A, tok, progress=False).close()
    with Datastore.open(path, readonly=False) as ds:
        ds.append(DOCS_B, tok, progress=False)
        ds.save_state("s", {"a": np.arange(40, dtype=np.int32), "b": np.eye(3)})
        ds.save_state("s", {"a": np.arange(50, dtype=np.int32), "b": np.eye(4)})
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{FUZZ}",
                        str(path), str(TRIALS), str(SEED)], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"the fuzz loop died (exit {p.returncode}): {p.stderr[-3000:]}"
    result = json.loads(p.stdout)
    print(result["outcomes"])
    assert not result["wrong"], result
    assert "meta.lmdb/data.mdb" in result["files"] and "tokens.arrow" in result["files"]
    assert sum(result["outcomes"].values()) == TRIALS and result["outcomes"].get("same", 0) < TRIALS
