"""Data at scale through the real entry points: many files split by document and loader
workers, DDP scoring, a dataset's own splits with a GPT-2-format tokenizer, the bench."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptlab.data.tokenizers import Tokenizer, from_tiktoken_ranks
from tests.conftest import REPO, metrics_column, run_entry, run_folder
from tests.test_tokenizers import ranks_file

FAST = ("model=nano", "debug=fast", "logger=csv", "hardware=cpu")


@pytest.mark.slow
def test_many_text_files_split_by_document_and_loader_workers_change_nothing(tmp_path,
                                                                             shakespeare):
    """40 files split by document, prepared by 2 processes; then issue 10.5: with
    data.num_workers=2 no batch is repeated, and the run is the run of num_workers=0."""
    rng, lines = random.Random(1), shakespeare.splitlines(keepends=True)
    for i in range(40):
        (tmp_path / f"notes{i:02d}.txt").write_text("".join(rng.choices(lines, k=200)))
    args = (f"paths.root_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", *FAST,
            "data=text_files", f"data.source.paths=[{tmp_path}/notes*.txt]",
            "data.vocab_size=300", "data.test_fraction=0.1", "data.num_proc=2")
    runs = [run_folder(run_entry("train.py", *args, f"data.num_workers={n}")) for n in (0, 2)]
    (cache,) = (tmp_path / "cache").glob("text_files-*")
    meta = json.loads((cache / "meta.json").read_text())
    counts = [meta["splits"][s]["documents"] for s in ("train", "val", "test")]
    assert meta["options"]["mode"] == "document" and sum(counts) == 40 and min(counts) > 0
    for name in ("train/loss", "val/loss", "train/tokens", "val_full/loss"):
        assert metrics_column(runs[0], name) == metrics_column(runs[1], name), name


@pytest.mark.slow
def test_ddp_scores_every_validation_token_once(workspace, tmp_path):
    """val_full/loss of two DDP ranks equals that of one process on the same checkpoint."""
    out = run_entry("train.py", *workspace.args, "model=nano", "debug=fast", "logger=csv",
                    "hardware=ddp_cpu", "final_eval_tokens=null")
    run = run_folder(out)
    two_ranks = json.loads((run / "results.json").read_text())["val_full/loss"]
    run_entry("evaluate.py", f"run={run}", cwd=tmp_path)
    one = json.loads(next(run.glob("evaluation-best-*-val.json")).read_text())["val_full/loss"]
    assert two_ranks == pytest.approx(one, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("task", "metric"), [("classify", "acc"), ("seq2seq", "bleu")])
def test_ddp_scores_every_labeled_example_once(task, metric, workspace, tmp_path):
    """Fine-tuning validation split between two ranks gives one process's figures."""
    data = {"classify": ["data=sst2"],
            "seq2seq": ["data=multi30k_en_de", "task.max_new_tokens=6"]}[task]
    out = run_entry("train.py", *workspace.args, f"task={task}", *data, "model=nano",
                    "debug=fast", "logger=csv", "hardware=ddp_cpu", "final_eval_tokens=null")
    run = run_folder(out)
    two_ranks = json.loads((run / "results.json").read_text())
    run_entry("evaluate.py", f"run={run}", "split=val", "beam_size=1", cwd=tmp_path)
    (report,) = run.glob("evaluation-best-*-val*.json")  # -beam1 for seq2seq
    one = json.loads(report.read_text())
    assert two_ranks[f"val_full/{metric}"] == pytest.approx(one[f"val/{metric}"], abs=1e-4)


def wikitext_like(folder: Path, rng: random.Random, lines: list[str]) -> dict[str, str]:
    """Parquet files laid out like Salesforce/wikitext: one row per line, titles, blank rows."""
    files = {}
    for split, articles in (("train", 30), ("validation", 4), ("test", 4)):
        rows = []
        for a in range(articles):
            rows += ["", f" = {split.title()} article {a} = \n", ""]
            rows += [" " + " ".join(line.strip() for line in rng.choices(lines, k=6)) + " \n"
                     for _ in range(8)]
        files[split] = str(folder / f"{split}.parquet")
        pq.write_table(pa.table({"text": rows}), files[split])
    return files


@pytest.mark.slow
def test_a_datasets_own_splits_with_a_gpt2_format_tokenizer(workspace, tmp_path, shakespeare):
    """The wikitext-103 recipe (data=wikitext103) on local parquet files of the same format,
    with a small tokenizer in GPT-2's format in place of GPT-2's own (no network here)."""
    files = wikitext_like(tmp_path, random.Random(0), shakespeare.splitlines())
    ranks_file(tmp_path / "small.tiktoken", shakespeare[:200_000], vocab_size=500)
    from_tiktoken_ranks(tmp_path / "small.tiktoken").save(tmp_path / "tokenizer.json")
    data_files = ",".join(f"{split}: '{path}'" for split, path in files.items())
    common = (*workspace.args, *FAST, "data=wikitext103", "data.source.path=parquet",
              f"data.cache_dir={tmp_path / 'cache'}",
              "data.source.name=null", f"data.source.data_files={{{data_files}}}",
              f"data.tokenizer={tmp_path / 'tokenizer.json'}", "data.num_proc=2")
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    run = run_folder(run_entry("train.py", *common, "data.source.streaming=true", env=env))
    (cache,) = (tmp_path / "cache").glob("wikitext103-*")
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["options"]["mode"] == "dataset" and meta["vocab_size"] == 499  # 498 + EOS
    assert [meta["splits"][s]["documents"] for s in ("train", "val", "test")] == [330, 44, 44]
    out = run_entry("evaluate.py", f"run={run}", "split=test", cwd=tmp_path, env=env)
    assert "test_full" in out


@pytest.mark.slow
def test_the_preparation_benchmark_runs_small(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "prepare_speed.py"), "--size-mb", "20",
         "--files", "16", "--tokenizer", "char", "--train-rounds", "2", "--train-steps", "3",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert 19e6 < report["corpus_bytes"] < 22e6
    assert [r["num_proc"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert run["mb_per_s"] > 0 and 10 < run["peak_pss_mb"] <= run["peak_rss_mb"] < 3000
        assert run["train"] == report["runs"][0]["train"] > 0
    assert "| 2 |" in proc.stdout
    training = report["training"]
    assert training["generated corpus"]["train_tokens"] == report["runs"][0]["train"]
    assert training["Tiny Shakespeare"]["train_tokens"] == 1_003_854  # the 90% split, chars
    for corpus in training.values():
        assert len(corpus["seconds_per_step"]) == 2 and corpus["tokens_per_s"] > 0
    assert "| Tiny Shakespeare |" in proc.stdout


@pytest.mark.slow
def test_the_broad_sst2_corpus_adds_every_aeslc_train_email_and_validates_on_email(workspace):
    """data=sst2_text_broad: sst2_text_plus's 66,979 documents (captions, SST-2 phrases) and
    the 14,436 AESLC train emails after them, so the last 10% (validation) is email text."""
    run_entry("train.py", *workspace.args, *FAST, "data=sst2_text_broad")
    (cache,) = (workspace.root / "cache").glob("sst2_text_broad-*")
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["documents"] == 66_979 + 14_436
    val = np.concatenate([np.fromfile(cache / shard["file"], dtype=meta["dtype"])
                          for shard in meta["splits"]["val"]["shards"]])
    text = Tokenizer.from_str((cache / "tokenizer.json").read_text()).decode(val.tolist())
    assert text.count("@subject") > 1000  # every email ends with its sender's subject
