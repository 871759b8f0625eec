"""Compare training runs locally, without W&B.

    python -m gptlab.reporting.compare <sweep folder or run folders ...> [--out FOLDER]
        [--versus KEY [--fit]] [--curves METRIC ...]

Every multirun ends with this comparison in its sweep folder (hydra.callbacks.compare).

- comparison.md / .csv: one row per run, named by the overrides that tell the runs apart:
  parameters, steps, tokens, wall time, and the metric the runs optimise (val/loss for
  pretraining, val/acc for classification, val/bleu for text-to-text): its best and final
  value during training, and the whole-split scores of the best checkpoint (val_full/*) and
  of the last weights (val_last/*); a `reference` column when the runs' configs carry a
  published figure; the machine each run trained on (its machine.json: CPU or GPU,
  threads, precision, torch), with a warning when the runs did not all run on one; and the
  figures of the runs' evaluate.py reports (evaluation-*.json, e.g.
  test/bleu), the newest report winning where two give the same figure; a report of another
  decoding or data (beam_size=..., best-of-n, data=...) adds only the figures it names
  apart (test_best_of_4/...).
- comparison_by_setting.md / .csv, when runs repeat a setting with other seeds: mean and
  standard deviation over the seeds.
- val_curves.png: the validation curves against step, tokens and wall time; with --curves,
  also <metric>_curves.png for each further metric (e.g. val/chrf).
- with --versus KEY (an override such as task.transfer_layers, or params, or tokens): the
  final whole-split metric against it, <metric>_vs_<KEY>.png; with --fit, a power law
  y = a * x^-alpha + c fitted over the points, on a log x axis (scaling laws).

Everything is read from the run folders' own files (.hydra/config.yaml and overrides.yaml,
csv/metrics.csv, model_config.json, machine.json), so a crashed run shows what it logged
before.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from gptlab.errors import UserError
from gptlab.hardware import recorded_machines
from gptlab.models import GPTConfig, build_model

RUN_COLUMNS = ["run", "params", "steps", "tokens", "wall_s"]
CURVE_AXES = [("step", "optimizer steps", "linear"), ("val/tokens", "tokens seen", "log"),
              ("val/elapsed_s", "wall seconds", "log")]  # log: for loss curves only
DERIVED_KEYS = ("params", "tokens")  # --versus keys read from the runs, not their overrides


@dataclass
class Run:
    path: Path
    overrides: list[str]
    metrics: list[dict[str, float]]
    params: int | None
    config: dict = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)  # evaluate.py's figures
    machines: list[str] = field(default_factory=list)  # where it trained (resumed: several)

    @property
    def metric(self) -> str:
        return self.config.get("optimized_metric", "val/loss")

    @property
    def mode(self) -> str:
        return self.config.get("optimized_mode", "min")

    def column(self, name: str) -> list[float]:
        """Every value of `name` in the metrics CSV, in order."""
        return [row[name] for row in self.metrics if name in row]

    def last(self, name: str) -> float | None:
        values = self.column(name)
        return values[-1] if values else None

    def final(self, metric: str) -> float | None:
        """The last weights on the whole validation split, else the last validation."""
        name = metric.split("/", 1)[1]
        value = self.last(f"val_last/{name}")
        return self.last(metric) if value is None else value

    def override(self, key: str) -> str | None:
        for override in self.overrides:
            if _key(override) == key:
                return override.partition("=")[2]
        return None


def is_run(folder: Path) -> bool:
    return (folder / "csv" / "metrics.csv").is_file()


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders named directly, or found below a sweep (or any) folder."""
    runs: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise UserError(f"{given} is not a folder; pass run folders or a sweep folder")
        found = [given] if is_run(given) else sorted(
            (p.parent.parent for p in given.rglob("csv/metrics.csv")), key=_natural)
        if not found:
            raise UserError(f"no run folder (with csv/metrics.csv) in {given}; pass run "
                            "folders of runs that used the csv logger (logger=csv or many)")
        runs += found
    return runs


