"""Training-step speed at nanoGPT's CPU shape: gptlab through Lightning vs plain PyTorch loops.

    python bench/train_step.py [--rounds 5] [--steps 50] [--compile]
                               [--nanogpt path/to/nanoGPT/model.py]

Shape and recipe of nanoGPT's Shakespeare CPU run: 4 layers, 4 heads, 128 wide, context 64,
batch 12, AdamW lr 1e-3, gradient clipping 1.0, fp32, learned positions, GELU, LayerNorm, no
bias. Variants:
  lightning  gptlab's LanguageModelingTask in a lightning Trainer, fed by LMDataModule (what
             `train.py` runs: logging, progress bar and checkpoint callback included)
  compiled   the same with `task.compile=true` (only with --compile; compilation happens in
             the untimed warm-up steps)
  plain      the same GPT in a bare PyTorch loop like nanoGPT's train.py (random windows
             from the same memmap, forward, loss, backward, clip, step)
  nanogpt    nanoGPT's own model.py in that bare loop (only with --nanogpt)
Variants run interleaved, round after round (in rotating order), because a shared machine's
speed drifts by up to 25% over minutes; the table gives the median over rounds of the mean
step time in a round, and the median of the per-round ratios to the reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from interleave import interleaved  # bench/interleave.py

from gptlab.data.documents import KnownFile
from gptlab.data.lm_datamodule import LMDataModule, RandomWindows
from gptlab.models.gpt import GPT, GPTConfig
from gptlab.tasks.language_modeling import LanguageModelingTask

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, dropout=0.0,
             pos_emb="learned", norm="layernorm", mlp="gelu")
BATCH, LR, WARMUP_STEPS = 12, 1e-3, 10


def datamodule(cache_dir: Path, block_size: int = 64) -> LMDataModule:
    dm = LMDataModule("shakespeare_char", KnownFile("tinyshakespeare/input.txt"),
                      block_size=block_size, batch_size=BATCH, cache_dir=str(cache_dir))
    dm.prepare_data()
    return dm


def plain_loop(model: torch.nn.Module, dm: LMDataModule, steps: int, nanogpt: bool) -> float:
    """Seconds per step of a nanoGPT-style loop, after WARMUP_STEPS untimed steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.1)
    batches = iter(RandomWindows(dm.corpus.tokens("train"), dm.block_size, BATCH, seed=0))
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        x, y = next(batches)
        if nanogpt:
            _, loss = model(x, y)
        else:
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


class StepClock(L.Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == WARMUP_STEPS:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        self.per_step = (time.perf_counter() - self.start) / (trainer.global_step - WARMUP_STEPS)


def lightning_loop(dm: LMDataModule, steps: int, out: Path, compile: bool = False) -> float:
    task = LanguageModelingTask(
        model_config=GPTConfig(vocab_size=dm.vocab_size, **SHAPE),
        optimizer=dict(lr=LR, betas=(0.9, 0.99), weight_decay=0.1, fused=True),
        scheduler=dict(warmup_steps=100, min_lr_ratio=0.1), tokenizer=dm.tokenizer,
        compile=compile,
    )
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=WARMUP_STEPS + steps,
        limit_val_batches=0, gradient_clip_val=1.0, log_every_n_steps=25,
        logger=L.pytorch.loggers.CSVLogger(out), default_root_dir=out,
        callbacks=[clock, L.pytorch.callbacks.TQDMProgressBar(refresh_rate=10)],
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(task, datamodule=dm)
    return clock.per_step


def load_nanogpt(path: str):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda vocab: module.GPT(module.GPTConfig(
        vocab_size=vocab, **{k: SHAPE[k] for k in
                             ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nanogpt", help="path to nanoGPT's model.py, to time it too")
    parser.add_argument("--compile", action="store_true",
                        help="also time train.py's loop with task.compile=true")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        dm = datamodule(Path(tmp) / "cache")
        variants = {
            "lightning": lambda: lightning_loop(dm, args.steps, Path(tmp)),
            "plain": lambda: plain_loop(GPT(GPTConfig(vocab_size=dm.vocab_size, **SHAPE)), dm,
                                        args.steps, nanogpt=False),
        }
        if args.compile:
            variants["compiled"] = lambda: lightning_loop(dm, args.steps, Path(tmp), True)
        if args.nanogpt:
            make = load_nanogpt(args.nanogpt)
            variants["nanogpt"] = lambda: plain_loop(make(dm.vocab_size), dm, args.steps, True)
        times = interleaved(variants, args.rounds)
    report(times, out)


def report(times: dict[str, list[float]], out: Path) -> None:
    """Median step time, and the median of per-round ratios (robust to the machine's drift)."""
    base = "nanogpt" if "nanogpt" in times else "plain"
    lines = [f"| variant | ms/step (median of rounds) | time / {base} (median of rounds) |",
             "|---|---:|---:|"]
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times[base], strict=True))
        lines.append(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {ratio:.3f} |")
    table = "\n".join(lines)
    print(f"\n{table}")
    (out / "train_step.md").write_text(table + "\n")
    (out / "train_step.json").write_text(json.dumps(times, indent=2) + "\n")


if __name__ == "__main__":
    main()
