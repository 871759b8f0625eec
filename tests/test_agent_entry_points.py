"""The agent and the reward model through train.py, evaluate.py and generate.py (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from gptlab.errors import UserError
from gptlab.pipeline import evaluate, generate
from gptlab.utils.config import register_resolvers
from tests.conftest import REPO, metrics_column, run_entry, run_folder

# Nano models with room for a conversation; 1% val and test conversations (37 and 44), so
# that generating every turn takes seconds.
TINY = ("model=nano", "model.block_size=256", "debug=fast", "logger=csv", "hardware=cpu")
SMALL_SPLITS = ("data.source.val_fraction=0.01", "data.source.test_fraction=0.01")
AGENT = ("task=agent", "data=taskmaster4", "data.max_turn_tokens=48", "task.val_turns=6",
         *SMALL_SPLITS)


def mirror_or_skip() -> None:
    if not (Path(os.environ.get("GPTLAB_DATA_MIRROR", "")) / "taskmaster4").is_dir():
        pytest.skip("set GPTLAB_DATA_MIRROR to the shared data folder")


@pytest.fixture(scope="session")
def agent_run(workspace) -> Path:
    mirror_or_skip()
    return run_folder(run_entry("train.py", *workspace.args, *TINY, *AGENT))


@pytest.fixture(scope="session")
def reward_run(workspace, agent_run) -> Path:
    """A reward model that starts from the agent (its weights and tokenizer)."""
    return run_folder(run_entry("train.py", *workspace.args, *TINY, "task=reward",
                                "data=taskmaster4_reward", f"task.init_from={agent_run}"))


@pytest.mark.slow
def test_the_agent_trains_and_logs_what_its_turns_score(agent_run):
    for name in ("loss", "ppl", "call_exact_match", "call_name_acc", "arg_f1", "call_precision",
                 "call_recall", "bleu", "chrf"):
        assert metrics_column(agent_run, f"val/{name}"), name
    assert metrics_column(agent_run, "val/call_exact_match_best")
    results = json.loads((agent_run / "results.json").read_text())
    assert {"val_full/call_exact_match", "val_last/loss"} <= set(results)
    tokenizer = json.loads((agent_run / "tokenizer.json").read_text())
    assert {"<|customer|>", "<|agent|>", "<|call|>", "<|result|>", "<|end|>"} <= {
        t["content"] for t in tokenizer["added_tokens"]}


@pytest.mark.slow
def test_the_reward_model_reports_auc_balanced_accuracy_and_a_calibration_plot(reward_run):
    out = run_entry("evaluate.py", f"run={reward_run}")
    assert "test: AUC " in out and "balanced accuracy" in out and "expected calibration" in out
    report = json.loads(next(reward_run.glob("evaluation-*-test.json")).read_text())
    assert 0 <= report["test/auc"] <= 1 and 0 <= report["test/balanced_acc"] <= 1
    assert len(report["predictions"]) == 309  # the reward test split (10%)
    assert sum(b["count"] for b in report["calibration"]) == 309
    picture = next(reward_run.glob("evaluation-*-test-calibration.png"))
    assert picture.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_evaluate_generates_every_test_turn_greedy_and_best_of_n(agent_run, reward_run):
    out = run_entry("evaluate.py", f"run={agent_run}", "num_candidates=2",
                    f"rerank={reward_run}", "temperature=0.8")
    assert "every agent turn generated after the true history" in out
    table = out[out.index("decoding"):]
    assert "\ngreedy " in table and "\nbest of 2 " in table
    # Named by its decoding, so the greedy evaluation's report stays.
    (path,) = agent_run.glob(f"evaluation-*-test-best_of_2-t0.8-{reward_run.name}.json")
    report = json.loads(path.read_text())
    turns = report["turns"]
    assert set(turns) == {"test", "test_best_of_2"}
    assert len(turns["test"]) == len(turns["test_best_of_2"]) > 100
    first = turns["test"][0]
    assert {"conversation_id", "turn", "reference", "output", "reference_kind",
            "predicted_kind"} <= set(first)
    assert all(t["output"].startswith(("<|agent|>", "<|call|>")) for t in turns["test"])
    for name in ("call_exact_match", "arg_f1", "bleu", "loss"):
        assert f"test/{name}" in report and f"test_best_of_2/{name}" in report


@pytest.mark.slow
def test_a_chat_scripted_through_standard_input(agent_run, tmp_path):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps({"get_menu_items": {"menu_items": []},
                                     "*": {"success": True}}))
    transcript = tmp_path / "conversation.json"
    script = "hi, one latte please\n\nthat's all\n/quit\nnot read\n"
    proc = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), f"run={agent_run}", "chat=true",
         f"responses={responses}", "max_calls=2", f"output_file={transcript}"],
        input=script, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "customer: hi, one latte please" in lines and "customer: that's all" in lines
    assert "not read" not in proc.stdout
    turns = json.loads(transcript.read_text())
    assert [t["text"] for t in turns if t["role"] == "customer"] == [
        "hi, one latte please", "that's all"]
    assert all(t["role"] in ("customer", "agent", "call", "result") for t in turns)
    assert all(t["data"] in ({"menu_items": []}, {"success": True})
               for t in turns if t["role"] == "result")


def compose(name: str, *overrides: str):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return hydra_compose(name, overrides=list(overrides))


@pytest.mark.slow
def test_chat_and_best_of_n_are_refused_where_they_do_not_apply(agent_run, reward_run):
    for fn, overrides, message in (
        (generate, [f"run={agent_run}", "text=hello"], "this is an agent run: talk to it with "
                                                       "chat=true"),
        (generate, [f"run={reward_run}", "chat=true"], "chat=true talks to an agent run"),
        (generate, [f"run={reward_run}"], "pass it as rerank=<reward run>"),
        (generate, [f"run={agent_run}", "chat=true", "num_candidates=4"],
         "best-of-n needs an agent run, num_candidates >= 2 and rerank="),
        (evaluate, [f"run={agent_run}", "num_candidates=2", f"rerank={agent_run}"],
         "is a agent run; give a reward run"),
    ):
        with pytest.raises(UserError, match=message):
            fn(compose(fn.__name__, *overrides))


@pytest.mark.slow
def test_a_chat_behind_the_safety_filter_says_only_the_refusal(agent_run, tmp_path):
    """A blocklist rule that matches any text: every reply the agent writes is refused."""
    blocklist, transcript = tmp_path / "blocklist.txt", tmp_path / "conversation.json"
    blocklist.write_text("/.+/\n")
    (tmp_path / "responses.json").write_text(json.dumps({"*": {"success": True}}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), f"run={agent_run}", "chat=true",
         f"responses={tmp_path / 'responses.json'}", "max_calls=2",
         f"safety.blocklist={blocklist}", "safety.refusal=Sorry.", f"output_file={transcript}"],
        input="hi, one latte please\nthanks\n", capture_output=True, text=True, timeout=600,
        cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    replies = [t["text"] for t in json.loads(transcript.read_text()) if t["role"] == "agent"]
    assert replies and all(reply == "Sorry." for reply in replies)
    assert proc.stdout.count("safety: output blocked") == len(replies)