def _natural(path: Path) -> list:
    """Job folders 0, 1, ..., 10 in numeric order, not 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def load_run(folder: Path) -> Run:
    with open(folder / "csv" / "metrics.csv") as f:
        rows = [{k: v for k, v in ((k, _number(v)) for k, v in row.items()) if v is not None}
                for row in csv.DictReader(f)]
    overrides = _yaml(folder / ".hydra" / "overrides.yaml") or []
    config = _yaml(folder / ".hydra" / "config.yaml") or {}
    return Run(folder, overrides, rows, count_params(folder), config, evaluations(folder),
               machines(folder))


def machines(folder: Path) -> list[str]:
    """Where the run trained (machine.json; several if it resumed elsewhere; none before
    runs recorded it)."""
    return [m["description"] for m in recorded_machines(folder)]


def evaluations(folder: Path) -> dict[str, float]:
    """The figures (e.g. test/bleu) of the run's evaluate.py reports, newest last.

    A report of another decoding or data than the run's own (evaluate.py beam_size=...,
    best-of-n or data=...: a name such as evaluation-last-test-beam1.json) gives only the
    figures it names apart (test_best_of_4/...), so `test/bleu` is always the run's own."""
    figures = {}
    for path in sorted(folder.glob("evaluation-*.json"), key=lambda p: p.stat().st_mtime):
        report = json.loads(path.read_text())
        split = report.get("split")
        own_decoding = split is None or path.stem.endswith(f"-{split}")
        figures |= {name: value for name, value in report.items()
                    if "/" in name and isinstance(value, int | float)
                    and (own_decoding or not name.startswith(f"{split}/"))}
    return figures


def count_params(folder: Path) -> int | None:
    """Non-embedding parameters, from model_config.json (built on the meta device: no memory)."""
    config_file = folder / "model_config.json"
    if not config_file.is_file():
        return None
    with torch.device("meta"):
        model = build_model(GPTConfig(**json.loads(config_file.read_text())))
    return model.num_params()


def distinguishing(override_lists: list[list[str]]) -> list[str]:
    """Each list of overrides reduced to those that differ between the lists."""
    shared = set.intersection(*map(set, override_lists)) if len(override_lists) > 1 else set()
    return [" ".join(o for o in overrides if o not in shared) for overrides in override_lists]


def labels(runs: list[Run]) -> list[str]:
    """Each run named by the overrides that differ between runs (its folder if none do)."""
    names = distinguishing([run.overrides for run in runs])
    return [name or run.path.name for name, run in zip(names, runs, strict=True)]


def _key(override: str) -> str:
    """`+model.dropout=0.1` -> `model.dropout`."""
    return override.lstrip("+~").partition("=")[0]


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if _key(o) not in keys]


def metric_columns(metric: str) -> list[str]:
    name = metric.split("/", 1)[1]
    return [f"best {metric}", f"final {metric}", f"val_full/{name}", f"val_last/{name}"]


def summarize(run: Run, label: str, metric: str) -> dict:
    best = min if run.mode == "min" else max
    tokens = run.last("train/tokens")
    best_column, final_column, *whole_split = metric_columns(metric)
    row = {
        "run": label,
        "params": run.params,
        "steps": int(max(run.column("step"), default=0)),
        "tokens": None if tokens is None else int(tokens),
        "wall_s": run.last("train/elapsed_s"),
        best_column: best(run.column(metric), default=None),
        final_column: run.last(metric),
    } | {column: run.last(column) for column in whole_split}
    reference = (run.config.get("reference") or {}).get(metric)
    return row | ({"reference": reference} if reference is not None else {}) | {
        "machine": " + ".join(run.machines) or None}


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):  # (mean, std) over seeds
        return f"{_cell(column, value[0])} ± {_cell(column, value[1])}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1f}" if column == "wall_s" else f"{value:.4f}"
    return str(value)


