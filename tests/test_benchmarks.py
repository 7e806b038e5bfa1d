"""The benchmark scripts run: the GPU script's CPU dry run (every step at toy sizes) writes its one JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_the_gpu_script_dry_run_runs_every_step_and_writes_its_figures(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, timeout=1200, env=environment)
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["dry_run"] is True
    steps = figures["steps"]
    assert set(steps) == {"tests", "benchmark", "attention_2048", "experiment"}
    assert all(step["exit_code"] == 0 and not step["timed_out"] for step in steps.values())
    assert steps["tests"]["tests"] >= 6 and steps["tests"]["failures"] == steps["tests"]["errors"] == 0
    vit, attention = steps["benchmark"]["figures"]["vit"], steps["benchmark"]["figures"]["attention"]
    for mode in ("sdpa", "hard fast", "blur fast", "eval attentiondrop", "consistency (hard fast)"):
        assert vit[mode]["seconds"] > 0 and "peak_bytes" in vit[mode], mode
    assert attention["hard fast"]["seconds"] > 0 and attention["blur fast"]["peak_bytes"] >= 0
    # Every target is computed from the figures (on toy CPU sizes their values mean nothing).
    assert all(checked["ratio"] is not None for checked in figures["targets"].values())
    assert set(steps["experiment"]["runs"]) == {"hard_consistency-seed0"}
    assert steps["experiment"]["runs"]["hard_consistency-seed0"]["test_accuracy"] >= 0


def test_the_gpu_script_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no CUDA device here; pass --dry-run" in done.stderr
