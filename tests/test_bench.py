"""The benchmark scripts run (tiny sizes): a benchmark that crashes measures nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_make_bench_measures_every_section(tmp_path):
    out = bench("speed.py", "--quick", "--rounds", "1", "--out", str(tmp_path))
    results = json.loads((tmp_path / "speed.json").read_text())
    assert results["peak"]["fp32"] > 0 and results["train"][0]["tokens/s"] > 0
    assert results["generate"]["speedup"] > 0 and "overhead" in results["lightning"]
    assert "Lightning at micro" in out and (tmp_path / "speed.md").is_file()


@pytest.mark.slow
def test_gpu_check_runs_its_steps_on_a_cpu(tmp_path, workspace):
    """On a GPU it runs the same code with CUDA; here the script itself is checked."""
    bench("gpu_check.py", "--accelerator", "cpu", "--quick", "--skip-recipe",
          "--root", str(workspace.root), "--out", str(tmp_path))
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(row["ok"] for row in results["hardware"]) and results["hardware"]
    assert results["gpt2_shape"]["ok"] and results["gpt2_shape"]["train.py tokens/s"] > 0
