"""A look inside: captured attention equals the layers' own softmax(QK^T/sqrt(d_k)), rollout,
gradient x input, the pictures and tables, and `python -m gptlab.interpret` on real runs."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab import interpret
from gptlab.data.tokenizers import EOS_TOKEN, SEP_TOKEN, train_tokenizer
from gptlab.errors import UserError
from gptlab.interpret import (
    attention_maps,
    attention_rollout,
    explain_classifier,
    explain_text,
    explain_text_to_text,
    record_attention,
    write_pictures,
)
from gptlab.models.encoder_decoder import EncoderDecoder
from gptlab.models.gpt import (
    GPT,
    CrossAttention,
    GPTConfig,
    SelfAttention,
    apply_rotary,
    split_heads,
)
from gptlab.tasks.classification import POOLINGS, ClassificationTask, pooled_shares
from gptlab.tasks.seq2seq import Seq2SeqTask
from tests.conftest import REPO, run_entry, run_folder

TOKENIZER = train_tokenizer("bpe", ["a gorgeous, witty movie. a dull film."] * 20,
                            vocab_size=300)
CHARS = train_tokenizer("char", ["abcdefgh xyz.\n"], special_tokens=[EOS_TOKEN, SEP_TOKEN])
OPTIMIZER, SCHEDULER = {"lr": 1e-3}, {"warmup_steps": 1}
PNG = b"\x89PNG\r\n\x1a\n"


def config(**overrides) -> GPTConfig:
    return GPTConfig(**(dict(vocab_size=CHARS.vocab_size, block_size=32, n_layer=2, n_head=2,
                             n_embd=16) | overrides))


def inputs_of(module_type: type, model: torch.nn.Module) -> list[tuple]:
    """A list that fills, during a forward, with each such layer's (args, kwargs)."""
    seen: list[tuple] = []
    for module in model.modules():
        if isinstance(module, module_type):
            module.register_forward_pre_hook(
                lambda m, args, kwargs: seen.append((m, args, kwargs)), with_kwargs=True)
    return seen


def softmax_qk(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return F.softmax(scores if mask is None else scores.masked_fill(~mask, float("-inf")), -1)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_maps_are_the_softmax_of_each_layers_own_q_and_k_and_give_back_its_output(pos_emb):
    torch.manual_seed(0)
    model = GPT(config(pos_emb=pos_emb)).eval()
    layer_inputs = inputs_of(SelfAttention, model)
    idx = torch.randint(0, CHARS.vocab_size, (1, 11))
    with torch.no_grad(), record_attention(model) as captured:
        model(idx)
    maps = attention_maps(captured)["self"]
    assert maps.shape == (2, 2, 11, 11) and [c.name for c in captured] == [
        "blocks.0.attn.attend", "blocks.1.attn.attend"]
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 11))
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    for layer, ((attn, (x,), kwargs), record) in enumerate(zip(layer_inputs, captured,
                                                               strict=True)):
        with torch.no_grad():  # Q and K from the layer's weights, independently of the hook
            q, k, _ = (split_heads(z, 2) for z in attn.c_attn(x).split(16, dim=2))
            if kwargs.get("rope") is not None:
                q, k = apply_rotary(q, *kwargs["rope"]), apply_rotary(k, *kwargs["rope"])
        torch.testing.assert_close(maps[layer], softmax_qk(q, k, causal)[0])
        torch.testing.assert_close(record.weights() @ record.v, record.output)
        assert (maps[layer].triu(1) == 0).all()  # causal: nothing from the future


def test_padded_rows_use_the_layers_mask():
    torch.manual_seed(0)
    model = GPT(config()).eval()
    idx = torch.randint(0, CHARS.vocab_size, (2, 7))
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, :3] = False  # row 1 is left-padded
    with torch.no_grad(), record_attention(model) as captured:
        model(idx, attention_mask=padding)
    for record in captured:
        assert record.mask is not None and not record.is_causal
        weights = record.weights()
        torch.testing.assert_close(weights @ record.v, record.output)
        assert (weights[1, :, 3:, :3] == 0).all()  # real tokens never read the padding


