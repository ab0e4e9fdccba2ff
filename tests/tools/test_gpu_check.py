"""tools/gpu_check.py end to end in its quick CPU mode (the GPU run is the same code)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED
from retrodraft.tools import gpu_check


@pytest.mark.model
def test_quick_cpu_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    data = SHARED / "data"
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out)]
    if data.is_dir():
        cmd += ["--data", str(data)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"]
    e = report["exactness"]["float32"]  # quick: float32 only
    assert e["prompts"] == 2 and 0 <= e["prompt_lookup_diverged"] <= 2
    assert e["ours_diverged"] == 0  # float32: exact
    assert len(report["cost"]) == 2
    for curve in report["cost"].values():
        assert curve["sizes"] == [0, 1, 2, 4, 8] and curve["costs"][0] == 1.0 and min(curve["seconds"]) > 0
    if data.is_dir():
        s = report["specbench"]
        assert set(s["results"]) == set(gpu_check.SPECBENCH_METHODS)
        assert s["not_identical"]["retrodraft"] == 0 and 0 < s["host_share_of_step"] <= 1
        assert report["replay"]["by_category"]["overall"]["predicted_speedup"] > 0
        assert "ours / best single drafter (drafter:" in done.stdout
    else:
        assert "skipped" in report["specbench"] and "skipped" in report["replay"]
    assert "exactness float32: ours diverged 0/2" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float8"], "unknown dtype 'float8'"),
    (["--prompts", "0"], "at least 1"),
    (["--device", "nonsense"], "device 'nonsense' is not usable"),
])
def test_bad_arguments_are_clear_errors(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        gpu_check.main(["--out", str(tmp_path / "x.json"), *args])


@pytest.mark.model
def test_a_failing_phase_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no memory for the 1B model")

    monkeypatch.setattr(gpu_check, "random_llama", broken)
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit, match="phases failed: cost"):
        gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--data", str(tmp_path / "none")])
    report = json.loads(out.read_text())
    assert "no memory for the 1B model" in report["errors"]["cost"] and list(report["errors"]) == ["cost"]
    assert report["exactness"]["float32"]["ours_diverged"] == 0  # the phase before still counts
    assert "default model" in report["cost"]  # what the failed phase measured before failing is kept
    assert "skipped" in report["specbench"] and "cost phase failed" in report["replay"]["skipped"]
