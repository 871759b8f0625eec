"""Fine-tuning tasks: what the losses read, what init_from loads, what the metrics say."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import pytest
import torch
from torchmetrics.text import SacreBLEUScore

from gptlab.checkpoints import CHECKPOINT_KEY
from gptlab.data.examples import LabeledFiles
from gptlab.data.finetune import ClassificationDataModule, pad
from gptlab.data.tokenizers import EOS_TOKEN, SEP_TOKEN, train_tokenizer
from gptlab.errors import UserError
from gptlab.models.gpt import GPT, GPTConfig
from gptlab.tasks.classification import ClassificationTask
from gptlab.tasks.seq2seq import Seq2SeqTask

OPTIMIZER = {"lr": 3e-3, "weight_decay": 0.0}
SCHEDULER = {"warmup_steps": 5, "min_lr_ratio": 1.0}
TOKENIZER = train_tokenizer("char", ["abcdefgh xyz."], special_tokens=[EOS_TOKEN, SEP_TOKEN])


def config(**overrides) -> dict:
    shape = dict(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=2, n_head=2,
                 n_embd=32, pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    return asdict(GPTConfig(**(shape | overrides)))


def classifier(**kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(config(), OPTIMIZER, SCHEDULER, labels=["neg", "pos"],
                              tokenizer=TOKENIZER, **kwargs)


def batch_of(rows: list[list[int]], labels: list[int]) -> dict:
    return {"input_ids": pad(rows), "lengths": torch.tensor([len(r) for r in rows]),
            "labels": torch.tensor(labels)}


def test_a_tiny_classifier_learns_a_separable_toy_set(tmp_path):
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    rows = "".join(f"{w} film {i}\t{int(w in ('good', 'fine', 'great'))}\n"
                   for i in range(10) for w in words)
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + rows)
    files = {"train": str(tmp_path / "train.tsv"), "val": str(tmp_path / "train.tsv")}
    data = ClassificationDataModule("toy", LabeledFiles(files), block_size=32, batch_size=12,
                                    tokenizer="char")
    torch.manual_seed(0)
    task = ClassificationTask(config(vocab_size=data.vocab_size), OPTIMIZER, SCHEDULER,
                              labels=data.labels, tokenizer=data.tokenizer, head_dropout=0.0)
    trainer = L.Trainer(max_steps=150, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, val_check_interval=150,
                        check_val_every_n_epoch=None)
    trainer.fit(task, datamodule=data)
    (metrics,) = trainer.validate(task, datamodule=data, verbose=False)
    assert metrics["val/acc"] == 1.0


def test_the_head_reads_the_last_real_token_not_padding():
    task = classifier().eval()
    rows = [TOKENIZER.encode("abc") + [TOKENIZER.eos_id], TOKENIZER.encode("xyz abc.")]
    short = task(pad(rows), torch.tensor([len(r) for r in rows]))[0]
    padded_more = pad([r + [7] * 9 for r in rows])  # longer padding with another value
    longer = task(padded_more, torch.tensor([len(r) for r in rows]))[0]
    torch.testing.assert_close(short, longer)
    # ...and it really is the last token's state: dropping the last token changes the logits.
    cut = task(pad(rows), torch.tensor([len(r) - 1 for r in rows]))[0]
    assert not torch.allclose(short, cut)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_mean_and_max_pooling_ignore_padding_too(pooling):
    task = classifier(pooling=pooling).eval()
    rows = [TOKENIZER.encode("abc"), TOKENIZER.encode("xyz abc.")]
    lengths = torch.tensor([len(r) for r in rows])
    torch.testing.assert_close(task(pad(rows), lengths)[0],
                               task(pad([r + [5] * 4 for r in rows]), lengths)[0])


def test_aux_lm_term_is_zero_at_weight_zero_and_changes_the_gradient_otherwise():
    batch = batch_of([TOKENIZER.encode("abc. xyz"), TOKENIZER.encode("ab")], [1, 0])
    grads = {}
    for weight in (0.0, 0.5):
        task = classifier(aux_lm_weight=weight, head_dropout=0.0)
        loss, _, terms = task.losses(batch)
        if weight == 0:
            assert "lm_loss" not in terms and loss.item() == terms["cls_loss"].item()
        else:
            expected = terms["cls_loss"] + 0.5 * terms["lm_loss"]
            assert loss.item() == pytest.approx(expected.item()) and terms["lm_loss"] > 0
        loss.backward()
        grads[weight] = task.model.wte.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.5])


def test_class_weights_need_one_value_per_class():
    with pytest.raises(UserError, match="class_weights has 3 values for 2 classes"):
        classifier(class_weights=[1.0, 2.0, 3.0])


def pretrained_checkpoint(tmp_path, **shape) -> str:
    """A checkpoint file as a pretraining run writes it (weights + gptlab artifacts)."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(**config(**shape)))
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                CHECKPOINT_KEY: {"task": "pretrain", "model_config": asdict(model.config),
                                 "tokenizer": TOKENIZER.to_str(), "data_config": {}}}, path)
    return str(path)


