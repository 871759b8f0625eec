"""Corpus preparation speed and peak memory on a generated corpus, with 1, 2, ... processes.

    python bench/prepare_speed.py [--size-mb 1024] [--files 256] [--procs 1,2] [--tokenizer bpe]

Writes a corpus of shuffled Tiny Shakespeare lines (same bytes for the same arguments) in
--files files, then prepares it from scratch as `data=text_files` does (bpe with 4096 tokens
by default; split by document) once per process count (data.num_proc), each time in a fresh
Python process. The resident memory of that process and all its children is sampled every
20 ms; its peak is the figure. Each worker process encodes on one core, so the process count
is the parallelism of the encoding; a bpe is trained first, on all cores in every run.
Prints a table and writes a JSON file under bench/results/. `--size-mb 20 --files 16
--tokenizer char` runs in seconds (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from gptlab.data import sources
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


def peak_rss_mb(proc: subprocess.Popen) -> float:
    """Peak resident memory of proc and its descendants, summed, until it exits."""
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in tree if p.is_running())
        except psutil.Error:  # a worker ended between the listing and the reading
            continue
        peak = max(peak, rss)
        time.sleep(0.02)
    return peak / 2**20


def run_once(corpus: Path, cache: Path, num_proc: int, args: argparse.Namespace) -> dict:
    job = {"corpus": str(corpus), "cache": str(cache), "num_proc": num_proc,
           "tokenizer": args.tokenizer, "vocab_size": args.vocab_size}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job)],
                            stdout=subprocess.PIPE, text=True)
    peak = peak_rss_mb(proc)
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"preparation with {num_proc} process(es) failed")
    return {"num_proc": num_proc, "seconds": time.perf_counter() - start, "peak_rss_mb": peak,
            **json.loads(out.strip().splitlines()[-1])}


def child(job: dict) -> None:
    """One preparation from scratch, as data=text_files does it; prints its token counts."""
    from gptlab.data.corpus import prepare_corpus
    from gptlab.data.documents import TextFiles

    prepared = prepare_corpus(
        TextFiles([f"{job['corpus']}/*.txt"]), name="bench", cache_dir=Path(job["cache"]),
        tokenizer=job["tokenizer"], vocab_size=job["vocab_size"], num_proc=job["num_proc"],
        progress=False)
    print(json.dumps({split: prepared.meta["splits"][split]["tokens"]
                      for split in prepared.splits}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--tokenizer", default="bpe", help="char, bpe, gpt2 or a tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, help="JSON file (default: under bench/results/)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    with tempfile.TemporaryDirectory(prefix="prepare-speed-") as tmp:
        corpus_bytes = write_corpus(Path(tmp) / "corpus", args.size_mb, args.files)
        runs = [run_once(Path(tmp) / "corpus", Path(tmp) / f"cache-{n}", n, args)
                for n in map(int, args.procs.split(","))]
    if any({k: v for k, v in r.items() if k in ("train", "val")} !=
           {k: v for k, v in runs[0].items() if k in ("train", "val")} for r in runs):
        raise SystemExit(f"the process counts gave different tokens: {runs}")
    for run in runs:
        run["mb_per_s"] = corpus_bytes / 1e6 / run["seconds"]
        run["speedup"] = runs[0]["seconds"] / run["seconds"]
    report(runs, corpus_bytes, args)


def report(runs: list[dict], corpus_bytes: int, args: argparse.Namespace) -> None:
    print(f"corpus: {corpus_bytes / 1e6:.1f} MB in {args.files} files, tokenizer "
          f"{args.tokenizer}" + (f" ({args.vocab_size})" if args.tokenizer == "bpe" else ""))
    print("| processes | seconds | MB/s | speed-up | peak RSS (MB) |\n|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['num_proc']} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | "
              f"{r['speedup']:.2f} | {r['peak_rss_mb']:.0f} |")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"prepare_speed-{args.size_mb:g}mb-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"corpus_bytes": corpus_bytes, "files": args.files,
                                  "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
                                  "cpus": os.cpu_count(), "runs": runs}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
