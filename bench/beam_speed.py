"""Beam search against greedy decoding: sentences per second, measured interleaved.

    python bench/beam_speed.py [--ckpt RUN/checkpoints/best-*.ckpt] [--beam 4] [--rounds 5]
        [--architecture decoder_only|encoder_decoder] [--json out.json]

With --ckpt, a seq2seq (or summarize) checkpoint decodes its own test split (Multi30k's
test2016 for the translation recipe) through the task's translate(), as evaluate.py and
generate.py do: this is the figure that matters (target: beam 4 at most 1.5x greedy's time).
Without it, a random model of the Multi30k recipe's shape decodes --sentences (1,000) random
sources of test2016's lengths; a random model rarely emits the stop token, so every row runs to
--max-new-tokens in both modes: this measures the cost per decoded token, not the effect of
beams finishing early. Rounds alternate greedy and beam, so machine drift hits both alike;
the ratio is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from interleave import interleaved  # bench/interleave.py

from gptlab.utils.files import write_atomic


def random_model(architecture: str, n: int) -> tuple[Callable[[int], list], int]:
    """decode(beam) over n random sources, with the recipe's shape; and n."""
    from gptlab.models import GPTConfig, build_model

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=8000, block_size=128, n_layer=3, n_head=4, n_embd=256,
                       pos_emb="rope", norm="rmsnorm", mlp="swiglu", architecture=architecture)
    model = build_model(config).eval()
    lengths = torch.randint(8, 30, (n,)).tolist()  # test2016: 8-30 BPE tokens, + <|sep|>
    sources = [torch.randint(2, 8000, (n,)).tolist() + [1] for n in lengths]

    def decode(beam: int, max_new_tokens: int = 32, batch: int = 128) -> list:
        outputs = []
        for start in range(0, len(sources), batch):
            chunk = sources[start : start + batch]
            options = dict(temperature=0.0, stop_token=0, beam_size=beam)
            if architecture == "encoder_decoder":
                outputs += model.generate(chunk, max_new_tokens, start_token=1, **options)
            else:
                outputs += model.generate(chunk, max_new_tokens, **options)
        return outputs

    return decode, len(sources)


def checkpoint_model(path: str) -> tuple[Callable[[int], list], int]:
    """decode(beam) of the checkpoint's task over its test split's sources."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from gptlab.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path)
    task = ckpt.task()
    data = instantiate(OmegaConf.create(ckpt.artifacts["data_config"]), tokenizer=ckpt.tokenizer)
    texts = [source for source, _ in data.examples(task.default_eval_split)]

    def decode(beam: int, batch: int = 128) -> list:
        task.hparams.beam_size = beam
        return task.translate(texts, batch)

    return decode, len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt")
    parser.add_argument("--architecture", default="decoder_only",
                        choices=["decoder_only", "encoder_decoder"])
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=1000, help="without --ckpt")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    decode, n = checkpoint_model(args.ckpt) if args.ckpt else random_model(args.architecture,
                                                                            args.sentences)
    def seconds(beam: int) -> float:
        start = time.perf_counter()
        decode(beam)
        return time.perf_counter() - start

    times = interleaved({1: lambda: seconds(1), args.beam: lambda: seconds(args.beam)},
                        args.rounds)
    ratio = statistics.median(b / g for g, b in zip(times[1], times[args.beam], strict=True))
    figures = {"sentences": n, "model": args.ckpt or f"random {args.architecture}",
               "threads": torch.get_num_threads(),
               "greedy_sentences_per_s": n / statistics.median(times[1]),
               f"beam{args.beam}_sentences_per_s": n / statistics.median(times[args.beam]),
               f"beam{args.beam}_time_over_greedy": ratio}
    print(f"| decoding | sentences/s ({n} sentences, {figures['model']}) |\n|---|---:|")
    print(f"| greedy | {figures['greedy_sentences_per_s']:.1f} |")
    print(f"| beam {args.beam} | {figures[f'beam{args.beam}_sentences_per_s']:.1f} |")
    print(f"beam {args.beam} takes {ratio:.2f}x greedy's time (median of {args.rounds} rounds)")
    if args.json:
        write_atomic(args.json, json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