def write_table(rows: list[dict], columns: list[str], out: Path, name: str) -> str:
    """rows as `name`.md (returned) and `name`.csv; a (mean, std) cell is two CSV columns."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(table)
    flat_rows = []
    for row in rows:
        flat = {}
        for column in columns:
            value = row.get(column)
            if isinstance(value, tuple):
                flat[f"{column} mean"], flat[f"{column} std"] = value
            else:
                flat[column] = value
        flat_rows.append(flat)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat_rows[0]))
        writer.writeheader()
        writer.writerows(flat_rows)
    return table


def _mean_std(values: list) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def by_setting(runs: list[Run], rows: list[dict], metric: str,
               evaluated: list[str]) -> list[dict] | None:
    """Mean and std over runs that differ only in their seed; None if no setting repeats."""
    settings = distinguishing([_without(run.overrides, "seed") for run in runs])
    groups: dict[str, list[dict]] = defaultdict(list)
    for setting, row in zip(settings, rows, strict=True):
        groups[setting].append(row)
    if all(len(group) == 1 for group in groups.values()):
        return None
    summary = []
    for setting, group in groups.items():
        entry = {"setting": setting or "(all runs)", "runs": len(group)}
        for column in ["wall_s", *metric_columns(metric), *evaluated]:
            entry[column] = _mean_std([row[column] for row in group])
        entry["reference"] = group[0].get("reference")
        summary.append(entry)
    return summary


def _compact(value: float, _position=None) -> str:
    """2k, 50k, 1.5M: tick labels short enough not to overlap."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def _log_x(ax) -> None:
    """A log x axis with ticks at 1, 2 and 5 times each power of ten, labelled compactly."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    axis = ax.xaxis
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(_compact))
    axis.set_minor_formatter(NullFormatter())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[Run], names: list[str], metric: str, out: Path,
                filename: str = "val_curves.png") -> Path:
    """Validation curves; the seeds of one setting share a colour, with a line style each."""
    plt = _pyplot()
    settings = distinguishing([_without(run.overrides, "seed") for run in runs])
    colours = {setting: f"C{i % 10}" for i, setting in enumerate(dict.fromkeys(settings))}
    repeats: dict[str, int] = defaultdict(int)
    # Loss curves fall like power laws: log axes spread out the early part of training.
    scales = [scale if metric.endswith("loss") else "linear" for _, _, scale in CURVE_AXES]
    # The legend goes below the panels, one line per run, so long override names fit.
    fig, axes = plt.subplots(1, len(CURVE_AXES), figsize=(15, 4.2 + 0.22 * len(runs)),
                             sharey=True, layout="constrained")
    values = []
    for run, name, setting in zip(runs, names, settings, strict=True):
        style = ("-", "--", ":", "-.")[repeats[setting] % 4]
        repeats[setting] += 1
        rows = [row for row in run.metrics if metric in row]
        values += [row[metric] for row in rows]
        for ax, (key, _, _), scale in zip(axes, CURVE_AXES, scales, strict=True):
            # Lightning logs a validation after step N as step N-1: count completed steps.
            points = [(row[key] + (key == "step"), row[metric]) for row in rows
                      if key in row and (scale == "linear" or row[key] > 0)]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=colours[setting], marker="o",
                        markersize=3, label=name if ax is axes[0] else None)
    for ax, (_, title, _), scale in zip(axes, CURVE_AXES, scales, strict=True):
        ax.set_xlabel(title + (" (log scale)" if scale == "log" else ""))
        if scale == "log":
            _log_x(ax)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"{metric} during training")
    if values and metric.endswith("loss"):  # the first evaluations are far above the rest
        low = min(values)
        axes[0].set_ylim(low - 0.02 * low, min(max(values), 1.35 * low) + 0.01)
    fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    fig.suptitle(f"Validation {metric} of {len(runs)} run{'s' * (len(runs) > 1)}")
    path = out / filename
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fit_power_law(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """(a, alpha, c) of y = a * x^-alpha + c, least squares in y.

    For each floor c on a grid below min(y), log(y - c) is linear in log(x); the c whose
    line fits y best wins. Needs at least three points.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        raise UserError(f"a power law needs at least 3 points, these runs give {len(x)}")
    best = (math.inf, 0.0, 0.0, 0.0)
    for c in np.linspace(0.0, y.min(), 400, endpoint=False):
        slope, intercept = np.polyfit(np.log(x), np.log(y - c), 1)
        a, alpha = math.exp(intercept), -slope
        error = float(np.sum((a * x ** -alpha + c - y) ** 2))
        if error < best[0]:
            best = (error, a, alpha, float(c))
    return best[1:]


def _x_value(run: Run, row: dict, key: str) -> float | str | None:
    if key in DERIVED_KEYS:
        return row[key]
    value = run.override(key)
    return value if value is None or _number(value) is None else _number(value)


