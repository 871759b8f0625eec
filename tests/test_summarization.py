"""Summarization: the AESLC corpus (mirror or archive download), ROUGE, the lead baseline."""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
from rouge_score.rouge_scorer import RougeScorer

from gptlab.data import sources
from gptlab.data.summarization import (
    AESLC,
    Aeslc,
    Email,
    GapSentences,
    parse_email,
    principal_sentence,
)
from gptlab.data.tokenizers import EOS_TOKEN, SEP_TOKEN, train_tokenizer
from gptlab.errors import UserError
from gptlab.models.gpt import GPTConfig
from gptlab.tasks.summarization import SummarizationTask, lead, median_words, rouge
from tests.test_sources import no_mirror, server  # noqa: F401  (fixtures)

EMAIL = """Hi Phillip,  This message is to confirm our meeting
on Tuesday.
Thanks,

@subject
Confirmation: Risk Management Meeting 10/30/01

@ann0
meeting confirmation - tues

@ann1
meeting confirmation

@ann2
meeting confirmed"""


def test_an_email_file_is_a_body_a_subject_and_optional_annotations():
    email = parse_email(EMAIL, "dev/x.subject")
    assert email.body == "Hi Phillip, This message is to confirm our meeting on Tuesday. Thanks,"
    assert email.subject == "Confirmation: Risk Management Meeting 10/30/01"
    assert email.annotations == ["meeting confirmation - tues", "meeting confirmation",
                                 "meeting confirmed"]
    assert parse_email("Body.\n\n@subject\nHello\n", "t").annotations == []
    with pytest.raises(UserError, match="x.subject has no '@subject' line"):
        parse_email("just a body", "x.subject")


@pytest.mark.slow
def test_aeslc_from_the_mirror_has_the_official_splits():
    if not (Path(os.environ.get(sources.MIRROR_ENV, "")) / AESLC.relpath).is_dir():
        pytest.skip(f"set {sources.MIRROR_ENV} to the shared data folder")
    corpus = Aeslc()
    sizes = {split: len(corpus.examples(split)) for split in corpus.splits}
    assert sizes == {"train": 14_436, "val": 1_960, "test": 1_906}
    assert all(not extra for extra in corpus.annotations("train"))
    assert all(len(extra) == 3 for split in ("val", "test") for extra in
               corpus.annotations(split))
    assert all(body and subject and "\n" not in body for split in corpus.splits
               for body, subject in corpus.examples(split))


def test_the_principal_sentence_is_the_lead_sentence_that_the_rest_repeats_most():
    body = ("Hi Phillip, Please send me the draw file for Bishops Corner. The weather is "
            "nice. I need the draw file and the vendor list for Bishops Corner by Friday.")
    assert principal_sentence(body, lead_words=17, target_words=10) == (
        "Please send me the draw file for Bishops Corner.")
    assert principal_sentence(body, lead_words=17, target_words=4) == "Please send me the"
    # The salutation is a sentence of its own, never glued to the first one.
    assert principal_sentence("Dear all, Gas prices rose. Gas prices rose again.",
                              lead_words=5, target_words=9) == "Gas prices rose."
    assert principal_sentence("ok", lead_words=40, target_words=10) == "ok"


def test_gap_sentences_hold_out_train_bodies_and_never_read_a_subject():
    bodies = [f"Hello Bob, The {word} report is late. Send the {word} report today."
              for word in ("gas", "power", "coal")]
    source = GapSentences(val_documents=1)
    source.corpus.emails = lambda split: [Email(b, "SECRET SUBJECT", []) for b in bodies]
    train, val = source.examples("train"), source.examples("val")
    assert [body for body, _ in train + val] == bodies and len(val) == 1
    assert val[0][1] == "The coal report is late."
    assert all("SECRET" not in target for _, target in train + val)
    assert source.annotations("val") == [[]]
    too_many = GapSentences(val_documents=3)
    too_many.corpus.emails = source.corpus.emails
    with pytest.raises(UserError, match="val_documents=3 must be between 1 and 2"):
        too_many.examples("train")


def archive(files: dict[str, str], top: str = "AESLC-abc/") -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as z:
        for name, text in files.items():
            z.writestr(top + name, text)
        z.writestr(top + "README.md", "not in the folder")
        z.writestr("../escape.subject", "never written")
    return data.getvalue()


def folder_of(tmp_path: Path, files: dict[str, str]) -> str:
    """The digest of a folder holding these files."""
    for name, text in files.items():
        (tmp_path / "expected" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "expected" / name).write_text(text)
    return sources.folder_digest(tmp_path / "expected")


