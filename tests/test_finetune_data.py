"""Fine-tuning data: labeled and parallel files, tokenization, padding, length buckets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.data.examples import LabeledFiles, Multi30k, ParallelFiles, read_rows
from gptlab.data.finetune import (
    ClassificationDataModule,
    LengthBuckets,
    Seq2SeqDataModule,
    encode_texts,
    evenly_spaced,
)
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.data.tokenizers import EOS_TOKEN, SEP_TOKEN, train_tokenizer
from gptlab.errors import UserError


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def labeled(tmp_path) -> dict[str, str]:
    train = "text\tlabel\n" + "".join(f"good movie {i}\t1\nbad movie {i}\t0\n" for i in range(20))
    return {"train": write(tmp_path / "train.tsv", train),
            "val": write(tmp_path / "val.tsv", "text\tlabel\ngood movie\t1\nbad movie\t0\n")}


def classification(files, batch_size: int = 4, **kwargs) -> ClassificationDataModule:
    return ClassificationDataModule("toy", LabeledFiles(files), block_size=16,
                                    batch_size=batch_size, tokenizer="char", **kwargs)


def test_tsv_csv_and_jsonl_read_the_same_rows(tmp_path):
    rows = [{"text": 'he said "hi", twice', "label": "1"}, {"text": "no", "label": "0"}]
    tsv = write(tmp_path / "a.tsv", 'text\tlabel\nhe said "hi", twice\t1\nno\t0\n')
    csv = write(tmp_path / "a.csv", 'text,label\n"he said ""hi"", twice",1\nno,0\n')
    jsonl = write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for path in (tsv, csv, jsonl):
        assert read_rows(Path(path)) == rows


def test_sst2_from_the_mirror_has_the_glue_sizes():
    sst2 = LabeledFiles({"train": "sst2/train.tsv", "val": "sst2/dev.tsv"}, "sentence", "label")
    train, dev = sst2.examples("train"), sst2.examples("val")
    assert (len(train), len(dev)) == (67349, 872)
    assert {label for _, label in train} == {"0", "1"}
    assert dev[0][0].startswith("it 's a charming and often affecting journey")


def test_multi30k_pairs_line_up_in_both_directions():
    en_de, de_en = Multi30k("en", "de"), Multi30k("de", "en")
    assert len(en_de.examples("train")) == 29000 and len(en_de.examples("test")) == 1000
    assert en_de.examples("val")[0] == tuple(reversed(de_en.examples("val")[0]))
    with pytest.raises(UserError, match="two of en, de, fr"):
        Multi30k("en", "en")


def test_classification_examples_end_with_eos_and_are_cut_to_the_context(labeled, tmp_path):
    data = classification(labeled)
    assert data.labels == ["0", "1"]
    rows = data.encoded("train")
    eos = data.tokenizer.eos_id
    assert all(r["input_ids"][-1] == eos for r in rows)
    assert data.tokenizer.decode(rows[0]["input_ids"][:-1]) == "good movie 0"
    long = encode_texts(data.tokenizer, ["good " * 20], block_size=16)[0]
    assert len(long) == 16 and long[-1] == eos


def test_a_batch_is_right_padded_with_lengths(labeled):
    batch = next(iter(classification(labeled).eval_dataloader("val")))
    assert batch["input_ids"].shape == (2, int(batch["lengths"].max()))
    assert sorted(batch["labels"].tolist()) == [0, 1]


def test_label_outside_the_known_set_is_a_user_error(labeled, tmp_path):
    labeled["val"] = write(tmp_path / "bad.tsv", "text\tlabel\nso so\t2\n")
    with pytest.raises(UserError, match="label '2' in the val split.*data.labels"):
        classification(labeled).encoded("val")


def test_missing_column_and_empty_file_are_user_errors(labeled, tmp_path):
    with pytest.raises(UserError, match="no column 'sentence'.*text_column"):
        ClassificationDataModule("toy", LabeledFiles(labeled, text_column="sentence"), 16, 4,
                                 tokenizer="char").prepare_data()
    labeled["train"] = write(tmp_path / "empty.tsv", "")
    with pytest.raises(UserError, match="has no examples"):
        classification(labeled).prepare_data()


def test_seq2seq_targets_cover_the_target_side_only(tmp_path):
    files = {"train": [write(tmp_path / "s", "a b c\nd e\n"), write(tmp_path / "t", "x y\nz\n")]}
    data = Seq2SeqDataModule("pairs", ParallelFiles(files), block_size=32, batch_size=2,
                             tokenizer="char")
    batch = data.collate(data.encoded("train"))
    tok = data.tokenizer
    for row in range(2):
        target_ids = batch["targets"][row][batch["target_mask"][row]].tolist()
        source, target = data.examples("train")[row]
        assert tok.decode(target_ids) == target + EOS_TOKEN
        assert tok.decode(batch["prompts"][row]) == source + SEP_TOKEN
    # Padding is never a target, and the inputs hold no IGNORE_INDEX.
    assert (batch["input_ids"] >= 0).all()
    assert not (batch["target_mask"] & (batch["targets"] == IGNORE_INDEX)).any()


def test_parallel_files_of_different_lengths_are_a_user_error(tmp_path):
    files = {"train": [write(tmp_path / "s", "a\nb\n"), write(tmp_path / "t", "x\n")]}
    with pytest.raises(UserError, match="2 lines but .* has 1"):
        ParallelFiles(files).examples("train")


def test_length_buckets_cover_every_example_once_with_similar_lengths():
    lengths = torch.randint(1, 60, (1000,)).tolist()
    buckets = LengthBuckets(lengths, batch_size=10, shuffle=True, seed=0, pool=10)
    batches = list(buckets)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    random_spread = sum(max(lengths[i:i + 10]) - min(lengths[i:i + 10])
                        for i in range(0, 1000, 10))
    assert spread < random_spread / 4  # far less padding than random batches
    second_epoch = list(buckets)  # each new iteration is the next epoch...
    assert second_epoch != batches
    again = LengthBuckets(lengths, batch_size=10, shuffle=True, seed=0, pool=10)
    assert list(again) == batches and list(again) == second_epoch  # ...a function of the epoch


def test_length_buckets_continue_mid_epoch_where_a_resumed_run_stopped():
    lengths = torch.randint(1, 60, (100,)).tolist()
    whole = LengthBuckets(lengths, 10, True, seed=5)
    epochs = [list(whole), list(whole)]
    resumed = LengthBuckets(lengths, 10, True, seed=5, start=13)  # 13 batches were trained on
    assert list(resumed) == epochs[1][3:]  # the rest of epoch 1...
    assert list(resumed) == [b.tolist() for b in whole.epoch_batches(2)]  # ...then epoch 2


def test_length_buckets_shard_batches_across_ranks():
    lengths = list(range(1, 101))
    shards = [list(LengthBuckets(lengths, 10, True, seed=3, rank=r, world_size=2))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}


def test_evaluation_batches_are_split_between_ranks_without_repeats():
    lengths = list(range(1, 96))  # 10 batches of 10 (the last of 5) for 3 ranks
    shards = [list(LengthBuckets(lengths, 10, False, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert sorted(i for s in shards for b in s for i in b) == list(range(95))


@pytest.mark.parametrize("examples", [2, 5, 9])
def test_a_split_smaller_than_one_batch_per_rank_still_gives_every_rank_a_batch(examples):
    # Lightning stops a DDP rank whose evaluation loader is empty (a capped final pass of 10
    # SST-2 phrases in one batch of 32 did, under hardware=ddp_cpu).
    shards = [list(LengthBuckets([5] * examples, 32, False, rank=r, world_size=2))
              for r in range(2)]
    assert all(len(s) >= 1 for s in shards) and [len(s) for s in shards] == [
        len(LengthBuckets([5] * examples, 32, False, rank=r, world_size=2)) for r in range(2)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(examples))


def test_a_capped_evaluation_keeps_at_least_one_example_per_rank():
    assert len(evenly_spaced([100] * 50, max_tokens=100)) == 1
    assert len(evenly_spaced([100] * 50, max_tokens=100, at_least=2)) == 2
    assert evenly_spaced([100] * 3, max_tokens=100, at_least=8) == [0, 1, 2]


def test_a_trainer_gets_a_new_batch_order_every_epoch(labeled):
    """Through Lightning itself, which never told the old sampler its epoch."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"][:, 0].tolist() + batch["labels"].tolist())
            return (self.weight * 0).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = classification(labeled)
    data.prepare_data()
    module = Recorder()
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              use_distributed_sampler=False).fit(module, datamodule=data)
    assert len(module.seen) == 20
    assert module.seen[:10] != module.seen[10:]


