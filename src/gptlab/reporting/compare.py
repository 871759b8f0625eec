"""Compare training runs locally, without W&B.

    python -m gptlab.reporting.compare <sweep folder or run folders ...> [--out FOLDER]

Prints one row per run (the overrides that tell runs apart, parameters, steps, tokens, wall
time, best and final val/loss, whole-split val_full/loss), writes it as comparison.md and
comparison.csv, and plots the validation curves against step, tokens and wall time into
val_curves.png. Everything is read from the run folders' own files (.hydra/overrides.yaml,
csv/metrics.csv, model_config.json), so a crashed run shows what it logged before.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from gptlab.errors import UserError
from gptlab.models.gpt import GPT, GPTConfig

COLUMNS = ["run", "params", "steps", "tokens", "wall_s", "best val/loss", "final val/loss",
           "val_full/loss"]
CURVE_AXES = [("step", "step"), ("val/tokens", "tokens seen"), ("val/elapsed_s", "wall seconds")]


@dataclass
class Run:
    path: Path
    overrides: list[str]
    metrics: list[dict[str, float]]
    params: int | None

    def column(self, name: str) -> list[float]:
        """Every value of `name` in the metrics CSV, in order."""
        return [row[name] for row in self.metrics if name in row]

    def last(self, name: str) -> float | None:
        values = self.column(name)
        return values[-1] if values else None


def is_run(folder: Path) -> bool:
    return (folder / "csv" / "metrics.csv").is_file()


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders named directly, or found below a sweep (or any) folder."""
    runs: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise UserError(f"{given} is not a folder; pass run folders or a sweep folder")
        found = [given] if is_run(given) else sorted(
            p.parent.parent for p in given.rglob("csv/metrics.csv"))
        if not found:
            raise UserError(f"no run folder (with csv/metrics.csv) in {given}; pass run "
                            "folders of runs that used the csv logger (logger=csv or many)")
        runs += found
    return runs


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_run(folder: Path) -> Run:
    with open(folder / "csv" / "metrics.csv") as f:
        rows = [{k: v for k, v in ((k, _number(v)) for k, v in row.items()) if v is not None}
                for row in csv.DictReader(f)]
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return Run(folder, overrides or [], rows, count_params(folder))


def count_params(folder: Path) -> int | None:
    """Non-embedding parameters, from model_config.json (built on the meta device: no memory)."""
    config_file = folder / "model_config.json"
    if not config_file.is_file():
        return None
    with torch.device("meta"):
        model = GPT(GPTConfig(**json.loads(config_file.read_text())))
    return model.num_params()


def labels(runs: list[Run]) -> list[str]:
    """Each run named by the overrides that differ between runs (all of them if only one)."""
    shared = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    names = [" ".join(o for o in r.overrides if o not in shared) for r in runs]
    return [name or r.path.name for name, r in zip(names, runs, strict=True)]


def summarize(run: Run, label: str) -> dict:
    val = run.column("val/loss")
    tokens, wall = run.last("train/tokens"), run.last("train/elapsed_s")
    return {
        "run": label,
        "params": run.params,
        "steps": int(max(run.column("step"), default=0)),
        "tokens": None if tokens is None else int(tokens),
        "wall_s": wall,
        "best val/loss": min(val, default=None),
        "final val/loss": run.last("val/loss"),
        "val_full/loss": run.last("val_full/loss"),
    }


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1f}" if column == "wall_s" else f"{value:.4f}"
    return str(value)


def write_table(rows: list[dict], out: Path) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(table)
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return table


def plot_curves(runs: list[Run], names: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    # The legend goes below the panels, one line per run, so long override names fit.
    fig, axes = plt.subplots(1, len(CURVE_AXES), figsize=(15, 4.2 + 0.22 * len(runs)),
                             sharey=True, layout="constrained")
    values = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        style = ("-", "--", ":")[i // 10 % 3]  # the colour cycle repeats after 10 runs
        rows = [row for row in run.metrics if "val/loss" in row]
        values += [row["val/loss"] for row in rows]
        for ax, (key, _) in zip(axes, CURVE_AXES, strict=True):
            points = [(row[key], row["val/loss"]) for row in rows if key in row]
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3,
                        label=name if ax is axes[0] else None)
    for ax, (_, title) in zip(axes, CURVE_AXES, strict=True):
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes[0].set_ylabel("val/loss (fixed validation windows)")
    if values:  # the first evaluations are far above the rest: zoom on where runs differ
        low = min(values)
        axes[0].set_ylim(low - 0.02 * low, min(max(values), 1.35 * low) + 0.01)
    fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    fig.suptitle(f"Validation loss of {len(runs)} run{'s' * (len(runs) > 1)}")
    path = out / "val_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(paths: list[str], out: Path | None = None) -> list[dict]:
    runs = [load_run(folder) for folder in find_runs(paths)]
    out = Path(out or (paths[0] if len(paths) == 1 else "."))
    out.mkdir(parents=True, exist_ok=True)
    names = labels(runs)
    rows = [summarize(run, name) for run, name in zip(runs, names, strict=True)]
    print(write_table(rows, out))
    png = plot_curves(runs, names, out)
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {png}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders, or a folder holding runs")
    parser.add_argument("--out", help="where to write the table and plots (default: the "
                        "single folder given, else the current folder)")
    args = parser.parse_args(argv)
    try:
        compare(args.paths, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
