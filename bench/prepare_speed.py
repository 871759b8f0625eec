"""Corpus preparation speed and peak memory on a generated corpus, with 1, 2, ... processes,
then training speed on it against Tiny Shakespeare.

    python bench/prepare_speed.py [--size-mb 1024] [--files 256] [--procs 1,2] [--tokenizer bpe]
                                  [--train-rounds 9] [--train-steps 40]

Writes a corpus of shuffled Tiny Shakespeare lines (same bytes for the same arguments) in
--files files, then prepares it from scratch as train.py does for `data=text_files` (bpe with
4096 tokens by default; split by document) once per process count (data.num_proc), each time
in a fresh Python process with torch and Lightning loaded. The memory of that process and all
its children is sampled (see peak_memory_mb); the peak of the summed PSS is the figure. Each
worker process encodes on one core, so the process count is the parallelism of the encoding;
a bpe is trained first, on all cores in every run.

Training speed: the same model (bench/train_step.py's nanoGPT CPU shape, with this vocabulary)
trains in a Lightning Trainer fed by LMDataModule, once from the prepared corpus (random windows
drawn across its shards by memory map) and once from Tiny Shakespeare prepared with the same
tokenizer and vocabulary size, taking turns for --train-rounds rounds; the table gives tokens/s
(median of rounds) and the median per-round ratio. Equal within noise means the loader does not
slow training down at this size. --train-rounds 0 skips it.

Prints tables and writes a JSON file under bench/results/. `--size-mb 20 --files 16
--tokenizer char` runs in a minute (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from interleave import interleaved  # bench/interleave.py
from train_step import BATCH, SHAPE, lightning_loop  # bench/train_step.py

from gptlab.data import sources
from gptlab.data.documents import KnownFile, TextFiles
from gptlab.data.lm_datamodule import LMDataModule
from gptlab.utils.files import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def write_corpus(folder: Path, size_mb: float, files: int) -> int:
    """Shuffled Tiny Shakespeare lines in `files` files of about size_mb/files MB each."""
    lines = sources.read_text(sources.locate(sources.TINY_SHAKESPEARE)).splitlines(True)
    rng, per_file, total = random.Random(0), int(size_mb * 1e6 / files), 0
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        chunk, size = [], 0
        while size < per_file:
            batch = rng.choices(lines, k=256)
            chunk += batch
            size += sum(map(len, batch))
        (folder / f"part-{i:04d}.txt").write_text("".join(chunk))
        total += size
    return total


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages divided among the processes sharing them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def peak_memory_mb(proc: subprocess.Popen) -> dict[str, float]:
    """Peak memory of proc and its descendants, summed, until it exits: RSS every 20 ms, and
    PSS every 2 s (reading it walks the page tables: ~20 ms a process with torch loaded).

    The workers are forked from a process that has torch and Lightning loaded, as in train.py,
    and share those pages with it; summed RSS counts them once per process (an upper bound),
    summed PSS once in all: the memory the preparation really holds."""
    root, peaks, last_pss = psutil.Process(proc.pid), {"rss": 0, "pss": 0}, 0.0
    while proc.poll() is None:
        try:
            tree = [p for p in [root, *root.children(recursive=True)] if p.is_running()]
            peaks["rss"] = max(peaks["rss"], sum(p.memory_info().rss for p in tree))
            if time.monotonic() - last_pss >= 2:
                peaks["pss"] = max(peaks["pss"], sum(pss(p.pid) for p in tree))
                last_pss = time.monotonic()
        except (psutil.Error, OSError, StopIteration):  # a process ended while being read
            continue
        time.sleep(0.02)
    return {f"peak_{name}_mb": value / 2**20 for name, value in peaks.items()}


def bench_job(tmp: Path, num_proc: int, args: argparse.Namespace) -> dict:
    """One preparation of the corpus in tmp, into its own cache folder."""
    return {"corpus": str(tmp / "corpus"), "cache": str(tmp / f"cache-{num_proc}"),
            "num_proc": num_proc, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size}


def run_once(job: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job)],
                            stdout=subprocess.PIPE, text=True)
    peaks = peak_memory_mb(proc)
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"preparation with {job['num_proc']} process(es) failed")
    return {"num_proc": job["num_proc"], "seconds": time.perf_counter() - start, **peaks,
            **json.loads(out.strip().splitlines()[-1])}


def datamodule(name: str, source, cache: Path, tokenizer: str, vocab_size: int,
               num_proc: int | None = None) -> LMDataModule:
    """What train.py builds for an LM corpus (data=text_files, data=shakespeare_char...)."""
    return LMDataModule(name, source, block_size=SHAPE["block_size"], batch_size=BATCH,
                        tokenizer=tokenizer, vocab_size=vocab_size, cache_dir=str(cache),
                        num_proc=num_proc)


def bench_datamodule(job: dict) -> LMDataModule:
    return datamodule("bench", TextFiles([f"{job['corpus']}/*.txt"]), Path(job["cache"]),
                      job["tokenizer"], job["vocab_size"], job["num_proc"])


def child(job: dict) -> None:
    """One preparation from scratch, as train.py does it; prints its token counts."""
    prepared = bench_datamodule(job).corpus
    print(json.dumps({split: prepared.meta["splits"][split]["tokens"]
                      for split in prepared.splits}))


def train_speed(job: dict, tmp: Path, args: argparse.Namespace) -> dict:
    """Training tokens/s from the prepared corpus and from Tiny Shakespeare, interleaved."""
    corpora = {
        "generated corpus": bench_datamodule(job),  # a prepared cache: no re-preparation
        "Tiny Shakespeare": datamodule("shakespeare", KnownFile("tinyshakespeare/input.txt"),
                                       tmp / "cache-shakespeare", args.tokenizer,
                                       args.vocab_size),
    }
    for dm in corpora.values():
        dm.prepare_data()
    seconds = interleaved({name: lambda dm=dm: lightning_loop(dm, args.train_steps, tmp / "logs")
                           for name, dm in corpora.items()}, args.train_rounds)
    tokens = BATCH * SHAPE["block_size"]
    base = seconds["Tiny Shakespeare"]
    return {name: {"tokens_per_s": statistics.median(tokens / s for s in ts),
                   "time_ratio": statistics.median(s / b for s, b in zip(ts, base, strict=True)),
                   "train_tokens": len(corpora[name].corpus.tokens("train")),
                   "seconds_per_step": ts}
            for name, ts in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--tokenizer", default="bpe", help="char, bpe, gpt2 or a tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--train-rounds", type=int, default=9,
                        help="rounds of the training-speed comparison (0: skip it)")
    parser.add_argument("--train-steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--out", type=Path, help="JSON file (default: under bench/results/)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    with tempfile.TemporaryDirectory(prefix="prepare-speed-") as tmp:
        corpus_bytes = write_corpus(Path(tmp) / "corpus", args.size_mb, args.files)
        runs = [run_once(bench_job(Path(tmp), n, args)) for n in map(int, args.procs.split(","))]
        training = {}
        if args.train_rounds:  # from the cache prepared last
            training = train_speed(bench_job(Path(tmp), runs[-1]["num_proc"], args), Path(tmp),
                                   args)
    if any({k: v for k, v in r.items() if k in ("train", "val")} !=
           {k: v for k, v in runs[0].items() if k in ("train", "val")} for r in runs):
        raise SystemExit(f"the process counts gave different tokens: {runs}")
    for run in runs:
        run["mb_per_s"] = corpus_bytes / 1e6 / run["seconds"]
        run["speedup"] = runs[0]["seconds"] / run["seconds"]
    report(runs, training, corpus_bytes, args)


def report(runs: list[dict], training: dict, corpus_bytes: int,
           args: argparse.Namespace) -> None:
    print(f"corpus: {corpus_bytes / 1e6:.1f} MB in {args.files} files, tokenizer "
          f"{args.tokenizer}" + (f" ({args.vocab_size})" if args.tokenizer == "bpe" else ""))
    print("| processes | seconds | MB/s | speed-up | peak PSS (MB) | peak RSS, summed (MB) |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['num_proc']} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | "
              f"{r['speedup']:.2f} | {r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    if training:
        print(f"\ntraining ({args.train_rounds} rounds of {args.train_steps} steps, batch {BATCH} "
              f"x {SHAPE['block_size']} tokens, {SHAPE['n_layer']} layers x {SHAPE['n_embd']})")
        print("| corpus | train tokens | tokens/s | time / Tiny Shakespeare |\n"
              "|---|---:|---:|---:|")
        for name, t in training.items():
            print(f"| {name} | {t['train_tokens']:,} | {t['tokens_per_s']:,.0f} | "
                  f"{t['time_ratio']:.3f} |")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"prepare_speed-{args.size_mb:g}mb-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"corpus_bytes": corpus_bytes, "files": args.files,
                                  "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
                                  "cpus": os.cpu_count(), "runs": runs, "training": training},
                                 indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
