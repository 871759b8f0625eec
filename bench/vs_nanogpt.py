"""Whole processes side by side: nanoGPT's Shakespeare-char CPU recipe, the same recipe on
gptlab, and `make train`; wall seconds and the final validation loss of each.

    python bench/vs_nanogpt.py --nanogpt <nanoGPT checkout> [--rounds 2] [--out bench/results]

The three commands take turns (in rotating order) each round, because a machine's speed
drifts over minutes; the figures are medians over rounds. A process's time counts from its
start to its exit: imports, data loading (each side's prepared data already on disk, as after
a first run), training, validation and saving. Losses: nanoGPT prints a 20-batch estimate of
its validation loss (its README's figure, 1.88); gptlab prints `val_full/loss`, every token of
the same 10% validation split scored by the best checkpoint.
Writes bench/results/vs_nanogpt.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from interleave import interleaved  # bench/interleave.py

REPO = Path(__file__).resolve().parent.parent
# nanoGPT's README, "I only have a macbook" (its CPU recipe), with the output in a temp folder.
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
               "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_VAL = re.compile(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", re.M)
GPTLAB_VAL = re.compile(r"^val_full/loss ([\d.]+)", re.M)


def prepare_nanogpt(checkout: Path) -> None:
    """nanoGPT's char-level data from gptlab's copy of Tiny Shakespeare (no download)."""
    data = checkout / "data" / "shakespeare_char"
    if (data / "val.bin").is_file():
        return
    from gptlab.data import sources  # here, so that --help needs no gptlab install

    shutil.copyfile(sources.locate(sources.TINY_SHAKESPEARE), data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True)


Command = tuple[list[str], Path, re.Pattern]  # the command line, its folder, its loss line


def commands(checkout: Path, work: Path, quick: bool) -> dict[str, Command]:
    gptlab = [sys.executable, str(REPO / "train.py"), f"paths.root_dir={work}", "logger=csv",
              *(["debug=fast"] if quick else [])]
    nanogpt = [sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={work / 'nanogpt-out'}",
               *(["--max_iters=6", "--eval_interval=3"] if quick else [])]
    return {
        "nanoGPT train.py (CPU recipe)": (nanogpt, checkout, NANOGPT_VAL),
        "gptlab experiment=nanogpt_shakespeare_char_cpu": (
            [*gptlab, "experiment=nanogpt_shakespeare_char_cpu"], REPO, GPTLAB_VAL),
        "gptlab make train (default recipe)": (gptlab, REPO, GPTLAB_VAL),
    }


def run(command: list[str], cwd: Path, pattern: re.Pattern) -> tuple[float, float]:
    """Wall seconds of the whole process and the last validation loss it printed."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed (exit {proc.returncode}):\n"
                 f"{(proc.stdout + proc.stderr)[-2000:]}")
    losses = pattern.findall(proc.stdout + proc.stderr)
    if not losses:
        sys.exit(f"error: no validation loss in the output of {' '.join(command)}")
    return seconds, float(losses[-1])


def report(rows: list[dict]) -> str:
    base = rows[0]["seconds"]
    lines = ["| command | wall s (median) | time / nanoGPT | final val loss |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['command']} | {r['seconds']:.0f} | {r['seconds'] / base:.2f} | "
              f"{r['val_loss']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few steps (tests the script)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        sys.exit(f"error: --nanogpt {args.nanogpt} has no train.py; give a checkout of "
                 f"https://github.com/karpathy/nanoGPT")
    prepare_nanogpt(args.nanogpt.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        variants = commands(args.nanogpt.resolve(), Path(tmp), args.quick)
        losses: dict[str, float] = {}

        def timed(name: str) -> float:
            seconds, losses[name] = run(*variants[name])
            return seconds

        times = interleaved({name: (lambda n=name: timed(n)) for name in variants}, args.rounds)
    rows = [{"command": name, "seconds": statistics.median(times[name]), "times": times[name],
             "val_loss": losses[name]} for name in variants]
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(rows)
    (args.out / "vs_nanogpt.md").write_text(text)
    (args.out / "vs_nanogpt.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
