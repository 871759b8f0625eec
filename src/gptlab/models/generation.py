"""One decoding loop for both architectures: greedy, sampling and beam search, with a KV cache.

`generate(model, prompts, ...)` drives a `DecodingState` (the rows being decoded: their tokens,
the self-attention KV cache and, for an encoder-decoder, the cross-attention keys and values,
computed once per source) with a search strategy: `Sampling` (greedy at temperature 0) or
`BeamSearch`. Each step the state gives next-token logits for every row, the logits processors
may change them, and the strategy picks the tokens and the rows that go on: beam search
reorders rows (and with them the cache) every step, and rows or prompts that have finished are
dropped, so they cost nothing more.

Logits processors are the hook for generation-time features (a filter that bans token
sequences, constraints, ...). A processor is a callable

    processor(logits, tokens, prompt_index) -> logits

with `logits` (rows, vocab) the next-token logits, `tokens` (rows, t) the tokens each row has
generated so far (the prompt not included) and `prompt_index` (rows,) the prompt each row
belongs to (beam search has several rows per prompt, and rows come and go). It returns the
logits to use: a token set to -inf is banned for that row (in beam search too, where the
log-probabilities are taken after the processors). Processors run in the order given, before
the strategy sees the logits, and must leave every row at least one allowed token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from gptlab.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from gptlab.models.gpt import Memory, Transformer

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# A model's output layer: hidden states (rows, T, C) and the memory they read -> logits.
Output = Callable[[torch.Tensor, "Memory | None"], torch.Tensor]


class Choice(NamedTuple):
    """What a search step decided: keep `rows` (None: all, in order) and append `tokens`.

    The kept rows come in groups of `group_size` consecutive rows per prompt.
    """

    rows: torch.Tensor | None
    tokens: torch.Tensor
    group_size: int


class DecodingState:
    """The rows being decoded by one decoder stack: tokens so far, KV cache, encoder memory.

    Prompts may differ in length: they are left-padded, with padding masked out and positions
    counted per row, so each row gets what it would get alone. The stack sees at most the last
    block_size tokens; the KV cache is used while the whole sequence fits, and dropped for a
    full forward over the last block_size tokens after, so use_cache never changes the result.
    """

    def __init__(self, body: Transformer, output: Output, prompts: list[list[int]], *,
                 memory: Memory | None = None, use_cache: bool = True) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        device = body.wte.weight.device
        B, L = len(prompts), max(len(p) for p in prompts)
        self.idx = torch.zeros(B, L, dtype=torch.long, device=device)
        self.real = torch.zeros(B, L, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            self.idx[i, L - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            self.real[i, L - len(p) :] = True
        # Equal-length prompts need no mask, which keeps SDPA on its fast path.
        self.padded = min(len(p) for p in prompts) != L
        self.body, self.output, self.memory, self.use_cache = body, output, memory, use_cache
        self.cache = None
        self.row_source = torch.arange(B, device=device)  # the memory row that each row reads

    def logits(self) -> torch.Tensor:
        """Next-token logits (rows, vocab), running the stack over what it has not seen yet."""
        block_size = self.body.config.block_size
        if self.use_cache and self.idx.size(1) <= block_size:
            if self.cache is None:
                self.cache = self.body.new_cache(self.idx.size(0))
            feed, mask = self.idx[:, self.cache.length :], self.real
        else:
            # The window slides from here on, so keys cached at old positions are stale.
            feed, mask = self.idx[:, -block_size:], self.real[:, -block_size:]
            self.cache = None
        positions = None
        if self.padded:
            # Position 0 is each row's first real token, as if it had never been padded.
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -feed.size(1) :]
        hidden = self.body.hidden(
            feed, attention_mask=mask if self.padded else None, position_ids=positions,
            kv_cache=self.cache, memory=self.memory,
        )
        return self.output(hidden[:, -1:], self.memory)[:, 0]

    def advance(self, choice: Choice) -> None:
        """Keep the chosen rows (reordering the cache and memory along), then append a token."""
        rows, tokens, group_size = choice
        if rows is not None:
            self.idx, self.real = self.idx[rows], self.real[rows]
            if self.cache is not None:
                self.cache.reorder(rows)
            if self.memory is not None:
                self._follow_sources(rows, group_size)
        self.idx = torch.cat((self.idx, tokens[:, None]), dim=1)
        self.real = torch.cat((self.real, torch.ones_like(self.real[:, :1])), dim=1)

    def _follow_sources(self, rows: torch.Tensor, group_size: int) -> None:
        """Keep the memory of the sources that rows still read, one per group of rows."""
        sources = self.row_source[rows][::group_size]
        held = torch.arange(self.memory.kv[0][0].size(0), device=sources.device)
        if not torch.equal(sources, held):
            self.memory = self.memory.select(sources)
        self.row_source = torch.arange(len(sources), device=sources.device).repeat_interleave(
            group_size)


class Sampling:
    """Greedy (temperature 0) or sampled decoding, one row per prompt; stopped rows drop out."""

    def __init__(self, n_prompts: int, device: torch.device, temperature: float,
                 top_k: int | None, top_p: float | None, stop_token: int | None,
                 generator: torch.Generator | None) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_token, self.generator = stop_token, generator
        self.prompt_index = torch.arange(n_prompts, device=device)
        self.tokens = torch.zeros(n_prompts, 0, dtype=torch.long, device=device)
        self.outputs: list[list[int]] = [[] for _ in range(n_prompts)]

    def step(self, logits: torch.Tensor, step: int) -> Choice | None:
        """Pick a token per row; None once every row has stopped."""
        tokens = sample(logits, self.temperature, self.top_k, self.top_p, self.generator)
        self.tokens = torch.cat((self.tokens, tokens[:, None]), dim=1)
        if self.stop_token is None:
            return Choice(None, tokens, 1)
        stopped = tokens == self.stop_token
        if not stopped.any():
            return Choice(None, tokens, 1)
        self._finish(stopped)
        going = (~stopped).nonzero().squeeze(1)
        if going.numel() == 0:
            return None
        self.tokens, self.prompt_index = self.tokens[going], self.prompt_index[going]
        return Choice(going, tokens[going], 1)

    def _finish(self, rows: torch.Tensor) -> None:
        for i, row in zip(self.prompt_index[rows].tolist(), self.tokens[rows].tolist(),
                          strict=True):
            self.outputs[i] = row

    def results(self) -> list[list[int]]:
        self._finish(torch.ones_like(self.prompt_index, dtype=torch.bool))
        return self.outputs


class BeamSearch:
    """The beam_size most likely continuations of every prompt, all prompts in one batch.

    Each step, every beam's next-token log-probabilities are added to its score and the
    2 * beam_size best candidates of each prompt are read in order: a candidate that ends in
    stop_token becomes a finished hypothesis, scored by its log-probability divided by
    length ** length_penalty; the others fill the prompt's beam up to beam_size. A prompt is
    done once it has beam_size finished hypotheses (or nothing left to continue), and its
    answer is its best finished hypothesis, else (out of budget) its most likely beam. This is
    exactly the search that gptlab ran one prompt at a time before (tests compare with a copy).
    """

    def __init__(self, n_prompts: int, device: torch.device, beam_size: int,
                 stop_token: int | None, length_penalty: float) -> None:
        self.beam, self.stop_token, self.length_penalty = beam_size, stop_token, length_penalty
        self.prompt_ids = torch.arange(n_prompts, device=device)  # the live prompts, in order
        self.prompt_index = self.prompt_ids  # per row; each prompt has 1, then beam_size rows
        self.scores = torch.zeros(n_prompts, device=device)  # per row; -inf: an empty slot
        self.tokens = torch.zeros(n_prompts, 0, dtype=torch.long, device=device)
        self.n_finished = torch.zeros(n_prompts, dtype=torch.long, device=device)
        self.best: list[tuple[float, list[int]] | None] = [None] * n_prompts
        self.outputs: list[list[int]] = [[] for _ in range(n_prompts)]

    def step(self, logits: torch.Tensor, step: int) -> Choice | None:
        """Extend every prompt's beams by one token; None once every prompt is done."""
        P, (R, V) = len(self.prompt_ids), logits.shape
        group = R // P
        log_probs = F.log_softmax(logits.float(), dim=-1)
        candidates = (self.scores[:, None] + log_probs).view(P, group * V)
        top, flat = candidates.topk(min(2 * self.beam, group * V), dim=1)  # best first
        if top.size(1) < self.beam:  # a vocabulary smaller than the beam: pad with nothing
            pad = self.beam - top.size(1)
            top = F.pad(top, (0, pad), value=float("-inf"))
            flat = torch.cat((flat, flat[:, :1].expand(-1, pad)), dim=1)
        rows = flat // V + torch.arange(P, device=flat.device)[:, None] * group
        tokens = flat % V
        valid = top > float("-inf")
        stops = valid & (tokens == self.stop_token) if self.stop_token is not None else (
            torch.zeros_like(valid))
        going = valid & ~stops
        kept = going & (going.cumsum(1) <= self.beam)
        self._add_finished(stops, top, rows, step)
        done = (self.n_finished >= self.beam) | ~kept.any(1)
        if done.any():
            self._finish(done)
        live = (~done).nonzero().squeeze(1)
        if live.numel() == 0:
            return None
        slots = self._slots(kept[live])
        keep_rows = rows[live].gather(1, slots).flatten()
        keep_tokens = tokens[live].gather(1, slots).flatten()
        self.scores = top[live].gather(1, slots).masked_fill(
            ~kept[live].gather(1, slots), float("-inf")).flatten()
        self.tokens = torch.cat((self.tokens[keep_rows], keep_tokens[:, None]), dim=1)
        self.prompt_ids, self.n_finished = self.prompt_ids[live], self.n_finished[live]
        self.prompt_index = self.prompt_ids.repeat_interleave(self.beam)
        return Choice(keep_rows, keep_tokens, self.beam)

    def _slots(self, kept: torch.Tensor) -> torch.Tensor:
        """(P, beam) candidate columns per prompt: the kept ones in order, then fillers.

        A prompt always has beam_size rows, so the rows of one prompt stay consecutive and
        equal in number; a filler slot (fewer candidates kept than beams) scores -inf, so
        nothing it leads to is ever chosen.
        """
        k = kept.size(1)
        columns = torch.arange(k, device=kept.device).expand_as(kept)
        return torch.where(kept, columns, columns + k).argsort(dim=1)[:, : self.beam]

    def _add_finished(self, stops: torch.Tensor, top: torch.Tensor, rows: torch.Tensor,
                      step: int) -> None:
        """Count the hypotheses that end here; remember each prompt's best (first on ties)."""
        if not stops.any():
            return
        self.n_finished += stops.sum(1)
        prompts = stops.any(1).nonzero().squeeze(1)
        first = stops.int().argmax(1)[prompts]  # the most likely of this step's stops
        scores = top[prompts, first].tolist()
        hypotheses = self.tokens[rows[prompts, first]].tolist()
        for p, score, hypothesis in zip(self.prompt_ids[prompts].tolist(), scores, hypotheses,
                                        strict=True):
            score = score / step**self.length_penalty
            if self.best[p] is None or score > self.best[p][0]:
                self.best[p] = (score, hypothesis + [self.stop_token])

    def _finish(self, done: torch.Tensor) -> None:
        group = self.scores.numel() // len(self.prompt_ids)
        for j in done.nonzero().squeeze(1).tolist():
            p = int(self.prompt_ids[j])
            if self.best[p] is not None:
                self.outputs[p] = self.best[p][1]
            else:  # no hypothesis finished: the most likely beam
                best = j * group + int(self.scores[j * group : (j + 1) * group].argmax())
                self.outputs[p] = self.tokens[best].tolist()

    def results(self) -> list[list[int]]:
        self._finish(torch.ones_like(self.prompt_ids, dtype=torch.bool))
        return self.outputs


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    sources: list[list[int]] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    processors: Sequence[LogitsProcessor] = (),
) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens; return only the new tokens per prompt.

    model: a GPT, or an EncoderDecoder with `sources` (one per prompt; the prompts are then
    the decoder's start, e.g. [[start_token]] * len(sources)). temperature 0 is greedy;
    beam_size > 1 is beam search (deterministic: temperature does not apply; top_k and top_p
    are refused). A row that emits stop_token ends there, the stop token included in its
    output (so callers can tell it from a row that ran out of budget).
    """
    _check_options(temperature, top_k, top_p, beam_size, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        state = model.start_decoding(prompts, sources, use_cache)
        device = state.idx.device
        search = (BeamSearch(len(prompts), device, beam_size, stop_token, length_penalty)
                  if beam_size > 1 else
                  Sampling(len(prompts), device, temperature, top_k, top_p, stop_token,
                           generator))
        for step in range(1, max_new_tokens + 1):
            logits = state.logits()
            for process in processors:
                logits = process(logits, search.tokens, search.prompt_index)
            choice = search.step(logits, step)
            if choice is None:
                break
            if step < max_new_tokens:
                state.advance(choice)
        return search.results()
    finally:
        model.train(was_training)


def _check_options(temperature: float, top_k: int | None, top_p: float | None,
                   beam_size: int, max_new_tokens: int) -> None:
    if temperature < 0:
        raise UserError(f"generate: temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"generate: top_k={top_k} must be >= 1, or None for no top-k")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"generate: top_p={top_p} must be in (0, 1], or None for no top-p")
    if beam_size < 1:
        raise UserError(f"generate: beam_size={beam_size} must be >= 1 (1: no beam search)")
    if beam_size > 1 and (top_k is not None or top_p is not None):
        raise UserError("generate: beam search is deterministic; drop top_k/top_p or use "
                        "beam_size=1 to sample")
    if max_new_tokens < 0:
        raise UserError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of logits (B, vocab); temperature 0 means argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token once the more likely ones already reach top_p; the top one always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
