"""The one decoding loop: batched beam search against the search it replaced, and the
logits-processor hook, for both architectures."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gptlab.errors import UserError
from gptlab.models import GPT, EncoderDecoder, GPTConfig
from tests.conftest import run_entry

SHAPE = dict(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16)
PROMPTS = [[1, 2, 3, 4, 5], [7, 3], [9, 9, 1, 0, 4, 2, 8, 8, 3], [4, 5, 6, 7, 8], [11]]


# -- the beam search of gptlab before the batched one (models/beam.py), kept verbatim -------
@torch.no_grad()
def old_beam_search(model, prompts: list[list[int]], max_new_tokens: int, beam_size: int,
                    stop_token: int, length_penalty: float = 1.0) -> list[list[int]]:
    """For each prompt, the best continuation (ending with stop_token if it stopped)."""
    was_training = model.training
    model.eval()
    try:
        return [_search(model, p, max_new_tokens, beam_size, stop_token, length_penalty)
                for p in prompts]
    finally:
        model.train(was_training)


def _search(model, prompt: list[int], max_new_tokens: int, beam_size: int,
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
# -------------------------------------------------------------------------------------------


def peaked(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large random weights: outputs depend on content and position, near-ties are unlikely."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def gpt(pos_emb: str = "rope", **overrides) -> GPT:
    return peaked(GPT(GPTConfig(**SHAPE, pos_emb=pos_emb, **overrides)))


def encoder_decoder(pos_emb: str = "rope", **overrides) -> EncoderDecoder:
    return peaked(EncoderDecoder(GPTConfig(**SHAPE, pos_emb=pos_emb,
                                           architecture="encoder_decoder", **overrides)))


class FixedSource:
    """An encoder-decoder with one fixed source, called like a GPT (for the old search)."""

    def __init__(self, model: EncoderDecoder, source: list[int]):
        self.model, self.source = model, torch.tensor([source])
        self.wte, self.config, self.training = model.decoder.wte, model.config, False

    def __call__(self, decoder_ids: torch.Tensor) -> torch.Tensor:
        return self.model(self.source.expand(len(decoder_ids), -1), decoder_ids)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def common_stop(outputs: list[list[int]]) -> int:
    """A token that greedy decoding emits early in most rows, so beams do finish."""
    firsts = [t for row in outputs for t in row[1:4]]
    return max(set(firsts), key=firsts.count)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize(("beam_size", "length_penalty"), [(2, 1.0), (3, 0.6), (4, 2.0)])
def test_batched_beam_search_equals_the_old_search_prompt_by_prompt(pos_emb, beam_size,
                                                                    length_penalty):
    model, stop = gpt(pos_emb), 12  # a stop token that these models emit now and then
    expected = old_beam_search(model, PROMPTS, 14, beam_size, stop, length_penalty)
    assert any(row and row[-1] == stop for row in expected)  # some beams finished...
    assert any(not row or row[-1] != stop for row in expected)  # ...some ran out of budget...
    # ...and some ran past block_size 16, where the window slides.
    assert max(len(p) + len(row) for p, row in zip(PROMPTS, expected, strict=True)) > 16
    for use_cache in (True, False):
        assert model.generate(PROMPTS, 14, beam_size=beam_size, stop_token=stop,
                              length_penalty=length_penalty, use_cache=use_cache) == expected


@pytest.mark.parametrize(("pos_emb", "pointer_generator"),
                         [("learned", False), ("rope", False), ("rope", True)])
def test_encoder_decoder_beam_search_equals_the_old_search_source_by_source(pos_emb,
                                                                            pointer_generator):
    model = encoder_decoder(pos_emb, pointer_generator=pointer_generator)
    start = 16
    stop = common_stop(model.generate(PROMPTS, 6, start_token=start, temperature=0))
    expected = [old_beam_search(FixedSource(model, source), [[start]], 12, 3, stop)[0]
                for source in PROMPTS]
    assert any(row and row[-1] == stop for row in expected)
    assert model.generate(PROMPTS, 12, start_token=start, beam_size=3,
                          stop_token=stop) == expected


def test_beam_search_with_a_vocabulary_smaller_than_the_beam():
    model = peaked(GPT(GPTConfig(**{**SHAPE, "vocab_size": 3})))
    prompts = [[0, 1], [2], [1, 1, 0]]
    expected = old_beam_search(model, prompts, 5, 4, stop_token=2)
    assert model.generate(prompts, 5, beam_size=4, stop_token=2) == expected


def test_beam_of_one_prompt_is_the_same_alone_and_in_a_batch():
    model = gpt()
    batched = model.generate(PROMPTS, 10, beam_size=4, stop_token=5)
    for prompt, row in zip(PROMPTS, batched, strict=True):
        assert model.generate([prompt], 10, beam_size=4, stop_token=5) == [row]


def ban(token: int):
    def processor(logits, tokens, prompt_index):
        return logits.index_fill(1, torch.tensor([token]), float("-inf"))
    return processor


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_processor_bans_a_token_in_greedy_and_beam_search(beam_size):
    model = gpt()
    plain = model.generate(PROMPTS, 10, temperature=0, beam_size=beam_size)
    banned = common_stop(plain)
    outputs = model.generate(PROMPTS, 10, temperature=0, beam_size=beam_size,
                             processors=[ban(banned)])
    assert all(banned not in row for row in outputs) and outputs != plain
    assert all(len(row) == 10 for row in outputs)


def test_a_processor_bans_a_token_in_sampling_and_for_an_encoder_decoder():
    model = encoder_decoder()
    generator = torch.Generator().manual_seed(0)
    outputs = model.generate(PROMPTS, 12, start_token=16, generator=generator,
                             processors=[ban(3), ban(4)])
    assert all(3 not in row and 4 not in row for row in outputs)


def test_processors_see_each_rows_tokens_and_prompt():
    """A processor that forbids repeating the previous token, and bans token 0 for prompt 1
    only: it reads what each row generated and which prompt the row belongs to."""
    seen_prompts = set()

    def no_repeat(logits, tokens, prompt_index):
        assert tokens.size(0) == logits.size(0) == prompt_index.size(0)
        seen_prompts.update(prompt_index.tolist())
        if tokens.size(1):
            logits = logits.scatter(1, tokens[:, -1:], float("-inf"))
        return logits.masked_fill((prompt_index == 1)[:, None] & (torch.arange(17) == 0),
                                  float("-inf"))

    model = gpt()
    for beam_size in (1, 3):
        outputs = model.generate(PROMPTS, 12, temperature=0, beam_size=beam_size,
                                 stop_token=5, processors=[no_repeat])
        for row in outputs:
            assert all(a != b for a, b in zip(row, row[1:], strict=False))
        assert 0 not in outputs[1]
    assert seen_prompts == set(range(len(PROMPTS)))


def test_beam_search_refuses_sampling_options_and_bad_sizes():
    model = gpt()
    with pytest.raises(UserError, match="beam search is deterministic"):
        model.generate(PROMPTS, 3, beam_size=2, top_k=5)
    with pytest.raises(UserError, match="beam_size=0"):
        model.generate(PROMPTS, 3, beam_size=0)
    with pytest.raises(UserError, match="one non-empty source per prompt"):
        encoder_decoder().generate([[1], []], 3, start_token=0)


def test_the_beam_speed_bench_runs_in_small(tmp_path):
    out = run_entry("bench/beam_speed.py", "--sentences", "4", "--rounds", "1",
                    "--architecture", "encoder_decoder", "--json", str(tmp_path / "beam.json"))
    figures = json.loads((tmp_path / "beam.json").read_text())
    assert figures["sentences"] == 4 and figures["beam4_time_over_greedy"] > 0
    assert "| beam 4 |" in out and "x greedy's time" in out