def test_encoder_decoder_maps_encoder_decoder_and_cross_attention():
    torch.manual_seed(0)
    model = EncoderDecoder(config(architecture="encoder_decoder", n_encoder_layer=1)).eval()
    cross_inputs = inputs_of(CrossAttention, model)
    source, target = torch.randint(0, CHARS.vocab_size, (1, 9)), torch.randint(0, 5, (1, 4))
    with torch.no_grad(), record_attention(model) as captured:
        model(source, target)
    maps = attention_maps(captured)
    assert {kind: tuple(m.shape) for kind, m in maps.items()} == {
        "encoder": (1, 2, 9, 9), "decoder": (2, 2, 4, 4), "cross": (2, 2, 4, 9)}
    assert (maps["encoder"].triu(1) > 0).any() and (maps["decoder"].triu(1) == 0).all()
    for record in captured:
        torch.testing.assert_close(record.weights() @ record.v, record.output)
        torch.testing.assert_close(record.weights().sum(-1), torch.ones(record.q.shape[:3]))
    for layer, (attn, (x, k, _, mask), _) in enumerate(cross_inputs):
        with torch.no_grad():
            q = split_heads(attn.c_q(x), 2)
        torch.testing.assert_close(maps["cross"][layer], softmax_qk(q, k, mask)[0])


def test_rollout_rows_are_shares_that_sum_to_one():
    torch.manual_seed(0)
    raw = torch.rand(3, 2, 5, 5).tril()
    maps = raw / raw.sum(-1, keepdim=True)
    rollout = attention_rollout(maps)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(5))
    assert (rollout.triu(1) == 0).all() and (rollout >= 0).all()
    torch.testing.assert_close(attention_rollout(torch.eye(5).expand(3, 2, 5, 5)), torch.eye(5))


def classifier(pooling: str = "last") -> ClassificationTask:
    torch.manual_seed(0)
    shape = asdict(config(vocab_size=TOKENIZER.vocab_size))
    return ClassificationTask(shape, OPTIMIZER, SCHEDULER, labels=["negative", "positive"],
                              pooling=pooling, tokenizer=TOKENIZER).eval()


@pytest.mark.parametrize("pooling", POOLINGS)
def test_a_classifiers_attribution_covers_every_token_and_is_not_trivial(pooling):
    task = classifier(pooling)
    explanation = explain_classifier(task, "a gorgeous, witty movie.", None)
    attribution = explanation.attribution
    n = len(TOKENIZER.encode("a gorgeous, witty movie.")) + 1  # + <|endoftext|>
    assert len(attribution.tokens) == len(attribution.gradient_x_input) == n
    assert attribution.tokens[-1] == EOS_TOKEN and len(attribution.rollout) == n
    assert len(set(attribution.gradient_x_input)) == n  # no two tokens alike
    assert sum(attribution.rollout) == pytest.approx(1.0)
    probabilities = task.classify(["a gorgeous, witty movie."])[0]
    assert attribution.label == max(probabilities, key=probabilities.get)
    assert attribution.probability == pytest.approx(probabilities[attribution.label])
    (unpredicted,) = set(task.labels) - {attribution.label}
    other = explain_classifier(task, "a gorgeous, witty movie.", unpredicted).attribution
    assert other.label == unpredicted and other.gradient_x_input != attribution.gradient_x_input
    assert all(p.grad is None for p in task.parameters())  # the weights were left alone
    with pytest.raises(UserError, match="label=neutral is not a class"):
        explain_classifier(task, "a film", "neutral")


