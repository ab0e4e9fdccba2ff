"""Free cores from /proc/stat (with a real CPU hog), and the threads a verification block sets."""

import subprocess
import sys
import time

import numba
import pytest
import torch

from conftest import tiny_model
from retrodraft.decode import cores
from retrodraft.decode.cores import FreeCores
from retrodraft.decode.tree_attention import verification_kernels

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")


@linux
def test_a_cpu_hog_takes_a_core():
    free = FreeCores(window=0.0)
    n = len(free.cpus)
    time.sleep(0.5)
    quiet = free.count()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        free.count()  # the reading so far includes the hog's start
        time.sleep(1.0)
        loaded = free.count()
        others = free.others
    finally:
        hog.kill()
        hog.wait()
    assert 1 <= quiet <= n
    assert others >= 0.7, f"a process spinning for a second should read as a busy core, read {others:.2f}"
    assert loaded <= max(1, n - 1)


def test_readings_are_cached_within_the_window(monkeypatch):
    free = FreeCores(window=3600.0)
    monkeypatch.setattr(cores, "_busy_seconds", lambda cpus: pytest.fail("read /proc/stat within the window"))
    assert free.count() == len(free.cpus)


def test_without_proc_stat_every_core_is_free(monkeypatch):
    monkeypatch.setattr(cores, "_busy_seconds", lambda cpus: None)
    free = FreeCores(window=0.0)
    assert free.count() == len(free.cpus)


def test_verification_block_follows_the_free_cores_and_restores_the_threads(monkeypatch):
    model = tiny_model("llama")
    orig = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        before = torch.get_num_threads(), numba.get_num_threads()
        free = FreeCores(window=3600.0)  # no reading during the test: every core of the affinity is free
        monkeypatch.setattr(cores, "_shared", free)
        n = len(free.cpus)
        with verification_kernels(model) as threads:
            assert (torch.get_num_threads(), numba.get_num_threads()) == (min(before[0], n), min(before[1], n))
            monkeypatch.setattr(free, "count", lambda: 1)  # a neighbour took every core but one
            threads.update()
            assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
        assert (torch.get_num_threads(), numba.get_num_threads()) == before
    finally:  # other tests run on the threads they found
        torch.set_num_threads(orig[0])
        numba.set_num_threads(orig[1])


def test_threads_are_restored_after_an_exception():
    model = tiny_model("llama")
    before = torch.get_num_threads(), numba.get_num_threads()
    with pytest.raises(RuntimeError), verification_kernels(model):
        raise RuntimeError("boom")
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
