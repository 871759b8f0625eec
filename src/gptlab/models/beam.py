"""Beam search for a GPT: the `beam_size` most likely continuations, kept step by step.

Each prompt is searched on its own, its beams forming one batch of equal-length rows, so no
padding or mask is needed; every step recomputes the last block_size tokens (sentences in
text-to-text tasks are short, and this keeps the search independent of the KV cache).
A finished hypothesis is scored by its log-probability divided by length**length_penalty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.models.gpt import GPT


@torch.no_grad()
def beam_search(model: GPT, prompts: list[list[int]], max_new_tokens: int, beam_size: int,
                stop_token: int, length_penalty: float = 1.0) -> list[list[int]]:
    """For each prompt, the best continuation (ending with stop_token if it stopped)."""
    was_training = model.training
    model.eval()
    try:
        return [_search(model, p, max_new_tokens, beam_size, stop_token, length_penalty)
                for p in prompts]
    finally:
        model.train(was_training)


def _search(model: GPT, prompt: list[int], max_new_tokens: int, beam_size: int,
            stop_token: int, length_penalty: float) -> list[int]:
    device = model.wte.weight.device
    block_size = model.config.block_size
    sequences = torch.tensor([prompt], device=device)
    scores = torch.zeros(1, device=device)
    finished: list[tuple[float, list[int]]] = []
    for step in range(1, max_new_tokens + 1):
        log_probs = F.log_softmax(model(sequences[:, -block_size:])[:, -1].float(), dim=-1)
        vocab = log_probs.size(-1)
        candidates = (scores[:, None] + log_probs).view(-1)
        top = candidates.topk(min(2 * beam_size, candidates.numel()))
        keep_rows, keep_tokens, keep_scores = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, token = divmod(flat, vocab)
            if token == stop_token:
                new = sequences[row, len(prompt):].tolist() + [token]
                finished.append((score / step**length_penalty, new))
            elif len(keep_rows) < beam_size:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
        if len(finished) >= beam_size or not keep_rows:
            break
        rows = torch.tensor(keep_rows, device=device)
        tokens = torch.tensor(keep_tokens, device=device)[:, None]
        sequences = torch.cat((sequences[rows], tokens), dim=1)
        scores = torch.tensor(keep_scores, device=device)
    if not finished:  # ran out of budget: the best unfinished beam
        best = int(scores.argmax())
        return sequences[best, len(prompt):].tolist()
    return max(finished, key=lambda f: f[0])[1]
