"""Text-to-text with either architecture: batches, losses, metrics, checkpoints, init_from."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU, CHRF

from gptlab.checkpoints import CHECKPOINT_KEY, load_checkpoint
from gptlab.data.examples import ParallelFiles
from gptlab.data.finetune import Seq2SeqDataModule
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.data.tokenizers import EOS_TOKEN, SEP_TOKEN, train_tokenizer
from gptlab.errors import UserError
from gptlab.models.gpt import GPTConfig
from gptlab.tasks.classification import ClassificationTask
from gptlab.tasks.seq2seq import Seq2SeqTask, encoder_decoder_batch

OPTIMIZER = {"lr": 3e-3, "weight_decay": 0.0}
SCHEDULER = {"warmup_steps": 5, "min_lr_ratio": 1.0}
TOKENIZER = train_tokenizer("char", ["abcdefgh xyz."], special_tokens=[EOS_TOKEN, SEP_TOKEN])
NEW_FIELDS = ("architecture", "n_encoder_layer", "share_embeddings")


def config(**overrides) -> dict:
    shape = dict(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=2, n_head=2,
                 n_embd=32, pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    return asdict(GPTConfig(**(shape | overrides)))


def task(architecture: str = "encoder_decoder", model: dict | None = None,
         **kwargs) -> Seq2SeqTask:
    torch.manual_seed(0)
    return Seq2SeqTask(config(architecture=architecture, **(model or {})), OPTIMIZER, SCHEDULER,
                       tokenizer=TOKENIZER, **kwargs)


def pairs(tmp_path, sources: str, targets: str) -> Seq2SeqDataModule:
    (tmp_path / "s").write_text(sources)
    (tmp_path / "t").write_text(targets)
    files = {"train": [str(tmp_path / "s"), str(tmp_path / "t")]}
    return Seq2SeqDataModule("pairs", ParallelFiles(files), block_size=32, batch_size=4,
                             tokenizer=TOKENIZER)


def test_an_encoder_decoder_batch_is_the_same_rows_split_at_the_separator(tmp_path):
    data = pairs(tmp_path, "abc\nh\nxyz. ab\n", "de\nfgh ab\nx\n")
    batch = data.collate(data.encoded("train"))
    source_ids, source_mask, decoder_ids, targets = encoder_decoder_batch(batch)
    sep, eos = TOKENIZER.token_to_id(SEP_TOKEN), TOKENIZER.eos_id
    for row, (source, target) in enumerate(data.examples("train")):
        prompt = TOKENIZER.encode(source) + [sep]
        assert source_ids[row][source_mask[row]].tolist() == prompt
        real = targets[row] != IGNORE_INDEX
        assert targets[row][real].tolist() == TOKENIZER.encode(target) + [eos]
        assert decoder_ids[row][real].tolist() == [sep] + TOKENIZER.encode(target)
        assert not real[int(real.sum()):].any()  # right-padded


def test_encoder_decoder_loss_reads_the_source_only_through_cross_attention(tmp_path):
    seq2seq = task()
    data = pairs(tmp_path, "abc\nhgf\n", "xyz.\nxyz.\n")
    a, b = (data.collate([row]) for row in data.encoded("train"))
    assert seq2seq.training_loss(a)[0].item() != seq2seq.training_loss(b)[0].item()
    with torch.no_grad():
        for block in seq2seq.model.decoder.blocks:
            block.cross_attn.c_proj.weight.zero_()
    assert seq2seq.training_loss(a)[0].item() == seq2seq.training_loss(b)[0].item()


def test_a_pointer_generators_loss_is_the_cross_entropy_of_its_mixture(tmp_path):
    seq2seq = task(model={"pointer_generator": True}, label_smoothing=0.1)
    data = pairs(tmp_path, "abc\nhgf xy\n", "xyz.\nab\n")
    batch = data.collate(data.encoded("train"))
    source_ids, source_mask, decoder_ids, targets = encoder_decoder_batch(batch)
    log_probs = seq2seq.model(source_ids, decoder_ids, source_mask=source_mask)
    real = targets != IGNORE_INDEX
    expected = F.cross_entropy(log_probs[real], targets[real], label_smoothing=0.1)
    torch.testing.assert_close(seq2seq.training_loss(batch)[0], expected)
    # Mixture probabilities: what the smoothed loss spreads over sums to one already.
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(real.shape))


def test_prefix_space_tokenizes_a_targets_first_word_as_the_source_does(tmp_path):
    """Byte-level BPE: "Meeting" opening a subject and " Meeting" inside the body are
    different tokens unless every text starts with a space."""
    (tmp_path / "s").write_text("Hi all, the meeting moved.\nPlease send the report.\n")
    (tmp_path / "t").write_text("meeting moved\nreport\n")
    bpe = train_tokenizer("bpe", ["the meeting moved report Hi all send"] * 20, 300,
                          special_tokens=[EOS_TOKEN, SEP_TOKEN])
    files = {"train": [str(tmp_path / "s"), str(tmp_path / "t")]}

    def first_target_token(prefix_space: bool) -> tuple[int, list[int]]:
        data = Seq2SeqDataModule("pairs", ParallelFiles(files), block_size=32, batch_size=2,
                                 tokenizer=bpe, prefix_space=prefix_space)
        row = data.encoded("train")[0]
        return row["sequence"][row["source_len"]], row["prompt"]

    spaced, prompt = first_target_token(True)
    assert spaced == bpe.encode(" meeting")[0] and spaced in prompt
    unspaced, prompt = first_target_token(False)
    assert unspaced == bpe.encode("meeting")[0] and unspaced not in prompt
    # translate() reads an input as training did: with the space.
    seq2seq = Seq2SeqTask(config(vocab_size=bpe.vocab_size, architecture="encoder_decoder"),
                          OPTIMIZER, SCHEDULER, tokenizer=bpe, prefix_space=True,
                          max_new_tokens=3)
    prompts = [bpe.encode(" the meeting moved") + [bpe.token_to_id(SEP_TOKEN)]]
    assert seq2seq.translate(["the meeting moved"]) == seq2seq.decode(prompts)


def test_metrics_are_sacrebleus_bleu_chrf_and_chrf_plus_plus():
    seq2seq = task()
    seq2seq.outputs = ["Ein Mann fährt ein Fahrrad .", "Zwei Hunde spielen im Schnee ."]
    seq2seq.references = ["Ein Mann fährt Fahrrad .", "Zwei Hunde laufen im Schnee ."]
    scores = seq2seq.corpus_scores()
    refs = [seq2seq.references]
    assert scores["bleu"] == BLEU().corpus_score(seq2seq.outputs, refs).score
    assert scores["chrf"] == CHRF(word_order=0).corpus_score(seq2seq.outputs, refs).score
    assert scores["chrf++"] == CHRF(word_order=2).corpus_score(seq2seq.outputs, refs).score
    assert scores["chrf"] != scores["chrf++"]
    assert "nw:0" in seq2seq.signatures["chrf"] and "nw:2" in seq2seq.signatures["chrf++"]
    assert seq2seq.signatures["bleu"] == (
        f"sacreBLEU nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}")


@pytest.mark.parametrize(("make", "message"), [
    (lambda: task(aux_lm_weight=0.5), "aux_lm_weight"),
    (lambda: task(bleu_tokenize="moses"), "bleu_tokenize='moses'"),
    (lambda: ClassificationTask(config(architecture="encoder_decoder"), OPTIMIZER, SCHEDULER,
                                labels=["a", "b"], tokenizer=TOKENIZER), "task=classify"),
])
def test_options_that_do_not_fit_the_architecture_are_user_errors(make, message):
    with pytest.raises(UserError, match=message):
        make()


def save_task(seq2seq: Seq2SeqTask, path, old: bool = False) -> str:
    """A checkpoint as train.py writes it; `old`: as written before the encoder-decoder."""
    artifacts = seq2seq.artifacts()
    hparams = dict(seq2seq.hparams)
    if old:
        for name in NEW_FIELDS:
            artifacts["model_config"].pop(name)
        hparams["model_config"] = artifacts["model_config"]
        hparams.pop("max_source_tokens")
        hparams.pop("prefix_space")
    torch.save({"state_dict": seq2seq.state_dict(), "hyper_parameters": hparams,
                CHECKPOINT_KEY: artifacts}, path)
    return str(path)


def test_checkpoints_from_before_the_encoder_decoder_still_load(tmp_path):
    old = task("decoder_only")
    path = save_task(old, tmp_path / "old.ckpt", old=True)
    assert "architecture" not in torch.load(path, weights_only=True)[CHECKPOINT_KEY][
        "model_config"]
    loaded = load_checkpoint(path).task()
    assert loaded.model.config.architecture == "decoder_only"
    assert loaded.translate(["abc"]) == old.translate(["abc"])
    model = load_checkpoint(path).model()
    torch.testing.assert_close(model.wte.weight, old.model.wte.weight)
    # ...and as the start of a new run.
    seq2seq = Seq2SeqTask(config(), OPTIMIZER, SCHEDULER, tokenizer=TOKENIZER, init_from=path)
    torch.testing.assert_close(seq2seq.model.wte.weight, old.model.wte.weight)


@pytest.mark.parametrize("model", [{}, {"pointer_generator": True}], ids=["plain", "pointer"])
def test_an_encoder_decoder_checkpoint_loads_and_initialises_another_run(tmp_path, model):
    trained = task(model=model, max_new_tokens=6)
    path = save_task(trained, tmp_path / "encdec.ckpt")
    loaded = load_checkpoint(path).task()
    assert loaded.translate(["abc", "xyz"]) == trained.translate(["abc", "xyz"])
    started = task(model=model, init_from=path)
    for name, weight in trained.model.state_dict().items():
        torch.testing.assert_close(started.model.state_dict()[name], weight)
    with pytest.raises(UserError, match="transfer_layers"):
        task(init_from=path, transfer_layers=1)
    with pytest.raises(UserError, match="another shape.*architecture"):
        task("decoder_only", init_from=path)


def test_max_source_tokens_cuts_sources_in_training_and_in_translate(tmp_path):
    data = pairs(tmp_path, "abcdefgh\n", "xyz\n")
    long = data.encoded("train")[0]["prompt"]
    assert len(long) == 9  # 8 characters + <|sep|>, within half the context (16)
    data.max_source_tokens = 4
    data._encoded.clear()
    assert data.encoded("train")[0]["prompt"] == long[:3] + long[-1:]
    assert data.task_arguments() == {"max_source_tokens": 4, "prefix_space": False}
    with pytest.raises(UserError, match="max_source_tokens=32"):
        Seq2SeqDataModule("pairs", ParallelFiles({"train": ["s", "t"]}), block_size=32,
                          batch_size=4, max_source_tokens=32)
    seq2seq = task(max_source_tokens=4, max_new_tokens=3)
    # translate() reads a long input as training did: only its first 3 tokens matter.
    assert seq2seq.translate(["abcdefgh"]) == seq2seq.translate(["abcxyz"])
