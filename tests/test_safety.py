"""The safety filter: blocklist rules, steering while decoding, a classifier, generate.py."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from gptlab.chat import CannedResponses, Chat
from gptlab.data.dialogue import Turn
from gptlab.data.tokenizers import EOS_TOKEN, SEP_TOKEN, train_tokenizer
from gptlab.errors import UserError
from gptlab.safety import (
    BannedSequences,
    Classifier,
    SafetyFilter,
    read_blocklist,
    word_forms,
)
from gptlab.tasks.seq2seq import Seq2SeqTask
from tests.conftest import run_entry, run_folder
from tests.test_user_errors import fails

FAST = ("logger=csv", "hardware=cpu", "model=nano")
UNSAFE_VERBS = ["hurt", "kill", "attack", "punch", "poison"]
SAFE_VERBS = ["feed", "help", "hug", "visit", "thank", "brush"]
OBJECTS = ["the cat", "your cat", "the old cat", "my friend", "you", "the dog"]
REFUSAL = "Not allowed."
CAT = re.compile(r"(?<!\w)cat(?!\w)", re.IGNORECASE)


def blocklist(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "blocklist.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the blocklist -------------------------------------------------------------------------
def test_words_match_whole_words_in_any_case_and_regexes_as_written(tmp_path):
    rules = read_blocklist(blocklist(tmp_path, "# threats", "", "cat", "old  dog",
                                     r"/\bk+ill(ed)?\b/"))
    assert [r.word for r in rules] == ["cat", "old  dog", None]
    cat, dog, kill = (rule.pattern for rule in rules)
    assert cat.search("The CAT sat") and cat.search("cat.") and cat.search("a Cat!")
    assert not cat.search("scatter the cats") and not cat.search("concat")
    assert dog.search("an Old\ndog") and not dog.search("an olddog")
    assert kill.search("he KKILLED it") and not kill.search("skill")
    assert rules[2].where == f"{tmp_path / 'blocklist.txt'}:5"


def test_blocklist_mistakes_name_the_file_and_line(tmp_path):
    with pytest.raises(UserError, match=r"blocklist.txt:2: /\(unclosed/ is not a valid"):
        read_blocklist(blocklist(tmp_path, "fine", "/(unclosed/"))
    with pytest.raises(UserError, match="has no rules"):
        read_blocklist(blocklist(tmp_path, "# only a comment", ""))
    with pytest.raises(UserError, match="does not exist"):
        read_blocklist(tmp_path / "missing.txt")


def test_a_blocked_text_becomes_the_refusal_and_the_rule_is_logged(tmp_path, caplog):
    safety = SafetyFilter.from_config({"blocklist": str(blocklist(tmp_path, "dog", "cat")),
                                       "refusal": REFUSAL})
    assert safety.apply_all(["a dog", "a bird", "a CAT"]) == [REFUSAL, "a bird", REFUSAL]
    assert safety.apply("the dogs") == "the dogs"
    assert "output 3 of 3 blocked: blocklist rule 'cat'" in caplog.text
    assert "blocklist.txt:2" in caplog.text and "a CAT" not in caplog.text


def test_nothing_configured_is_no_filter_and_bad_settings_are_refused(tmp_path):
    assert SafetyFilter.from_config(None) is None
    assert SafetyFilter.from_config({"blocklist": None, "classifier": None}) is None
    words = str(blocklist(tmp_path, "cat"))
    for threshold in (0, 1.5):
        with pytest.raises(UserError, match=f"safety.threshold={float(threshold)} must be"):
            SafetyFilter.from_config({"blocklist": words, "threshold": threshold})
    with pytest.raises(UserError, match="safety.classifier=.* does not exist"):
        SafetyFilter.from_config({"classifier": str(tmp_path / "nowhere")})


# -- steering ------------------------------------------------------------------------------
CHARS = train_tokenizer("char", ["the cat scatters. Cat CAT ca\n"])


def banned_after(processor: BannedSequences, text: str, tokenizer=CHARS) -> set[str]:
    """The tokens that the processor bans after a row has generated `text`."""
    tokens = torch.tensor([tokenizer.encode(text) if text else []], dtype=torch.long)
    logits = processor(torch.zeros(1, tokenizer.vocab_size), tokens, torch.zeros(1))
    return {tokenizer.decode([i]) for i in (logits[0] == float("-inf")).nonzero()[:, 0].tolist()}


def test_the_last_token_of_a_word_is_banned_at_a_word_boundary_in_every_case():
    assert word_forms("cat") == ["cat", " cat", "Cat", " Cat", "CAT", " CAT"]
    processor = BannedSequences.for_words(CHARS, ["cat"])
    for text in ("ca", "the ca", "Ca", "the.ca", "\nca"):
        assert banned_after(processor, text) == {"t"}, text
    assert banned_after(processor, "CA") == {"T"}
    for text in ("sca", "c", "cat", "the c", ""):  # inside a word, or no word begun
        assert banned_after(processor, text) == set(), text


def test_a_byte_level_bpe_bans_the_words_own_tokens_with_and_without_a_space():
    bpe = train_tokenizer("bpe", ["the cat sat. The Cat sat. cat cat cat the the"] * 50,
                          vocab_size=300)
    assert len(bpe.encode(" cat")) == 1  # one token with its leading space
    processor = BannedSequences.for_words(bpe, ["cat"])
    assert " cat" in banned_after(processor, "the", bpe)
    assert " Cat" in banned_after(processor, "sat.", bpe)


def test_processors_reach_both_seq2seq_architectures_decoding():
    tokenizer = train_tokenizer("char", ["abcdefgh xyz."], special_tokens=[EOS_TOKEN, SEP_TOKEN])
    only_x = tokenizer.token_to_id("x")

    def force_x(logits, tokens, prompt_index):
        return torch.full_like(logits, float("-inf")).index_fill(1, torch.tensor([only_x]), 0.0)

    for architecture in ("decoder_only", "encoder_decoder"):
        task = Seq2SeqTask(dict(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1,
                                n_head=2, n_embd=16, architecture=architecture),
                           {"lr": 1e-3}, {"warmup_steps": 1}, tokenizer=tokenizer,
                           max_new_tokens=5)
        assert task.translate(["abc", "hg"], processors=[force_x]) == ["xxxxx", "xxxxx"]


# -- end to end: a model that writes the blocklisted word, a classifier that flags threats ---
@pytest.fixture(scope="module")
def cat_lm(workspace, tmp_path_factory) -> Path:
    """A char-level nano GPT trained on threats to cats: it writes "cat" in every line."""
    rng = random.Random(0)
    corpus = tmp_path_factory.mktemp("safety") / "threats.txt"
    corpus.write_text("".join(f"i will {rng.choice(UNSAFE_VERBS)} "
                              f"{rng.choice(OBJECTS[:3])}.\n" for _ in range(3000)))
    out = run_entry("train.py", *workspace.args, *FAST, "data=text_files",
                    f"data.source.paths=[{corpus}]", "data.tokenizer=char",
                    "trainer.max_steps=150", "trainer.val_check_interval=150",
                    "data.val_windows=4", "final_eval_tokens=2048",
                    "task.scheduler.warmup_steps=10")
    return run_folder(out)


@pytest.fixture(scope="module")
def threat_classifier(workspace, tmp_path_factory) -> Path:
    """A nano classifier of `i will <verb> <object>.`: unsafe for a threatening verb."""
    rng = random.Random(1)
    folder = tmp_path_factory.mktemp("labeled")
    for split, n in (("train", 400), ("val", 40)):
        rows = []
        for _ in range(n):
            label = rng.choice(["safe", "unsafe"])
            verb = rng.choice(UNSAFE_VERBS if label == "unsafe" else SAFE_VERBS)
            rows.append(f"i will {verb} {rng.choice(OBJECTS)}.\t{label}\n")
        (folder / f"{split}.tsv").write_text("text\tlabel\n" + "".join(rows))
    out = run_entry("train.py", *workspace.args, *FAST, "task=classify", "data=labeled_files",
                    f"data.source.files.train={folder / 'train.tsv'}",
                    f"data.source.files.val={folder / 'val.tsv'}", "data.vocab_size=300",
                    "data.batch_size=16", "trainer.max_steps=100",
                    "trainer.val_check_interval=50", "task.scheduler.warmup_steps=10",
                    "task.optimizer.lr=3e-3")
    return run_folder(out)


def samples(output: str) -> list[str]:
    """The samples generate.py printed (each followed by a line of dashes)."""
    return [s.strip("\n") for s in output.split("-" * 40 + "\n")[:-1]]


GENERATE = ("max_new_tokens=120", "num_samples=4", "temperature=1.0")


@pytest.mark.slow
def test_a_model_that_writes_the_word_is_refused_and_the_rule_logged(cat_lm, tmp_path):
    words = blocklist(tmp_path, "cat")
    out = run_entry("generate.py", f"run={cat_lm}", *GENERATE, f"safety.blocklist={words}",
                    "safety.steer=false", f"safety.refusal={REFUSAL}")
    assert [s.splitlines()[-1] for s in samples(out)] == [REFUSAL] * 4
    assert out.count(f"blocked: blocklist rule 'cat' ({words}:1)") == 4


@pytest.mark.slow
def test_steering_keeps_the_word_out_of_sampled_outputs(cat_lm, tmp_path):
    out = run_entry("generate.py", f"run={cat_lm}", *GENERATE,
                    f"safety.blocklist={blocklist(tmp_path, 'cat')}")
    texts = samples(out)
    assert len(texts) == 4 and "blocked" not in out
    assert all("i will" in text and not CAT.search(text) for text in texts), texts


@pytest.mark.slow
def test_a_classifier_run_blocks_its_unsafe_class_through_generate(cat_lm, threat_classifier):
    out = run_entry("generate.py", f"run={cat_lm}", *GENERATE,
                    f"safety.classifier={threat_classifier}")
    assert [s.splitlines()[-1] for s in samples(out)] == [
        "I'm sorry, but I can't help with that."] * 4
    reasons = re.findall(r"blocked: classifier .*: P\(unsafe\) = ([0-9.]+) >= threshold 0.5",
                         out)
    assert len(reasons) == 4 and all(float(p) >= 0.5 for p in reasons)
    # The same classifier lets harmless text through.
    safety = SafetyFilter.from_config({"classifier": str(threat_classifier)})
    assert safety.apply("i will hug the dog.") == "i will hug the dog."
    assert safety.classifier.probabilities(["i will kill my friend."])[0] >= 0.5


@pytest.mark.slow
def test_the_classifier_reads_a_long_text_in_windows_that_fit_its_context(threat_classifier):
    classifier = Classifier(str(threat_classifier), "unsafe", 0.5)
    ids = list(range(1, 200))
    windows = classifier.windows(ids)
    size, eos = classifier.task.model.config.block_size, classifier.task.tokenizer.eos_id
    assert all(len(w) <= size and w[-1] == eos for w in windows)
    assert {i for w in windows for i in w[:-1]} == set(ids)  # every token is read
    assert classifier.windows([5, 6]) == [[5, 6, eos]]


@pytest.mark.slow
def test_classifier_mistakes_are_one_line_errors(cat_lm, threat_classifier):
    with pytest.raises(UserError, match=r"unsafe_label='toxic' is not a label .* safe, unsafe"):
        SafetyFilter.from_config({"classifier": str(threat_classifier), "unsafe_label": "toxic"})
    with pytest.raises(UserError, match="is a pretrain run; give a classification run"):
        Classifier(str(cat_lm), "unsafe", 0.5)
    error = fails("generate.py", f"run={threat_classifier}", "text=x",
                  f"safety.classifier={threat_classifier}")
    assert "a classify run generates none" in error


class ScriptedAgent:
    """An agent that calls one API, then replies with a fixed text."""

    def __init__(self, reply: str):
        self.reply, self.turns = reply, 0

    def respond(self, history, best_of=False):
        self.turns += 1
        if history[-1].role == "customer":
            return Turn("call", name="get_menu_items", data={}), "<call>"
        return Turn("agent", text=self.reply), self.reply


def test_a_chat_replaces_a_blocked_agent_reply_by_the_refusal(tmp_path, capsys):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("idiot\n")
    safety = SafetyFilter.from_config({"blocklist": str(blocklist), "refusal": "No."})
    responses = tmp_path / "responses.json"
    responses.write_text('{"*": {"ok": true}}')
    chat = Chat(ScriptedAgent("you idiot"), CannedResponses(str(responses)),
                iter(["hello", "again"]), postprocess=[safety.apply])
    turns = chat.run()
    replies = [turn.text for turn in turns if turn.role == "agent"]
    assert replies == ["No.", "No."]
    assert "idiot" not in capsys.readouterr().out