def plot_versus(runs: list[Run], rows: list[dict], metric: str, key: str, fit: bool,
                out: Path) -> Path:
    """The final metric against `key`, mean +- std over seeds, one line per other setting."""
    series_of = (["runs"] * len(runs) if key in DERIVED_KEYS else
                 distinguishing([_without(run.overrides, key, "seed") for run in runs]))
    points: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for run, row, series in zip(runs, rows, series_of, strict=True):
        x, y = _x_value(run, row, key), run.final(metric)
        if x is None or y is None:
            raise UserError(f"run {run.path} has no {key} or no final {metric}; pick a key "
                            f"that every run overrides, or {' or '.join(DERIVED_KEYS)}")
        points[series or "runs"][x].append(y)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    for series, by_x in points.items():
        xs = sorted(by_x, key=lambda v: (isinstance(v, str), v))
        stats = [_mean_std(by_x[x]) for x in xs]
        means, stds = [s[0] for s in stats], [s[1] for s in stats]
        line = ax.errorbar([str(x) for x in xs] if isinstance(xs[0], str) else xs, means,
                           yerr=stds if any(stds) else None, marker="o", capsize=3,
                           linestyle="-" if not fit else "none", label=series)
        if fit:
            a, alpha, c = fit_power_law(xs, means)
            grid = np.geomspace(min(xs), max(xs), 100)
            ax.plot(grid, a * grid ** -alpha + c, color=line[0].get_color(),
                    label=f"fit: {a:.3g} * {key}^-{alpha:.3f} + {c:.3f}")
            print(f"power law over {len(xs)} points: {metric} = {a:.4g} * {key}^-{alpha:.4f}"
                  f" + {c:.4f}")
    if fit:  # y stays linear: with the floor c, the curve is not a line on log y anyway
        _log_x(ax)
    if not fit and all(isinstance(x, float) and x.is_integer() for by_x in points.values()
                       for x in by_x):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(key + (" (non-embedding parameters)" if key == "params" else ""))
    ax.set_ylabel(f"final {metric} (whole val split, last weights)")
    ax.grid(alpha=0.3, which="both")
    if len(points) > 1 or fit:
        ax.legend(fontsize=8)
    ax.set_title(f"{metric} against {key}" + (" (mean ± std over seeds)" if any(
        len(ys) > 1 for by_x in points.values() for ys in by_x.values()) else ""))
    path = out / f"{metric.replace('/', '_')}_vs_{key.replace('/', '_')}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(paths: list[str], out: Path | None = None, versus: str | None = None,
            fit: bool = False, curves: list[str] = ()) -> list[dict]:
    runs = [load_run(folder) for folder in find_runs(paths)]
    metrics = sorted({run.metric for run in runs})
    if len(metrics) > 1:
        raise UserError(f"these runs optimise different metrics ({', '.join(metrics)}); "
                        f"compare runs of one task at a time")
    metric = metrics[0]
    out = Path(out or (paths[0] if len(paths) == 1 else "."))
    out.mkdir(parents=True, exist_ok=True)
    names = labels(runs)
    evaluated = sorted({name for run in runs for name in run.evaluation})
    rows = [summarize(run, name, metric) | {e: run.evaluation.get(e) for e in evaluated}
            for run, name in zip(runs, names, strict=True)]
    reference = ["reference"] if any("reference" in row for row in rows) else []
    columns = RUN_COLUMNS + metric_columns(metric) + evaluated + reference + ["machine"]
    print(write_table(rows, columns, out, "comparison"))
    used = sorted({m for run in runs for m in run.machines})
    if len(used) > 1:
        print(f"warning: these runs trained on {len(used)} machines ({'; '.join(used)}):"
              f" wall_s compares only between runs of one machine, and figures can differ "
              f"with the arithmetic of each", file=sys.stderr)
    written = [out / "comparison.md", out / "comparison.csv"]
    settings = by_setting(runs, rows, metric, evaluated)
    if settings:
        print(write_table(settings, ["setting", "runs", "wall_s", *metric_columns(metric),
                                     *evaluated, *reference], out, "comparison_by_setting"))
        written += [out / "comparison_by_setting.md", out / "comparison_by_setting.csv"]
    written.append(plot_curves(runs, names, metric, out))
    for extra in curves:
        written.append(plot_curves(runs, names, extra, out,
                                   f"{extra.replace('/', '_')}_curves.png"))
    if versus:
        written.append(plot_versus(runs, rows, metric, versus, fit, out))
    print("written: " + ", ".join(map(str, written)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders, or a folder holding runs")
    parser.add_argument("--out", help="where to write the table and plots (default: the "
                        "single folder given, else the current folder)")
    parser.add_argument("--versus", help="plot the final metric against this override key, "
                        "or against params or tokens")
    parser.add_argument("--fit", action="store_true",
                        help="with --versus: fit and draw y = a * x^-alpha + c (log x axis)")
    parser.add_argument("--curves", nargs="+", default=[], metavar="METRIC",
                        help="also draw the curves of these logged metrics, e.g. val/chrf")
    args = parser.parse_args(argv)
    try:
        compare(args.paths, args.out, args.versus, args.fit, args.curves)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
