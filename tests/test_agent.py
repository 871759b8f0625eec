"""The agent's metrics and decoding, best-of-n reranking, the reward model's figures, the chat."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from gptlab.chat import CannedResponses, Chat
from gptlab.data.dialogue import SPECIAL_TOKENS, Turn, render
from gptlab.data.tokenizers import train_tokenizer
from gptlab.errors import UserError
from gptlab.models.gpt import GPTConfig
from gptlab.tasks.agent import AgentTask, argument_f1, dialogue_scores, turn_grammar, turn_record
from gptlab.tasks.reward import (
    RewardTask,
    balanced_accuracy,
    calibration_bins,
    calibration_png,
    expected_calibration_error,
)

CALL = Turn("call", name="add_order_item", data={
    "menu_item_id": "latte-1", "quantity": "1",
    "addons": [{"addon_id": "vanilla", "option": "ADD"}, {"addon_id": "honey", "option": "ADD"}]})


def test_an_exact_call_matches_whatever_its_key_order_and_spacing():
    output = ('<|call|>add_order_item {"quantity": "1", "addons": [{"option":"ADD","addon_id":'
              '"vanilla"},{"addon_id":"honey","option":"ADD"}], "menu_item_id": "latte-1"}<|end|>')
    record = turn_record(CALL, output)
    assert record["exact_match"] and record["name_match"] and record["arg_f1"] == 1.0
    assert record["predicted_kind"] == "call"


def test_argument_f1_counts_matching_leaves():
    wrong_id = dict(CALL.data, menu_item_id="latte-2")  # 5 of the 6 leaves right
    assert argument_f1(wrong_id, CALL.data) == pytest.approx(5 / 6)
    one_addon = dict(CALL.data, addons=[{"addon_id": "honey", "option": "ADD"}])
    # 4 predicted leaves, all right, of 6: precision 1, recall 2/3
    assert argument_f1(one_addon, CALL.data) == pytest.approx(0.8)
    assert argument_f1({}, {}) == 1.0 and argument_f1({"a": 1}, {}) == 0.0
    record = turn_record(CALL, f'<|call|>add_order_item {json.dumps(wrong_id)}<|end|>')
    assert not record["exact_match"] and record["name_match"]
    assert record["arg_f1"] == pytest.approx(5 / 6)
    other_api = turn_record(CALL, f'<|call|>update_order {json.dumps(CALL.data)}<|end|>')
    assert not other_api["exact_match"] and not other_api["name_match"]
    assert other_api["arg_f1"] == 1.0  # the arguments are right, the API is not
    broken = turn_record(CALL, '<|call|>add_order_item {"menu_item_id": "lat')
    assert not broken["exact_match"] and broken["name_match"] and broken["arg_f1"] == 0.0


def test_scores_over_turns_call_or_reply():
    reply = Turn("agent", text="Your latte is ready at the bar.")
    records = [
        turn_record(CALL, render([CALL])),                        # right call
        turn_record(CALL, "<|agent|>Sure.<|end|>"),               # replied instead of calling
        turn_record(reply, render([reply])),                      # right reply
        turn_record(reply, render([CALL])),                       # called instead of replying
        turn_record(reply, "<|agent|>Your latte is ready.<|end|>"),
    ]
    scores = dialogue_scores(records)
    assert scores["call_exact_match"] == 0.5 and scores["call_name_acc"] == 0.5
    assert scores["arg_f1"] == 0.5
    assert scores["call_precision"] == 0.5  # 2 predicted calls, 1 where a call was due
    assert scores["call_recall"] == 0.5  # 2 calls due, 1 made
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    perfect = dialogue_scores([turn_record(reply, render([reply]))] * 3)
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    assert records[3]["text"] == ""  # a call where a reply was due counts as empty text


def tokenizer():
    texts = [render([Turn("customer", text="one latte please"), CALL,
                     Turn("result", data={"order_id": "7"}), Turn("agent", text="Done!")])] * 4
    return train_tokenizer("bpe", texts, 300, special_tokens=SPECIAL_TOKENS)


def agent(tok, block_size: int = 64) -> AgentTask:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size,
                       vocab_size=tok.vocab_size)
    return AgentTask(config, {"lr": 1e-3}, {"warmup_steps": 1, "min_lr_ratio": 0.1},
                     max_new_tokens=12, tokenizer=tok)


def test_generated_turns_start_with_a_turn_marker_and_hold_no_other():
    tok = tokenizer()
    task = agent(tok)
    grammar = turn_grammar(tok)
    logits = torch.zeros(3, tok.vocab_size)
    first = grammar(logits, torch.zeros(3, 0, dtype=torch.long), torch.arange(3))
    allowed = set(torch.isfinite(first[0]).nonzero().squeeze(1).tolist())
    assert allowed == {tok.token_to_id("<|agent|>"), tok.token_to_id("<|call|>")}
    later = grammar(logits, torch.zeros(3, 2, dtype=torch.long), torch.arange(3))
    banned = set((~torch.isfinite(later[0])).nonzero().squeeze(1).tolist())
    assert banned == {tok.token_to_id(t) for t in ("<|customer|>", "<|agent|>", "<|call|>",
                                                   "<|result|>", "<|endoftext|>", "<|sep|>")}
    history = [Turn("customer", text="one latte please")]
    turn, output = task.respond(history)  # an untrained model, but a turn nevertheless
    assert output.startswith(("<|agent|>", "<|call|>"))
    assert sum(output.count(m) for m in SPECIAL_TOKENS if m != "<|end|>") == 1


def test_best_of_n_keeps_the_candidate_the_reranker_scores_highest():
    tok = tokenizer()
    task = agent(tok)
    seen = []

    def reranker(contexts: list[str], candidates: list[str]) -> list[float]:
        seen.append((contexts, candidates))
        return [float(len(c)) for c in candidates]  # prefers the longest candidate

    task.use_reranker(reranker, 4, {"temperature": 1.5, "top_k": None, "top_p": None}, seed=3)
    prompts = [task.prompt([Turn("customer", text="one latte please")]),
               task.prompt([Turn("customer", text="Done!")])]
    chosen = task.next_turns(prompts, best_of=True)
    contexts, candidates = seen[0]
    assert len(candidates) == 8 and len(set(candidates)) > 2  # sampled, 4 per prompt
    for i, prompt in enumerate(prompts):
        mine = [c for c, context in zip(candidates, contexts, strict=True)
                if context == tok.decode(prompt)]
        assert len(mine) == 4 and chosen[i] == max(mine, key=len)
    with pytest.raises(UserError, match="at least 2 candidates"):
        task.use_reranker(reranker, 1, {"temperature": 1.0}, seed=3)
    with pytest.raises(UserError, match="temperature > 0"):
        task.use_reranker(reranker, 4, {"temperature": 0.0}, seed=3)


def test_reward_figures_on_a_toy_case():
    labels = np.array([1, 1, 1, 1, 0, 0])
    perfect = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    task = reward_task()
    assert task.scores(perfect, labels)["auc"] == pytest.approx(1.0)
    swapped = np.array([0.9, 0.8, 0.7, 0.1, 0.6, 0.2])  # 6 of 8 pairs in order
    assert task.scores(swapped, labels)["auc"] == pytest.approx(6 / 8)
    # Predicting "good" for everything: accuracy 4/6, balanced accuracy 0.5.
    always = np.full(6, 0.9)
    assert task.scores(always, labels)["acc"] == pytest.approx(4 / 6)
    assert balanced_accuracy(always, labels) == 0.5
    assert balanced_accuracy(swapped, labels) == pytest.approx((3 / 4 + 1 / 2) / 2)
    bins = calibration_bins(perfect, labels)
    assert [b["count"] for b in bins] == [0, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    assert bins[9] == {"low": 0.9, "high": 1.0, "count": 1, "mean_predicted": 0.9,
                       "fraction_good": 1.0}
    assert expected_calibration_error(bins) == pytest.approx(
        (0.1 + 0.2 + 0.3 + 0.4 + 0.2 + 0.1) / 6)
    png = calibration_png(perfect, labels, "toy")
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def reward_task(tok=None) -> RewardTask:
    tok = tok or tokenizer()
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size)
    return RewardTask(config, {"lr": 1e-3}, {"warmup_steps": 1, "min_lr_ratio": 0.1},
                      class_counts=[1, 3], tokenizer=tok)


def test_the_reward_model_weighs_the_rare_class_up_and_scores_rendered_turns():
    task = reward_task()
    assert task.class_weights.tolist() == pytest.approx([2.0, 2 / 3])  # n / (2 n_class)
    context = render([Turn("customer", text="one latte please")])
    scores = task.score([context, context, ""], [render([CALL]), "<|agent|>Done!<|end|>",
                                                  "<|agent|>Done!<|end|>"])
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)


class ScriptedAgent:
    """Stands in for an AgentTask: answers each history with the next of its turns."""

    def __init__(self, turns: list[Turn]):
        self.turns, self.histories = list(turns), []

    def respond(self, history, best_of=False):
        self.histories.append(list(history))
        turn = self.turns.pop(0)
        return turn, render([turn])


def test_the_chat_answers_calls_from_canned_responses_or_the_input(tmp_path):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps({"get_menu_items": {"menu_items": [{"id": "latte-1"}]},
                                     "finish_order": [{"success": False}, {"success": True}]}))
    lookup = Turn("call", name="get_menu_items", data={"query": "latte"})
    scripted = ScriptedAgent([lookup, CALL, Turn("agent", text="Anything else?"),
                              Turn("call", name="finish_order", data={}),
                              Turn("call", name="finish_order", data={}),
                              Turn("agent", text="Bye!")])
    out = io.StringIO()
    lines = iter(["a latte please\n", '{"order_id": "7"}\n', "\n", "that's all\n", "/quit\n",
                  "never read\n"])
    chat = Chat(scripted, CannedResponses(str(responses)), lines, out,
                postprocess=[str.upper])
    turns = chat.run()
    assert out.getvalue().splitlines() == [
        "customer: a latte please",
        '[API call] get_menu_items {"query":"latte"}',
        '[API result] {"menu_items":[{"id":"latte-1"}]}',
        f"[API call] add_order_item {json.dumps(CALL.data, sort_keys=True, separators=(',', ':'))}",
        '[API result] {"order_id":"7"}',  # not in the file: read from the input
        "agent: ANYTHING ELSE?",  # through the post-processing steps
        "customer: that's all",
        '[API call] finish_order {}', '[API result] {"success":false}',
        '[API call] finish_order {}', '[API result] {"success":true}',
        "agent: BYE!"]
    assert [t.role for t in turns] == ["customer", "call", "result", "call", "result", "agent",
                                       "customer", "call", "result", "call", "result", "agent"]
    assert scripted.histories[1][-1] == Turn("result", data={"menu_items": [{"id": "latte-1"}]})
    assert next(lines) == "never read\n"
    fallback = CannedResponses(str(responses))
    fallback.results["*"] = [{"ok": True}]
    assert fallback.answer(Turn("call", name="other", data={})) == (True, {"ok": True})
    assert CannedResponses().answer(lookup) == (False, None)


def test_the_chat_says_what_is_missing_from_a_script(tmp_path):
    lookup = Turn("call", name="get_menu_items", data={})
    for lines, message in ((["hi\n"], "input ended while the agent waited for the result of "
                                      "get_menu_items"),
                           (["hi\n", "not json\n"], "result given for get_menu_items is not "
                                                    "JSON")):
        chat = Chat(ScriptedAgent([lookup]), CannedResponses(), iter(lines), io.StringIO())
        with pytest.raises(UserError, match=message):
            chat.run()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        CannedResponses(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        CannedResponses(str(tmp_path / "missing.json"))
