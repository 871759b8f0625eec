"""Generation speed with and without the KV cache.

    python bench/generate_speed.py [--ckpt path/to/run/checkpoints/last.ckpt] [--tokens 256]

Without --ckpt a randomly initialised model of the default shape is timed (speed does not
depend on the weights). Both variants produce the same tokens (greedy); the table gives
tokens per second for a batch of prompts, median of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptlab.checkpoints import load_checkpoint
from gptlab.models.gpt import GPT, GPTConfig


def timed(model: GPT, prompts: list[list[int]], tokens: int, use_cache: bool):
    start = time.perf_counter()
    out = model.generate(prompts, tokens, temperature=0, use_cache=use_cache)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.ckpt:
        model = load_checkpoint(args.ckpt).model()
    else:
        model = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=192,
                              pos_emb="rope", norm="rmsnorm", mlp="swiglu")).eval()
    prompts = [[1, 2, 3, 4]] * args.batch
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for _ in range(args.rounds):
        for use_cache in (True, False):
            seconds, outputs[use_cache] = timed(model, prompts, args.tokens, use_cache)
            times[use_cache].append(seconds)
    assert outputs[True] == outputs[False], "cached and uncached generation differ"
    print(f"| KV cache | tokens/s (batch of {args.batch}) |\n|---|---:|")
    for use_cache in (True, False):
        rate = args.batch * args.tokens / statistics.median(times[use_cache])
        print(f"| {'on' if use_cache else 'off'} | {rate:.0f} |")


if __name__ == "__main__":
    main()
