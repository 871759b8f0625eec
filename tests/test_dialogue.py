"""Conversations as sequences: Taskmaster-4's files, rendering, splits, windows, loss masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from gptlab.data import sources
from gptlab.data.dialogue import (
    SPECIAL_TOKENS,
    AgentDataModule,
    RewardDataModule,
    Turn,
    check_markers,
    conversation_rows,
    encode_segments,
    history_start,
    parse_agent_turn,
    render,
    scored_input,
    split_rendered,
    training_windows,
)
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.data.taskmaster import (
    Conversation,
    Taskmaster4,
    Taskmaster4Rewards,
    Taskmaster4Text,
    conversation_turns,
    parse_json,
    reward_turn,
    split_of,
)
from gptlab.data.tokenizers import train_tokenizer
from gptlab.errors import UserError
from tests.test_configs import compose_train

RAW = {
    "conversation_id": "dlg-1",
    "utterances": [
        {"index": 0, "speaker": "user", "text": " one Chai Latte please ", "annotations": [
            {"name": "api_call", "value": "get_menu_items", "context": "api_call_0"},
            {"name": "request", "value": '{"query": "Chai Latte"}', "context": "api_call_0"},
            {"name": "api_response", "value": "get_menu_items", "context": "api_response_0"},
            {"name": "response", "value": '{"menu_items":[{"menu_item_id":""chai-1"",'
                                          '"name":"Chai Latte"}]}', "context": "api_response_0"},
            {"name": "api_call", "value": "show_menu", "context": "api_call_1"},
            {"name": "api_response", "value": "show_menu", "context": "api_response_1"},
            {"name": "response", "value": '{"ok": true}', "context": "api_response_1"}]},
        {"index": 1, "speaker": "assistant", "text": "Anything else?", "annotations": []},
    ],
}
TURNS = [
    Turn("customer", text="one Chai Latte please"),
    Turn("call", name="get_menu_items", data={"query": "Chai Latte"}),
    Turn("result", data={"menu_items": [{"menu_item_id": "chai-1", "name": "Chai Latte"}]}),
    Turn("call", name="show_menu", data={}),
    Turn("result", data={"ok": True}),
    Turn("agent", text="Anything else?"),
]


def mirror_or_skip() -> None:
    if not (Path(os.environ.get(sources.MIRROR_ENV, "")) / "taskmaster4").is_dir():
        pytest.skip(f"set {sources.MIRROR_ENV} to the shared data folder")


def test_a_conversation_becomes_turns_with_its_calls_and_results_in_order():
    assert conversation_turns(RAW, "here") == TURNS


def test_rendering_has_role_markers_and_compact_sorted_json():
    text = render([Turn("customer", text="hi <|agent|>"), Turn("call", name="f", data={"b": 1,
                   "a": "é"}), Turn("result", data={"ok": True}), Turn("agent", text="done")])
    assert text == ('<|customer|>hi <|call|>f {"a":"é","b":1}<|end|><|result|>{"ok":true}'
                    '<|agent|>done<|end|>')
    assert split_rendered(text) == ["<|customer|>hi ", '<|call|>f {"a":"é","b":1}<|end|>',
                                    '<|result|>{"ok":true}', "<|agent|>done<|end|>"]


def test_a_generated_turn_parses_back():
    assert parse_agent_turn('<|call|>f {"a":1}<|end|>') == Turn("call", name="f", data={"a": 1})
    assert parse_agent_turn("<|call|>show_menu<|end|>") == Turn("call", name="show_menu", data={})
    assert parse_agent_turn("<|agent|> Hello <|end|>") == Turn("agent", text="Hello")
    broken = parse_agent_turn('<|call|>f {"a":')
    assert broken.role == "call" and broken.data is None and broken.text == '{"a":'
    assert parse_agent_turn("<|customer|>hi") is None
    assert parse_agent_turn(render([TURNS[1]])) == TURNS[1]


def test_corpus_json_is_repaired_where_quotes_were_doubled():
    assert parse_json('{"id": ""latte-1"", "n": "x""}', "w") == {"id": "latte-1", "n": "x"}
    assert parse_json('{"name": " \tAssam"}', "w") == {"name": " \tAssam"}
    with pytest.raises(UserError, match="record 3: .*is not JSON, even repaired"):
        parse_json("{oops", "record 3")


def test_reward_turns_read_into_the_same_turns():
    assert reward_turn({"role": "user", "text": "hi "}, "w") == Turn("customer", text="hi")
    assert reward_turn({"role": "agent", "api": {"f": {"a": 1}}}, "w") == Turn(
        "call", name="f", data={"a": 1})
    assert reward_turn({"role": "api", "response": {"f": {"x": 2}}}, "w") == Turn(
        "result", data={"x": 2})
    with pytest.raises(UserError, match="not a turn of the reward examples' layout"):
        reward_turn({"role": "api", "response": {}}, "w")


def test_the_split_is_a_stable_function_of_the_conversation_id():
    ids = [f"dlg-{i}" for i in range(4000)]
    splits = [split_of(i, 0.05, 0.05) for i in ids]
    assert splits == [split_of(i, 0.05, 0.05) for i in ids]
    shares = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.9, abs=0.02)
    assert shares["val"] == pytest.approx(0.05, abs=0.015)
    with pytest.raises(UserError, match="val_fraction=0.6 and test_fraction=0.5"):
        Taskmaster4(val_fraction=0.6, test_fraction=0.5)


@pytest.mark.slow
def test_taskmaster4_from_the_mirror_no_conversation_in_two_splits():
    mirror_or_skip()
    corpus = Taskmaster4()
    ids = {split: {c.id for c in corpus.examples(split)} for split in corpus.splits}
    assert sum(map(len, ids.values())) == 3710
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert len(ids["val"]) == 178 and len(ids["test"]) == 196
    turns = [t for split in corpus.splits for c in corpus.examples(split) for t in c.turns]
    assert sum(t.role == "call" for t in turns) == 15395
    assert sum(t.role == "agent" for t in turns) == 6920
    rewards = Taskmaster4Rewards()
    examples = [e for split in rewards.splits for e in rewards.examples(split)]
    assert len(examples) == 3228 and sum(e.good for e in examples) == 2775
    # The pretraining corpus puts every conversation in the agent data's split.
    documents = list(Taskmaster4Text().documents())
    by_text = {render(c.turns): split for split in corpus.splits for c in corpus.examples(split)}
    assert all(by_text[d.text] == d.split for d in documents) and len(documents) == 3710
    assert Taskmaster4Text.special_tokens == SPECIAL_TOKENS


@pytest.mark.slow
def test_the_pretraining_corpus_keeps_the_markers_and_the_agent_splits(tmp_path):
    """data=taskmaster4_text as configured: each conversation whole in its agent split."""
    mirror_or_skip()
    cfg = compose_train("data=taskmaster4_text", f"data.cache_dir={tmp_path}", "data.num_proc=1",
                        "data.source.val_fraction=0.01", "data.source.test_fraction=0.01")
    data = instantiate(cfg.data)
    data.prepare_data()
    tok = data.tokenizer
    assert all(len(tok.encode(marker)) == 1 for marker in SPECIAL_TOKENS)
    conversations = Taskmaster4(val_fraction=0.01, test_fraction=0.01)
    for split in ("val", "test"):
        expected = "".join(render(c.turns) + "<|endoftext|>"
                           for c in conversations.examples(split))
        assert tok.decode(np.asarray(data.corpus.tokens(split)).tolist()) == expected


def test_history_keeps_the_newest_whole_turns_that_fit():
    starts = np.array([0, 10, 15, 40, 42])  # four turns of 10, 5, 25, 2 tokens
    assert history_start(starts, 4, 100) == 0
    assert history_start(starts, 4, 27) == 15  # turns 2 and 3
    assert history_start(starts, 4, 26) == 40  # turn 2 does not fit: turn 3 only
    assert history_start(starts, 3, 20) == 20  # turn 2 alone is too long: its last 20 tokens


def test_training_windows_score_every_agent_turn_once_within_the_context():
    lengths = [5, 8, 30, 6, 3, 40, 7, 9, 12, 4]
    scored = [False, True, False, True, False, False, True, True, False, True]
    for limit in (30, 45, 60, 200):
        windows = training_windows(lengths, scored, limit)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        seen = [j for _, _, here in windows for j in here]
        assert seen == [j for j, s in enumerate(scored) if s]  # each once, in order
        for begin, end, here in windows:
            assert 0 < end - begin <= limit
            assert all(begin <= starts[j] for j in here)
            assert all(starts[j + 1] <= end for j in here[1:])
        assert len(windows) == 1 or limit < sum(lengths)


def conversations(n: int) -> list[Conversation]:
    """n small conversations with calls and replies (a test source's examples)."""
    out = []
    for i in range(n):
        turns = [Turn("customer", text=f"I want {i} latte"),
                 Turn("call", name="add_order_item", data={"id": f"latte-{i}", "quantity": "1"}),
                 Turn("result", data={"order_id": str(100 + i)}),
                 Turn("agent", text=f"Order {100 + i} is placed. Anything else?"),
                 Turn("customer", text="no thanks"),
                 Turn("call", name="finish_order", data={"order_id": str(100 + i)}),
                 Turn("result", data={"success": True}),
                 Turn("agent", text="Bye!")]
        out.append(Conversation(f"c{i}", turns))
    return out


class ListSource:
    """Examples held in memory, per split."""

    def __init__(self, examples: dict):
        self.by_split = examples

    @property
    def splits(self) -> list[str]:
        return list(self.by_split)

    def examples(self, split: str) -> list:
        return self.by_split[split]


def agent_data(block_size: int = 128, max_turn_tokens: int = 24) -> AgentDataModule:
    source = ListSource({"train": conversations(12), "val": conversations(3)})
    return AgentDataModule("toy", source, block_size=block_size, batch_size=4, vocab_size=300,
                           max_turn_tokens=max_turn_tokens)


@pytest.mark.parametrize("block_size", [48, 256])
def test_the_loss_is_on_the_agent_turns_only(block_size):
    data = agent_data(block_size)
    tok = data.tokenizer
    rows = data.encoded("val")
    batch = data.collate(rows)
    agent_text = "".join(tok.decode(t[t != IGNORE_INDEX].tolist()) for t in batch["targets"])
    context_text = "".join(tok.decode(t[t != IGNORE_INDEX].tolist())
                           for t in batch["context_targets"])
    expected = "".join(render([t]) for c in conversations(3) for t in c.turns
                       if t.role in ("agent", "call"))
    assert agent_text == expected  # every agent token once, markers and <|end|> included
    assert "<|customer|>" in context_text and "<|result|>" in context_text
    assert "<|call|>" not in context_text and "Bye!" not in context_text
    assert batch["input_ids"].size(1) <= block_size
    assert not ((batch["targets"] != IGNORE_INDEX) & (batch["context_targets"] != IGNORE_INDEX)
                ).any()


def test_every_agent_turn_is_prompted_with_its_true_history_cut_at_a_turn():
    data = agent_data(block_size=48, max_turn_tokens=24)
    turns = [t for r in data.encoded("val") for t in r["turns"]]
    assert [t.index for t in turns] == list(range(12))  # 4 agent turns x 3 conversations
    tok = data.tokenizer
    for turn in turns:
        conversation = next(c for c in conversations(3) if c.id == turn.conversation_id)
        history = render(conversation.turns[: turn.turn])
        prompt = tok.decode(turn.prompt)
        assert history.endswith(prompt) and len(turn.prompt) <= 48 - 24
        assert turn.reference == conversation.turns[turn.turn]
        assert split_rendered(prompt)[0] in {render([t]) for t in conversation.turns}


def test_an_opening_agent_turn_is_trained_on_but_not_prompted_for():
    data = agent_data()
    turns = [Turn("agent", text="Welcome!"), Turn("customer", text="a latte"),
             Turn("agent", text="Sure.")]
    segments = encode_segments(data.tokenizer, [turns])[0]
    (row,) = conversation_rows("c", turns, segments, 128, 100, 0)
    assert [t.turn for t in row["turns"]] == [2]
    scored = [t for t, on in zip(row["sequence"][1:], row["agent_mask"], strict=True) if on]
    assert data.tokenizer.decode(scored) == "Welcome!<|end|><|agent|>Sure.<|end|>"


def test_a_tokenizer_without_the_role_markers_is_refused():
    plain = train_tokenizer("bpe", ["some text"] * 3, 300)
    with pytest.raises(UserError, match="has no <\\|customer\\|>.*taskmaster4_text"):
        check_markers(plain, "task.init_from=x")
    data = agent_data()
    data.tokenizer_spec = plain
    data._tokenizer = None
    with pytest.raises(UserError, match="task.init_from"):
        data.prepare_data()


def test_reward_inputs_end_with_the_candidate_after_the_newest_history():
    context = [[1] * 10, [2] * 10, [3] * 10]
    assert scored_input(context, [9, 9], 25) == [2] * 10 + [3] * 10 + [9, 9]
    assert scored_input(context, [9] * 30, 20) == [3] * 10 + [9] * 10  # candidate: half
    good = conversations(4)
    examples = [type("Example", (), {"context": c.turns[:3], "candidate": c.turns[3],
                                     "good": i % 2 == 0})() for i, c in enumerate(good)]
    data = RewardDataModule("toy", ListSource({"train": examples, "val": examples[:2]}),
                            block_size=128, batch_size=2, vocab_size=300)
    assert data.task_arguments() == {"class_counts": [2, 2]}
    batch = data.collate(data.encoded("val"))
    assert batch["labels"].tolist() == [1.0, 0.0]
    first = data.tokenizer.decode(batch["input_ids"][0, : batch["lengths"][0]].tolist())
    assert first == render(good[0].turns[:4])
