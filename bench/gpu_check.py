"""One GPU, about five minutes: does every hardware option train, and how fast is gptlab there?

    bench/gpu_check.sh [--skip-recipe] [--nanogpt path/to/nanoGPT]     (the wrapper installs
                                                                        what a bare machine lacks)
    python bench/gpu_check.py --accelerator cpu --quick                (the script's own test)

1. The machine: GPU, driver, CUDA, torch and lightning versions.
2. Matmul peak: the best of square bf16 (and TF32) matmuls, the denominator of MFU.
3. Every hardware option one GPU allows (gpu with compile on and off, multi_gpu and fsdp on
   one device), a few steps of each task (pretrain, classify, seq2seq) through train.py.
4. experiment=nanogpt_shakespeare_char to the end: whole-process time and best val_full/loss
   (with --nanogpt, nanoGPT's own train.py on the same data, side by side).
5. GPT-2 124M shape (batch 16 x 1024, bf16, compiled, fused AdamW) on random tokens:
   through train.py, and the same GPT in a bare PyTorch loop; ms/step, tokens/s and MFU.
Prints a Markdown report and writes bench/results/gpu_check.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TASKS = {
    "pretrain": ["data=shakespeare_char"],
    "classify": ["task=classify", "data=sst2"],
    "seq2seq": ["task=seq2seq", "data=multi30k_en_de", "task.max_new_tokens=8"],
}
# (label, overrides): what one GPU can run of each hardware option.
OPTIONS = [
    ("gpu, compiled", ["hardware=gpu"]),
    ("gpu, not compiled", ["hardware=gpu", "task.compile=false"]),
    ("multi_gpu (1 device)", ["hardware=multi_gpu", "trainer.devices=1"]),
    ("fsdp (1 device)", ["hardware=fsdp", "trainer.devices=1"]),
]
FEW_STEPS = ["model=nano", "debug=fast", "logger=csv", "trainer.max_steps=4",
             "trainer.val_check_interval=4", "final_eval_tokens=1024"]
GPT2 = ["model=gpt2", "model.pos_emb=learned", "model.norm=layernorm", "model.mlp=gelu",
        "data=synthetic", "data.batch_size=16"]


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine()}
    import lightning

    info["lightning"] = lightning.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown (no nvidia-smi)"
    return info


def matmul_peak(device: str, dtype: torch.dtype, sizes=(2048, 4096, 8192)) -> float:
    """Best TFLOP/s over square matmuls (the FLOPs a perfect model step would run at)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        synchronize(device)
        repeats = 10 if device == "cuda" else 2
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
    return best


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(args: list[str], common: list[str]) -> tuple[bool, float, str]:
    """Run train.py; (ok, seconds, output)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *common, *args],
                          cwd=REPO, capture_output=True, text=True)
    return proc.returncode == 0, time.perf_counter() - start, proc.stdout + proc.stderr


def run_folder(output: str) -> Path | None:
    folders = [line.split(": ", 1)[1] for line in output.splitlines()
               if line.startswith("run folder: ")]
    return Path(folders[-1]) if folders else None


def last_value(run: Path, name: str) -> float | None:
    with open(run / "csv" / "metrics.csv") as f:
        values = [float(row[name]) for row in csv.DictReader(f) if row.get(name)]
    return values[-1] if values else None


def hardware_matrix(common: list[str], cpu: bool, tasks: list[str]) -> list[dict]:
    rows = []
    options = [(label, [*o, "trainer.accelerator=cpu", "task.compile=false"])
               for label, o in OPTIONS if "fsdp" not in label] if cpu else OPTIONS
    for task in tasks:
        task_args = TASKS[task]
        for label, option in options:
            ok, seconds, out = train([*task_args, *FEW_STEPS, *option], common)
            error = "" if ok else out.strip().splitlines()[-1][:200]
            rows.append({"task": task, "option": label, "ok": ok, "seconds": round(seconds, 1),
                         "error": error})
            print(f"  {task:<9} {label:<22} {'ok' if ok else 'FAILED'} ({seconds:.0f} s) {error}",
                  flush=True)
    return rows


def nanogpt_recipe(common: list[str], quick: bool, nanogpt: str | None) -> dict:
    args = ["experiment=nanogpt_shakespeare_char", "logger=csv"]
    if quick:
        args += ["hardware=cpu", "task.compile=false", "trainer.max_steps=20",
                 "trainer.val_check_interval=10", "model.n_layer=2", "model.n_embd=64",
                 "model.block_size=32", "data.batch_size=4"]
    ok, seconds, out = train(args, common)
    run = run_folder(out)
    result = {"ok": ok, "seconds": round(seconds, 1)}
    if ok and run:
        result["val_full/loss"] = json.loads((run / "results.json").read_text())["val_full/loss"]
    if nanogpt:
        result["nanogpt"] = run_nanogpt(Path(nanogpt))
    return result


def run_nanogpt(root: Path) -> dict:
    """nanoGPT's own recipe on the same Tiny Shakespeare file (prepared by its prepare.py)."""
    data = root / "data" / "shakespeare_char"
    mirror = os.environ.get("GPTLAB_DATA_MIRROR", "")
    source = Path(mirror) / "tinyshakespeare" / "input.txt"
    if source.is_file() and not (data / "input.txt").is_file():
        (data / "input.txt").write_bytes(source.read_bytes())
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py"],
                          cwd=root, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    losses = [float(line.split("val loss ")[1]) for line in proc.stdout.splitlines()
              if "val loss " in line]
    return {"ok": proc.returncode == 0, "seconds": round(seconds, 1),
            "best val loss": min(losses) if losses else None}


