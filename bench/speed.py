"""`make bench`: how fast gptlab runs on this machine, every figure measured side by side.

    python bench/speed.py [--rounds 3] [--quick] [--out bench/results]

Sections (each variant of a section runs interleaved with the others, round after round,
because a machine's speed drifts by up to 25% over minutes; figures are medians of rounds):
  peak        square matmuls, fp32 and bf16: the machine's GFLOP/s, the denominator of MFU
  train       tokens/s and MFU of a training step (forward, backward, clip, fused AdamW) for
              model=tiny, micro and small at their default shapes, fp32 and bf16 autocast
              (bf16 only where the CPU has it natively: elsewhere it is emulated, ~100x slower)
  lightning   a step through Lightning (train.py's task, data module, logging, progress bar)
              against the same GPT in a bare PyTorch loop, at micro's shape
  generate    500 new tokens (model=small's shape with a 512-token context, batch 1, greedy)
              with and without the KV cache; the tokens are identical
  beam        bench/beam_speed.py: beam 4 against greedy on a random model of the Multi30k
              recipe's shape (sentences/s)
  prepare     bench/prepare_speed.py: corpus preparation MB/s with 1 and 2 processes
Prints the tables and writes bench/results/speed.{md,json}, with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (bench/train_step.py: the Lightning and bare loops)
from interleave import interleaved  # noqa: E402

from gptlab import hardware  # noqa: E402
from gptlab.models.gpt import GPT, GPTConfig  # noqa: E402

ARCH = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_weights=True)
# model=<name>'s shape and the batch its recipes use (conf/model/*.yaml).
MODELS = {"tiny": (dict(n_layer=2, n_head=4, n_embd=96, block_size=64), 20),
          "micro": (dict(n_layer=4, n_head=4, n_embd=128, block_size=128), 12),
          "small": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256), 12)}
VOCAB = 65  # Tiny Shakespeare's characters


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(dtype: torch.dtype, n: int, seconds: float = 0.5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def peak(rounds: int, sizes: tuple[int, ...]) -> dict[str, float]:
    """The best size's median GFLOP/s, per dtype."""
    variants = {f"{name} {n}": (lambda d=dtype, n=n: matmul_gflops(d, n))
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
                for n in sizes}
    results = interleaved(variants, rounds)
    return {name: max(statistics.median(results[f"{name} {n}"]) for n in sizes)
            for name in ("fp32", "bf16")}


def step_seconds(model: GPT, batch: int, precision: str, steps: int) -> float:
    """Seconds per training step of `model` on random tokens, after one warm-up step."""
    T = model.config.block_size
    x = torch.randint(VOCAB, (batch, T))
    y = torch.randint(VOCAB, (batch, T))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def train(rounds: int, peaks: dict[str, float], steps: int, bf16: bool,
          names: tuple[str, ...]) -> list[dict]:
    variants, models = {}, {}
    for name in names:
        shape, batch = MODELS[name]
        models[name] = GPT(GPTConfig(vocab_size=VOCAB, **shape, **ARCH))
        for precision in ("fp32", "bf16") if bf16 else ("fp32",):
            variants[f"{name} {precision}"] = (
                lambda m=models[name], b=batch, p=precision: step_seconds(m, b, p, steps))
    results = interleaved(variants, rounds)
    rows = []
    for key, times in results.items():
        name, precision = key.split()
        shape, batch = MODELS[name]
        seconds = statistics.median(times)
        tokens_per_s = batch * shape["block_size"] / seconds
        flops = models[name].flops_per_token()
        rows.append({"model": name, "precision": precision, "ms/step": seconds * 1e3,
                     "tokens/s": tokens_per_s, "GFLOP/s": tokens_per_s * flops / 1e9,
                     "MFU": tokens_per_s * flops / 1e9 / peaks[precision]})
    return rows