def test_the_corpus_downloads_as_an_archive_checked_by_a_digest_of_its_files(
        no_mirror, server, tmp_path):  # noqa: F811
    www, base, hits = server
    files = {"enron_subject_line/train/a.subject": EMAIL,
             "enron_subject_line/dev/b.subject": EMAIL.replace("Phillip", "Greg")}
    (www / "aeslc.zip").write_bytes(archive(files))
    inside = {name.split("/", 1)[1]: text for name, text in files.items()}
    folder = sources.RemoteFolder("aeslc/enron_subject_line", f"{base}/aeslc.zip",
                                  folder_of(tmp_path, inside), "AESLC-abc/enron_subject_line/")
    downloads = tmp_path / "downloads"
    found = sources.locate_folder(folder, downloads)
    assert found == downloads / "aeslc" / "enron_subject_line"
    assert sorted(p.relative_to(found).as_posix() for p in found.rglob("*.subject")) == [
        "dev/b.subject", "train/a.subject"]
    assert sources.locate_folder(folder, downloads) == found and len(hits) == 1  # kept
    assert not (tmp_path / "escape.subject").exists()

    wrong = sources.RemoteFolder(folder.relpath, folder.url, "0" * 64, folder.member)
    with pytest.raises(UserError, match="has digest .* expected 0000"):
        sources.locate_folder(wrong, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere" / "aeslc" / "enron_subject_line").exists()


def test_a_mirror_copy_with_another_digest_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "aeslc" / "enron_subject_line" / "train").mkdir(parents=True)
    (tmp_path / "aeslc" / "enron_subject_line" / "train" / "a.subject").write_text(EMAIL)
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path))
    with pytest.raises(UserError, match="mirror copy .* has digest"):
        Aeslc().examples("train")


def test_rouge_is_rouge_scores_f_measure_and_the_best_of_several_references():
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    outputs = ["meeting confirmations for tuesday", "gas prices"]
    targets = ["Confirmation: Risk Management Meeting", "Natural gas prices rise"]
    single = rouge(outputs, targets)
    for name in single:
        expected = sum(scorer.score(t, o)[name].fmeasure for t, o in zip(targets, outputs,
                                                                         strict=True))
        assert single[name] == pytest.approx(100 * expected / 2)
    # Per example and per metric the best reference: here a different one for.
    best = rouge(["a b c d"], [["a b x c d y z", "a b"]])
    assert best["rouge1"] == pytest.approx(100 * scorer.score("a b x c d y z", "a b c d")[
        "rouge1"].fmeasure)
    assert best["rouge2"] == pytest.approx(100 * scorer.score("a b", "a b c d")[
        "rouge2"].fmeasure)
    assert rouge(["running"], ["runs"])["rouge1"] == 100.0  # Porter stemming


def test_the_lead_baseline_takes_as_many_words_as_the_median_reference():
    assert median_words(["a b", "a b c", "a b c d e f"]) == 3
    assert lead("Hi  Phillip, this is   a test", 3) == "Hi Phillip, this"


def test_the_report_sets_the_model_beside_the_lead_baseline_and_the_senders_subjects():
    tokenizer = train_tokenizer("char", ["abc"], special_tokens=[EOS_TOKEN, SEP_TOKEN])
    shape = dict(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8)
    task = SummarizationTask(asdict(GPTConfig(**shape)), {"lr": 1e-3}, {}, tokenizer=tokenizer)
    task.outputs = ["meeting confirmation", "gas prices"]
    task.references = ["Confirmation: meeting", "Gas prices rose today"]
    task.sources = ["Hi Phillip, this confirms the meeting", "Gas prices rose again today"]
    task.annotations = [["meeting confirmed", "confirmation"], ["gas prices", "prices"]]
    scores = task.corpus_scores()
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rouge1_ann", "rouge2_ann",
                           "rougeL_ann"}
    task.baselines = task.reference_points()
    assert set(task.baselines) == {"lead-3 vs target", "lead-2 vs annotations",
                                   "target vs annotations"}
    assert task.baselines["lead-2 vs annotations"] == rouge(["Hi Phillip,", "Gas prices"],
                                                            task.annotations)
    results = {f"test/{name}": value for name, value in scores.items()} | {"test/loss": 1.0}
    unannotated = SummarizationTask(asdict(GPTConfig(**shape)), {"lr": 1e-3}, {},
                                    tokenizer=tokenizer)
    unannotated.outputs, unannotated.references = task.outputs, task.references
    unannotated.annotations = [[], []]  # e.g. AESLC's train split
    assert set(unannotated.corpus_scores()) == {"rouge1", "rouge2", "rougeL"}
    report = task.report(results, "test")
    assert "model vs annotations (best)" in report and "lead-3 vs target" in report
    assert "rouge_score" in report and "Porter stemmer" in report
