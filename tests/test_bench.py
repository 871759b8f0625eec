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


@pytest.mark.slow
def test_the_nanogpt_comparison_runs_both_sides(tmp_path):
    """Against a stand-in for nanoGPT's train.py that prints what nanoGPT prints."""
    checkout = tmp_path / "nanoGPT"
    data = checkout / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    (data / "prepare.py").write_text("open('val.bin', 'wb').write(b'0' * 4)\n")
    (checkout / "train.py").write_text(
        "import sys\nassert '--device=cpu' in sys.argv\n"
        "print('step 6: train loss 3.1000, val loss 3.2500')\n")
    bench("vs_nanogpt.py", "--nanogpt", str(checkout), "--rounds", "1", "--quick",
          "--out", str(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "vs_nanogpt.json").read_text())
    assert [row["val_loss"] for row in rows][0] == 3.25
    assert all(row["seconds"] > 0 and row["val_loss"] > 0 for row in rows)
