"""Side-by-side measurement shared by the bench scripts: a machine's speed drifts by up to
25% over minutes, so variants take turns within each round instead of running one after
another."""

from __future__ import annotations

from collections.abc import Callable, Hashable


def interleaved(variants: dict[Hashable, Callable[[], float]], rounds: int
                ) -> dict[Hashable, list[float]]:
    """Each variant's measurements, the variants taking turns (in rotating order) each round."""
    names, results = list(variants), {name: [] for name in variants}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(variants[name]())
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {v[-1]:.4g}" for n, v in results.items()), flush=True)
    return results