def lightning_overhead(rounds: int, steps: int) -> dict:
    shape, batch = MODELS["micro"]
    train_step.SHAPE = dict(shape, **ARCH, dropout=0.0)
    train_step.BATCH = batch
    with tempfile.TemporaryDirectory() as tmp:
        dm = train_step.datamodule(Path(tmp) / "cache", shape["block_size"])
        variants = {
            "lightning": lambda: train_step.lightning_loop(dm, steps, Path(tmp)),
            "plain": lambda: train_step.plain_loop(
                GPT(GPTConfig(vocab_size=dm.vocab_size, **train_step.SHAPE)), dm, steps, False),
        }
        results = interleaved(variants, rounds)
    ratio = statistics.median(a / b for a, b in zip(results["lightning"], results["plain"],
                                                     strict=True))
    return {"lightning ms/step": statistics.median(results["lightning"]) * 1e3,
            "plain ms/step": statistics.median(results["plain"]) * 1e3,
            "overhead": ratio - 1}


def generation(rounds: int, tokens: int) -> dict:
    shape = dict(MODELS["small"][0], block_size=512)
    model = GPT(GPTConfig(vocab_size=VOCAB, **shape, **ARCH)).eval()
    prompt, outputs = [[1, 2, 3, 4]], {}

    def timed(use_cache: bool) -> float:
        start = time.perf_counter()
        outputs[use_cache] = model.generate(prompt, tokens, temperature=0, use_cache=use_cache)
        return tokens / (time.perf_counter() - start)

    results = interleaved({"cache": lambda: timed(True), "no cache": lambda: timed(False)},
                          rounds)
    assert outputs[True] == outputs[False], "cached and uncached generation differ"
    rates = {name: statistics.median(values) for name, values in results.items()}
    return {"tokens/s with cache": rates["cache"], "tokens/s without": rates["no cache"],
            "speedup": rates["cache"] / rates["no cache"]}


def script(name: str, args: list[str]) -> dict:
    """Run another bench script that writes its figures as JSON; those figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        flag = "--json" if name == "beam_speed.py" else "--out"
        subprocess.run([sys.executable, str(Path(__file__).parent / name), *args, flag,
                        str(out)], check=True)
        return json.loads(out.read_text())


def report(results: dict) -> str:
    lines = [f"Machine: {results['cpu']}, {results['threads']} threads, torch "
             f"{results['torch']}; native bf16: {results['native_bf16'] or 'no'}", "",
             "| matmul peak | GFLOP/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["peak"].items()]
    lines += ["", "| model | precision | ms/step | tokens/s | GFLOP/s | MFU |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['precision']} | {r['ms/step']:.1f} | {r['tokens/s']:,.0f} "
              f"| {r['GFLOP/s']:.1f} | {r['MFU']:.0%} |" for r in results["train"]]
    light = results["lightning"]
    lines += ["", f"Lightning at micro: {light['lightning ms/step']:.1f} ms/step against "
              f"{light['plain ms/step']:.1f} in a bare loop: overhead {light['overhead']:+.1%}"]
    gen = results["generate"]
    lines += [f"Generation (small, 500 tokens): {gen['tokens/s with cache']:.0f} tokens/s with "
              f"the KV cache, {gen['tokens/s without']:.0f} without: {gen['speedup']:.1f}x"]
    for name in ("beam", "prepare"):
        if name in results:
            lines += ["", f"{name}: `{json.dumps(results[name])}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests the script)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    native = hardware.cpu_bf16_feature()
    results = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "native_bf16": native}
    print(f"{results['cpu']}, native bf16: {native or 'no'}", flush=True)
    print("peak:", flush=True)
    results["peak"] = peak(args.rounds, (128,) if args.quick else (256, 512, 1024, 2048))
    print("train:", flush=True)
    results["train"] = train(args.rounds, results["peak"], 2 if args.quick else 10,
                             bf16=native is not None,
                             names=("tiny",) if args.quick else tuple(MODELS))
    print("lightning:", flush=True)
    results["lightning"] = lightning_overhead(args.rounds, 5 if args.quick else 40)
    print("generate:", flush=True)
    results["generate"] = generation(args.rounds, 20 if args.quick else 500)
    if not args.quick:
        print("beam:", flush=True)
        results["beam"] = script("beam_speed.py", ["--rounds", str(args.rounds)])
        print("prepare:", flush=True)
        results["prepare"] = script("prepare_speed.py", ["--size-mb", "50", "--files", "32"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(results)
    (out / "speed.md").write_text(text)
    (out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