def test_csv_fields_may_hold_newlines_and_line_separators(tmp_path):
    path = write(tmp_path / "rows.csv", 'text,label\n"two\nlines",1\n"a\u2028b, c",0\n')
    assert read_rows(Path(path)) == [{"text": "two\nlines", "label": "1"},
                                     {"text": "a\u2028b, c", "label": "0"}]


def test_a_row_with_a_stray_tab_is_an_error_naming_file_and_line(tmp_path):
    path = write(tmp_path / "rows.tsv", "text\tlabel\ngood\t1\nbad\tstuff\t0\n")
    with pytest.raises(UserError, match=r"rows.tsv line 3 has 3 fields but the header has 2"):
        LabeledFiles({"train": path}).examples("train")


def test_a_json_null_is_an_error_not_the_text_none(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"text": "fine", "label": 1}\n'
                                          '{"text": null, "label": 0}\n')
    with pytest.raises(UserError, match=r"rows.jsonl line 2: 'text' is null"):
        LabeledFiles({"train": path}).examples("train")


def test_cut_classification_inputs_are_counted(tmp_path, caplog):
    train = "text\tlabel\n" + "".join(f"{'word ' * (3 + i)}\t{i % 2}\n" for i in range(10))
    data = classification({"train": write(tmp_path / "train.tsv", train)})
    with caplog.at_level("WARNING", logger="gptlab"):
        data.encoded("train")
    # 15 characters ("word word word ") fit beside <|endoftext|>; every longer text is cut.
    assert "9 of 10 train texts of 'toy' were cut to fit block_size=16" in caplog.text


