import logging

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import tiny_model
from retrodraft.decode import budget
from retrodraft.decode.budget import SIZES, CostCurve, CostModel, bucket, choose_budget


def curve(costs):
    return CostCurve(SIZES, tuple(costs)).table()


FLAT = curve([1.0] * len(SIZES))
CPU_LIKE = curve([1, 1.5, 1.9, 1.8, 1.6, 1.45, 1.5, 1.7, 1.8, 2.1, 2.4, 3.2, 3.8])


def test_nothing_confident_means_no_speculation():
    assert choose_budget(np.array([0.05, 0.01, 0.01], np.float32), CPU_LIKE) == 0
    assert choose_budget(np.array([], np.float32), CPU_LIKE) == 0


def test_free_verification_takes_every_candidate():
    assert choose_budget(np.full(10, 0.01, np.float32), FLAT) == 10


def test_a_confident_long_copy_is_verified_whole():
    assert choose_budget(np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5]), CPU_LIKE) == 8


def test_a_cheaper_larger_size_is_padded_with_the_next_candidates():
    # c(2) = 1.9 but c(6) = 1.45: two good nodes come with four more at lower cost
    scores = np.array([0.9, 0.8, 0.05, 0.05, 0.05, 0.05, 0.05, 0.01])
    assert choose_budget(scores, CPU_LIKE) == 6


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=64),
       st.lists(st.floats(0, 0.3), min_size=len(SIZES) - 1, max_size=len(SIZES) - 1),
       st.floats(0.05, 1.0))
def test_a_cheaper_curve_never_gives_a_smaller_tree(scores, steps, shrink):
    # a monotone curve, and the same curve with every marginal cost scaled down
    costs = np.concatenate(([1.0], 1.0 + np.cumsum(steps)))
    cheap = 1.0 + shrink * (costs - 1.0)
    s = np.array(scores)
    assert choose_budget(s, curve(cheap)) >= choose_budget(s, curve(costs))


def test_buckets_are_nearest_on_a_log_scale():
    assert bucket(10) == 256 and bucket(600) == 1024 and bucket(100_000) == 4096


def test_measured_curve_is_cached_on_disk_and_announced(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RETRODRAFT_CACHE", str(tmp_path))
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="retrodraft"):
        table = CostModel(model).table(100)
    assert table.shape == (65,) and table[0] == pytest.approx(1.0) and np.all(table > 0)
    assert any("measuring the cost of verifying" in r.getMessage() for r in caplog.records)
    files = list((tmp_path / "cost").glob("*.json"))
    assert len(files) == 1
    # a second model object of the same config reads the file: measuring again would fail here
    monkeypatch.setattr(budget, "measure", lambda *a, **k: pytest.fail("measured again instead of reading the cache"))
    np.testing.assert_array_equal(CostModel(model).table(100), table)
