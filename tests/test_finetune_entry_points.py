"""Fine-tuning as a user runs it: pretrain, then classify and translate from that run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import metrics_column, run_entry, run_folder
from tests.test_user_errors import fails

FAST = ("debug=fast", "logger=csv", "hardware=cpu")


@pytest.fixture(scope="module")
def pretrained(workspace) -> Path:
    """A short pretraining run on the SST-2 sentences (BPE), the start of every fine-tuning."""
    out = run_entry("train.py", *workspace.args, *FAST, "model=nano", "data=sst2_text")
    return run_folder(out)


@pytest.fixture(scope="module")
def classify_run(workspace, pretrained) -> tuple[Path, str]:
    out = run_entry("train.py", *workspace.args, *FAST, "model=nano", "task=classify",
                    "data=sst2", f"task.init_from={pretrained}", "task.aux_lm_weight=0.5")
    return run_folder(out), out


@pytest.fixture(scope="module")
def seq2seq_run(workspace, pretrained) -> Path:
    out = run_entry("train.py", *workspace.args, *FAST, "model=nano", "task=seq2seq",
                    "data=multi30k_en_de", f"task.init_from={pretrained}",
                    "task.max_new_tokens=8")
    return run_folder(out)


def test_classify_from_a_pretrained_run_trains_and_reports(classify_run, pretrained):
    run, out = classify_run
    assert "/classify/runs/" in str(run) and "val_full/acc" in out and "val_last/acc" in out
    # debug=fast's final_eval_tokens caps the end-of-run passes on labeled splits too.
    assert re.search(r"\(best checkpoint, \d+ of 872 val examples, final_eval_tokens\)", out)
    for name in ("train/loss", "train/cls_loss", "train/lm_loss", "val/acc", "val/f1",
                 "val/acc_best"):
        assert metrics_column(run, name), name
    # Fine-tuning started from the pretrained weights and kept the pretrained tokenizer.
    assert (run / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()
    first = torch.load(next((pretrained / "checkpoints").glob("last.ckpt")), weights_only=True)
    assert json.loads(first["gptlab"]["tokenizer"]) == json.loads(
        (run / "tokenizer.json").read_text())


def test_evaluate_a_classifier_prints_accuracy_f1_and_the_confusion_matrix(classify_run):
    run, _ = classify_run
    out = run_entry("evaluate.py", f"run={run}", "trainer.limit_val_batches=2")
    assert "confusion matrix" in out and "negative" in out and "positive" in out
    report = json.loads(next(run.glob("evaluation-best-*-val.json")).read_text())
    assert 0 <= report["val/acc"] <= 1 and len(report["confusion_matrix"]) == 2
    assert sum(map(sum, report["confusion_matrix"])) == 16  # 2 batches of 8


def test_generate_labels_a_sentence_and_a_file(classify_run, tmp_path):
    run, _ = classify_run
    out = run_entry("generate.py", f"run={run}", 'text=a gorgeous, witty, seductive movie .')
    label, probability, text = out.strip().splitlines()[-1].split("\t")
    assert label in ("negative", "positive") and 0.5 <= float(probability) <= 1
    assert text == "a gorgeous, witty, seductive movie ."
    (tmp_path / "in.txt").write_text("a dull movie .\nfun !\n")
    run_entry("generate.py", f"run={run}", f"input_file={tmp_path / 'in.txt'}",
              f"output_file={tmp_path / 'out.tsv'}")
    lines = (tmp_path / "out.tsv").read_text().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["a dull movie .", "fun !"]


def test_seq2seq_trains_evaluates_on_test2016_and_translates(seq2seq_run, tmp_path):
    run = seq2seq_run
    for name in ("val/bleu", "val/chrf", "val/chrf++", "val/bleu_best"):
        assert metrics_column(run, name), name
    results = json.loads((run / "results.json").read_text())
    assert "val_full/bleu" in results and "val_last/chrf" in results
    assert "val_full/chrf++" in results
    out = run_entry("evaluate.py", f"run={run}", "trainer.limit_val_batches=1", "beam_size=2")
    assert "test: BLEU" in out and "chrF++" in out and "beam 2" in out
    assert "sacreBLEU nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in out
    report = json.loads(next(run.glob("evaluation-best-*-test-beam2.json")).read_text())
    assert len(report["hypotheses"]) == 8 and "nw:0" in report["signatures"]["chrf"]
    (tmp_path / "in.txt").write_text("A man is riding a bike .\nTwo dogs play .\n")
    out = run_entry("generate.py", f"run={run}", f"input_file={tmp_path / 'in.txt'}",
                    f"output_file={tmp_path / 'out.txt'}")
    # Two sentences in, two translations out (a 6-step model's translations may be empty).
    assert len((tmp_path / "out.txt").read_text().split("\n")) == 3 and "2 lines" in out


@pytest.fixture(scope="module")
def summarize_run(workspace) -> Path:
    """An encoder-decoder (separate source and target tables) summarising AESLC emails."""
    out = run_entry("train.py", *workspace.args, *FAST, "model=nano", "task=summarize",
                    "data=aeslc", "data.vocab_size=1000", "data.max_source_tokens=40",
                    "model.architecture=encoder_decoder", "model.n_encoder_layer=1",
                    "model.share_embeddings=false", "task.max_new_tokens=6")
    return run_folder(out)


@pytest.mark.slow
def test_an_encoder_decoder_summarizes_emails_with_rouge_and_a_lead_baseline(summarize_run,
                                                                              tmp_path):
    run = summarize_run
    assert "/summarize/runs/" in str(run)
    for name in ("val/rouge1", "val/rouge2", "val/rougeL", "val/rouge1_ann", "val/rougeL_ann",
                 "val/rouge1_best"):
        assert metrics_column(run, name), name
    assert "val_full/rouge2_ann" in json.loads((run / "results.json").read_text())
    config = json.loads((run / "model_config.json").read_text())
    assert config["architecture"] == "encoder_decoder" and config["n_encoder_layer"] == 1
    out = run_entry("evaluate.py", f"run={run}", "trainer.limit_val_batches=1", "beam_size=3")
    for row in ("model vs target", "model vs annotations (best)", "vs target",
                "vs annotations", "target vs annotations", "beam 3", "Porter stemmer"):
        assert row in out, row
    report = json.loads(next(run.glob("evaluation-best-*-test-beam3.json")).read_text())
    assert len(report["hypotheses"]) == 8 and "test/rouge1_ann" in report
    assert any(name.startswith("lead-") for name in report["reference_points"])
    email = "Please find attached the gas prices for May. Call me if you have questions."
    out = run_entry("generate.py", f"run={run}", f"text={email}")
    assert "error" not in out
    (tmp_path / "in.txt").write_text(email + "\nThe meeting moved to Tuesday at 3 pm.\n")
    out = run_entry("generate.py", f"run={run}", f"input_file={tmp_path / 'in.txt'}",
                    f"output_file={tmp_path / 'out.txt'}")
    assert len((tmp_path / "out.txt").read_text().split("\n")) == 3 and "2 lines" in out


@pytest.mark.slow
def test_gap_sentence_pretraining_starts_the_aeslc_summarizer(workspace):
    small = ("logger=csv", "model.n_embd=32", "model.n_head=2", "model.n_layer=1",
             "model.n_encoder_layer=1", "data.vocab_size=600", "task.max_new_tokens=4")
    pretrained = run_folder(run_entry("train.py", "experiment=aeslc_gap_pretrain",
                                      *workspace.args, *FAST, *small))
    assert metrics_column(pretrained, "val/rouge1")  # against the principal sentences
    assert not metrics_column(pretrained, "val/rouge1_ann")  # no annotations: no subjects read
    run = run_folder(run_entry("train.py", "experiment=summarize_aeslc", *workspace.args,
                               *FAST, *small, f"task.init_from={pretrained}"))
    assert (run / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()
    assert metrics_column(run, "val/rouge1_ann")


def test_classify_and_seq2seq_from_scratch_train_their_own_tokenizer(workspace):
    out = run_entry("train.py", *workspace.args, *FAST, "model=nano", "task=classify",
                    "data=sst2", "data.vocab_size=512", "task.pooling=mean")
    assert json.loads((run_folder(out) / "tokenizer.json").read_text())["model"]["type"] == "BPE"


# -- mistakes ----------------------------------------------------------------------------
def finetune_fails(workspace, *args: str) -> str:
    return fails("train.py", *workspace.args, *FAST, "task=classify", *args)


def test_init_from_pointing_at_nothing(workspace, tmp_path):
    line = finetune_fails(workspace, "model=nano", "data=sst2",
                          f"task.init_from={tmp_path / 'no_such_run'}")
    assert "task.init_from" in line and "does not exist" in line


def test_init_from_a_run_of_another_shape(workspace, pretrained):
    line = finetune_fails(workspace, "model=tiny", "data=sst2", f"task.init_from={pretrained}")
    assert "another shape" in line and "model=" in line


def test_tokenizer_mismatch_between_init_from_and_data_tokenizer(workspace, pretrained,
                                                                  tmp_path):
    from gptlab.data.tokenizers import train_tokenizer

    other = tmp_path / "other.json"
    train_tokenizer("char", ["some other text"]).save(other)
    line = finetune_fails(workspace, "model=nano", "data=sst2", f"task.init_from={pretrained}",
                          f"data.tokenizer={other}")
    assert "differs from the tokenizer of task.init_from" in line


def labeled_files(tmp_path, train: str, val: str = "text\tlabel\nok\t1\n") -> list[str]:
    (tmp_path / "train.tsv").write_text(train)
    (tmp_path / "val.tsv").write_text(val)
    return ["model=nano", "data=labeled_files", f"data.source.files.train={tmp_path}/train.tsv",
            f"data.source.files.val={tmp_path}/val.tsv", "data.tokenizer=char"]


def test_label_outside_the_known_set(workspace, tmp_path):
    line = finetune_fails(workspace, *labeled_files(tmp_path, "text\tlabel\nok\t1\nno\t0\n",
                                                    "text\tlabel\nok\t7\n"))
    assert "label '7'" in line and "data.labels" in line


def test_missing_text_column(workspace, tmp_path):
    line = finetune_fails(workspace, *labeled_files(tmp_path, "sentence\tlabel\nok\t1\n"))
    assert "no column 'text'" in line and "text_column" in line


def test_empty_labeled_file(workspace, tmp_path):
    line = finetune_fails(workspace, *labeled_files(tmp_path, "text\tlabel\n"))
    assert "no examples" in line