def test_batch_size_zero_is_a_user_error(labeled):
    with pytest.raises(UserError, match="data.batch_size=0 must be at least 1"):
        classification(labeled, batch_size=0)


def test_new_tokenizers_have_the_fine_tuning_special_tokens(labeled):
    for kind in ("char", "bpe"):
        tok = train_tokenizer(kind, ["some text"], vocab_size=300,
                              special_tokens=[EOS_TOKEN, SEP_TOKEN])
        assert tok.eos_id is not None and tok.token_to_id(SEP_TOKEN) is not None


def test_hugging_face_labeled_dataset_through_the_json_loader(tmp_path):
    from gptlab.data.examples import HFLabeled

    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "dull", "label": 0}\n')
    source = HFLabeled("json", splits={"train": "train"}, text_column="sentence",
                       data_files={"train": str(path)})
    assert source.examples("train") == [("fine", "1"), ("dull", "0")]
    with pytest.raises(UserError, match="no column 'text'"):
        HFLabeled("json", splits={"train": "train"},
                  data_files={"train": str(path)}).examples("train")


def test_combined_sources_and_a_table_column_as_a_corpus(tmp_path):
    from gptlab.data.documents import Combined, TableColumn, TextFiles

    table = write(tmp_path / "t.tsv", "sentence\tlabel\nfun\t1\nfun\t1\ndull\t0\n")
    notes = write(tmp_path / "notes.txt", "some notes")
    docs = Combined([TextFiles([notes]), TableColumn([table], "sentence")]).documents()
    # the table's repeated row kept once
    assert [doc.read() for doc in docs] == ["some notes", "fun", "dull"]