def gpt2_throughput(common: list[str], peak: float, quick: bool) -> dict:
    """tokens/s and MFU at GPT-2 small's shape, through train.py and in a bare loop."""
    args = [*GPT2, "hardware=gpu", "logger=csv", "callbacks=none", "trainer.max_steps=60",
            "trainer.log_every_n_steps=20", "trainer.limit_val_batches=0"]
    if quick:
        args = ["model=nano", "data=synthetic", "data.vocab_size=256", "data.batch_size=4",
                "hardware=cpu", "logger=csv", "callbacks=none", "trainer.max_steps=6",
                "trainer.log_every_n_steps=3", "trainer.limit_val_batches=0"]
    ok, seconds, out = train(args, common)
    run = run_folder(out)
    result = {"ok": ok, "seconds": round(seconds, 1)}
    if not (ok and run):
        result["error"] = out.strip().splitlines()[-1][:300]
        return result
    from gptlab.models.gpt import GPT, GPTConfig

    config = GPTConfig(**json.loads((run / "model_config.json").read_text()))
    flops = GPT(config).flops_per_token()
    tokens_per_s = last_value(run, "train/tokens_per_s")
    result |= {"train.py tokens/s": round(tokens_per_s),
               "train.py MFU": round(tokens_per_s * flops / (peak * 1e12), 3)}
    bare = bare_loop(config, batch=4 if quick else 16, steps=3 if quick else 30,
                     device="cpu" if quick else "cuda")
    result |= {"bare loop ms/step": round(bare * 1e3, 1),
               "bare loop MFU": round(flops * config.block_size * (4 if quick else 16)
                                      / bare / (peak * 1e12), 3)}
    return result


def bare_loop(config, batch: int, steps: int, device: str) -> float:
    """Seconds per step of gptlab's GPT in a nanoGPT-style loop (bf16 autocast, compiled)."""
    from gptlab.models.gpt import GPT

    model = GPT(config).to(device)
    if device == "cuda":
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)
    x = torch.randint(config.vocab_size, (batch, config.block_size), device=device)
    for i in range(steps + 5):
        if i == 5:
            synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)),
                                                     x.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def report(results: dict) -> str:
    lines = ["# gpu_check", "", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["machine"].items()]
    lines += ["", f"matmul peak: bf16 {results['peak_bf16_tflops']:.1f} TFLOP/s", "",
              "| task | hardware option | trains | seconds |", "|---|---|---|---:|"]
    lines += [f"| {r['task']} | {r['option']} | {'yes' if r['ok'] else 'NO: ' + r['error']} "
              f"| {r['seconds']} |" for r in results["hardware"]]
    for section in ("nanogpt_recipe", "gpt2_shape"):
        if section in results:
            lines += ["", f"## {section}", "", "```", json.dumps(results[section], indent=2),
                      "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests the script)")
    parser.add_argument("--skip-recipe", action="store_true")
    parser.add_argument("--nanogpt", help="a nanoGPT checkout, to run its recipe side by side")
    parser.add_argument("--root", default=None, help="where runs and caches go (paths.root_dir)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    cpu = args.accelerator == "cpu"
    if not cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; run on a GPU machine (or --accelerator cpu --quick)")
    common = [f"paths.root_dir={args.root}"] if args.root else []
    results = {"machine": machine()}
    print(json.dumps(results["machine"], indent=2), flush=True)
    results["peak_bf16_tflops"] = matmul_peak(
        "cpu" if cpu else "cuda", torch.bfloat16, (256,) if args.quick else (2048, 4096, 8192))
    print(f"bf16 matmul peak: {results['peak_bf16_tflops']:.2f} TFLOP/s", flush=True)
    print("hardware options:", flush=True)
    results["hardware"] = hardware_matrix(common, cpu, ["pretrain"] if args.quick else
                                          list(TASKS))
    if not args.skip_recipe:
        results["nanogpt_recipe"] = nanogpt_recipe(common, args.quick, args.nanogpt)
        print(f"nanoGPT recipe: {results['nanogpt_recipe']}", flush=True)
    results["gpt2_shape"] = gpt2_throughput(common, results["peak_bf16_tflops"], args.quick)
    print(f"GPT-2 shape: {results['gpt2_shape']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(results)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text)
    if not all(r["ok"] for r in results["hardware"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