def test_init_from_loads_the_pretrained_weights(tmp_path):
    path = pretrained_checkpoint(tmp_path)
    pretrained = torch.load(path, weights_only=True)["state_dict"]
    task = classifier(init_from=path)
    for name in ("wte.weight", "blocks.1.mlp.c_proj.weight", "ln_f.weight"):
        torch.testing.assert_close(task.model.state_dict()[name], pretrained[f"model.{name}"])
    assert not torch.allclose(classifier().model.wte.weight, task.model.wte.weight)


def test_transfer_layers_copies_only_the_first_k_blocks(tmp_path):
    path = pretrained_checkpoint(tmp_path)
    pretrained = torch.load(path, weights_only=True)["state_dict"]
    task = classifier(init_from=path, transfer_layers=1)
    weights = task.model.state_dict()
    name = "attn.c_attn.weight"
    torch.testing.assert_close(weights[f"blocks.0.{name}"], pretrained[f"model.blocks.0.{name}"])
    assert not torch.allclose(weights[f"blocks.1.{name}"], pretrained[f"model.blocks.1.{name}"])


def test_init_from_of_another_shape_or_nothing_is_a_user_error(tmp_path):
    path = pretrained_checkpoint(tmp_path, n_embd=64)
    with pytest.raises(UserError, match="another shape.*n_embd=64.*model= size"):
        classifier(init_from=path)
    with pytest.raises(UserError, match="does not exist"):
        classifier(init_from=str(tmp_path / "nothing"))


def test_freeze_backbone_trains_only_the_head():
    task = classifier(freeze_backbone=True)
    trainable = {name for name, p in task.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}


def seq2seq_batch(source: str, target: str) -> dict:
    prompt = TOKENIZER.encode(source) + [TOKENIZER.token_to_id(SEP_TOKEN)]
    sequence = torch.tensor(prompt + TOKENIZER.encode(target) + [TOKENIZER.eos_id])
    targets = sequence[1:].clone()
    mask = torch.arange(len(targets)) >= len(prompt) - 1
    return {"input_ids": sequence[None, :-1], "targets": targets[None],
            "target_mask": mask[None]}


def seq2seq_loss(task: Seq2SeqTask, batch: dict) -> float:
    loss, _ = task.training_loss(batch)
    return loss.item()


@pytest.mark.parametrize("aux_lm_weight", [0.0, 0.5])
def test_seq2seq_loss_reads_source_tokens_only_through_attention(aux_lm_weight):
    torch.manual_seed(0)
    task = Seq2SeqTask(config(), OPTIMIZER, SCHEDULER, tokenizer=TOKENIZER,
                       aux_lm_weight=aux_lm_weight)
    a, b = seq2seq_batch("abc", "xyz."), seq2seq_batch("hgf", "xyz.")
    assert seq2seq_loss(task, a) != seq2seq_loss(task, b)  # through attention
    with torch.no_grad():
        for block in task.model.blocks:
            block.attn.c_proj.weight.zero_()  # no attention: each position sees only itself
    same = seq2seq_loss(task, a) == seq2seq_loss(task, b)
    assert same if aux_lm_weight == 0 else not same  # the aux term does score the source


def test_bleu_of_a_perfect_hypothesis_is_100_and_of_a_wrong_one_0():
    references = ["Ein Mann fährt Fahrrad .", "Zwei Hunde spielen im Schnee ."]
    bleu = SacreBLEUScore(tokenize="13a")
    assert 100 * bleu(references, [[r] for r in references]).item() == pytest.approx(100.0)
    assert bleu(["Katze"] * 2, [[r] for r in references]).item() == 0.0