def test_pooled_shares_say_where_each_pooling_reads():
    hidden = torch.tensor([[3.0, 0.0, 1.0, 5.0], [1.0, 2.0, 4.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    assert pooled_shares(hidden, "last").tolist() == [0.0, 0.0, 1.0]
    assert pooled_shares(hidden, "max").tolist() == [0.5, 0.5, 0.0]  # 2 features each
    torch.testing.assert_close(pooled_shares(hidden, "mean"), torch.full((3,), 1 / 3))


def test_pictures_and_tables_are_written(tmp_path):
    written = write_pictures(explain_classifier(classifier(), "a dull film.", None), tmp_path)
    assert [p.name for p in written] == ["attention.png", "attribution.png", "attribution.md",
                                         "attribution.csv"]
    for png in written[:2]:
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    rows = (tmp_path / "attribution.csv").read_text().splitlines()
    assert rows[0] == "position,token,gradient_x_input,rollout" and len(rows) == 1 + len(
        TOKENIZER.encode("a dull film.")) + 1
    assert "| position | token | gradient x input | rollout |" in (
        tmp_path / "attribution.md").read_text()


@pytest.mark.parametrize("architecture", ["decoder_only", "encoder_decoder"])
def test_text_to_text_reads_the_source_and_the_target(architecture):
    torch.manual_seed(0)
    task = Seq2SeqTask(asdict(config(architecture=architecture)), OPTIMIZER, SCHEDULER,
                       tokenizer=CHARS, max_new_tokens=4).eval()
    given = explain_text_to_text(task, "abc", "xyz")
    own = explain_text_to_text(task, "abc", None)
    assert given.target == "xyz" and own.target == task.translate(["abc"])[0]
    if architecture == "decoder_only":  # a b c <|sep|> x y z <|endoftext|>
        rows, columns = given.axes["self"]
        assert rows == columns == ["a", "b", "c", SEP_TOKEN, "x", "y", "z", EOS_TOKEN]
        assert given.maps["self"].shape == (2, 2, 8, 8)
    else:
        assert given.axes["cross"] == ([SEP_TOKEN, "x", "y", "z"], ["a", "b", "c", SEP_TOKEN])
        assert given.maps["cross"].shape == (2, 2, 4, 4) and set(given.maps) == {
            "encoder", "decoder", "cross"}


def test_plain_text_of_a_language_model_and_its_mistakes():
    model = GPT(config()).eval()
    explanation = explain_text(model, CHARS, "ab c\nd")
    assert explanation.axes["self"][0] == ["a", "b", "\u2423", "c", "\\n", "d"]
    with pytest.raises(UserError, match="has no tokens"):
        explain_text(model, CHARS, "")


def test_command_line_mistakes_are_one_line_errors(capsys):
    for argv, message in ((["run=x"], 'say which text to look at: text="..."'),
                          (["text=hi", "colour=red"], "'colour=red' is not an option"),
                          (["text=hi", "run=/nowhere"], "run folder /nowhere does not exist")):
        with pytest.raises(SystemExit) as exit_:
            interpret.main(argv)
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1


# -- end to end: real run folders ----------------------------------------------------------
FAST = ("debug=fast", "logger=csv", "hardware=cpu", "model=nano")


@pytest.mark.slow
def test_the_module_draws_a_pretraining_runs_attention(trained_runs, tmp_path):
    run = shutil.copytree(trained_runs[0][0], tmp_path / "run")  # leave the shared run alone
    proc = subprocess.run([sys.executable, "-m", "gptlab.interpret", f"run={run}",
                           "text=ROMEO: O, she doth teach"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (run / "interpret").iterdir()
    assert folder.name.startswith("romeo-o-she-doth-teach-")
    assert (folder / "attention.png").read_bytes()[:8] == PNG
    assert f"written: {folder / 'attention.png'}" in proc.stdout


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labeled")
    rows = "".join(f"{text}\t{label}\n" for text, label in [
        ("a gorgeous , witty movie .", "positive"), ("a dull , tedious film .", "negative"),
        ("fun and moving .", "positive"), ("a mess .", "negative")] * 10)
    (folder / "train.tsv").write_text("text\tlabel\n" + rows)
    return folder / "train.tsv"


@pytest.mark.slow
def test_a_classify_run_gets_its_attribution_picture_and_table(workspace, labeled, tmp_path,
                                                                capsys):
    out = run_entry("train.py", *workspace.args, *FAST, "task=classify", "data=labeled_files",
                    f"data.source.files.train={labeled}", f"data.source.files.val={labeled}",
                    "data.vocab_size=300")
    interpret.main([f"run={run_folder(out)}", "text=a witty , moving film .",
                    "label=negative", f"out={tmp_path}"])
    printed = capsys.readouterr().out
    assert "class 'negative', probability" in printed and "| `<\\|endoftext\\|>` |" in printed
    for name in ("attention.png", "attribution.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert (tmp_path / "attribution.md").read_text() in printed


@pytest.mark.slow
def test_an_encoder_decoder_run_gets_encoder_decoder_and_cross_attention(workspace, tmp_path,
                                                                          capsys):
    (tmp_path / "src.txt").write_text("a man rides a bike .\ntwo dogs play .\n" * 10)
    (tmp_path / "tgt.txt").write_text("ein mann fährt rad .\nzwei hunde spielen .\n" * 10)
    files = f"[{tmp_path / 'src.txt'},{tmp_path / 'tgt.txt'}]"
    out = run_entry("train.py", *workspace.args, *FAST, "task=seq2seq", "data=parallel_text",
                    f"data.source.files.train={files}", f"data.source.files.val={files}",
                    "data.vocab_size=300", "model.architecture=encoder_decoder",
                    "task.max_new_tokens=5")
    interpret.main([f"run={run_folder(out)}", "text=two dogs play .", f"out={tmp_path / 'a'}"])
    assert "target: " in capsys.readouterr().out  # the model's own translation
    interpret.main([f"run={run_folder(out)}", "text=two dogs play .",
                    "target=zwei hunde spielen .", f"out={tmp_path / 'b'}"])
    assert "target: zwei hunde spielen .\n" in capsys.readouterr().out
    for kind in ("encoder", "decoder", "cross"):
        assert (tmp_path / "b" / f"attention_{kind}.png").read_bytes()[:8] == PNG
