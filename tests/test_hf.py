"""Hugging Face interop: gptlab <-> transformers GPT-2 and Llama, exactly, or a clear refusal.

Every transformers model here is built locally with random weights (no hub). The weights are
large (std 1), so logits are far apart and greedy decoding follows the content rather than
ties: a wrong transpose, split or eps shows up in the tokens as well as in the logits.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config

from gptlab import safetensors_checkpoints
from gptlab.checkpoints import CHECKPOINT_KEY, find_checkpoint, load_checkpoint
from gptlab.data.tokenizers import train_tokenizer
from gptlab.errors import UserError
from gptlab.hf import HFModel, export, family_of, gptlab_config, hf_tokenizer, main
from gptlab.models.gpt import GPT, GPTConfig
from gptlab.tasks.classification import ClassificationTask
from tests.conftest import REPO, run_entry, run_folder
from tests.test_configs import compose_train

ATOL = 1e-4  # the bar for logits in fp32
PROMPT = [5, 9, 100, 3, 7]
FAST = ("debug=fast", "logger=csv", "hardware=cpu")
GPT2_SHAPE = dict(n_positions=64, n_embd=24, n_layer=2, n_head=3)
LLAMA_SHAPE = dict(max_position_embeddings=64, hidden_size=24, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=3)


def run_hf(*args: str, expect_rc: int = 0, env: dict | None = None) -> str:
    """`python -m gptlab.hf ...` in a fresh process; its stdout + stderr."""
    proc = subprocess.run([sys.executable, "-m", "gptlab.hf", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=600, env={**os.environ, **(env or {})})
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, f"exit {proc.returncode}:\n{output[-4000:]}"
    return output


def hf_fails(capsys, *args: str) -> str:
    """The one error line of a `python -m gptlab.hf` command that must fail (run in-process)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    return errors[0]


@pytest.fixture(scope="module")
def tokenizer(shakespeare):
    return train_tokenizer("bpe", [shakespeare[:50_000]], vocab_size=300)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model.eval()


def hf_model(tokenizer, model_type: str, **config):
    config = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.eos_id,
              "eos_token_id": tokenizer.eos_id, **config}
    return randomized(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)))


def save_hf(model, tokenizer, folder: Path) -> Path:
    """A model folder as save_pretrained writes it, with a tokenizer.json tokenizer."""
    model.save_pretrained(folder)
    hf_tokenizer(tokenizer, 64).save_pretrained(folder)
    return folder


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt):].tolist()


def gptlab_greedy(model: GPT, tokenizer, n: int) -> list[int]:
    return model.generate([PROMPT], n, temperature=0, stop_token=tokenizer.eos_id)[0]


def tokens(tokenizer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(tokenizer.vocab_size, (2, 64), generator=generator)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# (model type, transformers config, what gptlab must make of it)
HF_VARIANTS = {
    "gpt2": ("gpt2", GPT2_SHAPE, dict(mlp="gelu_tanh", bias=True, tie_weights=True,
                                      norm_eps=None, mlp_hidden=None)),
    "gpt2-exact_gelu-untied-eps-width": (
        "gpt2", GPT2_SHAPE | dict(activation_function="gelu", tie_word_embeddings=False,
                                  layer_norm_epsilon=1e-3, n_inner=40),
        dict(mlp="gelu", tie_weights=False, norm_eps=1e-3, mlp_hidden=40)),
    "llama": ("llama", LLAMA_SHAPE, dict(bias=False, tie_weights=False, norm_eps=None,
                                         rope_base=10000.0, mlp_hidden=None)),
    "llama-bias-tied-eps-theta": (
        "llama", LLAMA_SHAPE | dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                    rms_norm_eps=1e-5, rope_theta=500.0, intermediate_size=40),
        dict(bias=True, tie_weights=True, norm_eps=1e-5, rope_base=500.0, mlp_hidden=40)),
}


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hf_to_gptlab_to_hf_keeps_logits_and_greedy_tokens(variant, tokenizer, tmp_path):
    model_type, hf_config, expected = HF_VARIANTS[variant]
    original = hf_model(tokenizer, model_type, **hf_config)
    imported = HFModel(str(save_hf(original, tokenizer, tmp_path / "hf")))
    assert {k: getattr(imported.config, k) for k in expected} == expected
    gpt, idx = imported.model(), tokens(tokenizer)
    assert_same(gpt(idx), hf_logits(original, idx))
    assert gptlab_greedy(gpt, tokenizer, 20) == hf_greedy(original, PROMPT, 20)

    back = AutoModelForCausalLM.from_pretrained(export(imported, tmp_path / "back")).eval()
    assert type(back) is type(original)
    assert_same(hf_logits(back, idx), hf_logits(original, idx))


GPTLAB_VARIANTS = {
    "learned-layernorm-gelu-nobias-untied": dict(pos_emb="learned", norm="layernorm", mlp="gelu",
                                                 tie_weights=False),
    "learned-layernorm-gelu_tanh-bias-eps": dict(pos_emb="learned", norm="layernorm",
                                                 mlp="gelu_tanh", bias=True, norm_eps=1e-3),
    "rope-rmsnorm-swiglu": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu"),
    "rope-rmsnorm-swiglu-bias-untied-width-eps-base": dict(
        pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=True, tie_weights=False,
        mlp_hidden=40, norm_eps=1e-5, rope_base=500.0),
}


def gptlab_checkpoint(tmp_path: Path, tokenizer, **architecture) -> Path:
    """A random gptlab model saved as a (safetensors) checkpoint, as a pretraining run has it."""
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=3,
                       n_embd=24, **architecture)
    model = randomized(GPT(config))
    path = tmp_path / "model.safetensors"
    safetensors_checkpoints.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
         CHECKPOINT_KEY: {"task": "pretrain", "model_config": asdict(config),
                          "tokenizer": tokenizer.to_str(), "data_config": None}}, path)
    return path


@pytest.mark.parametrize("variant", GPTLAB_VARIANTS)
def test_gptlab_to_hf_to_gptlab_keeps_logits_and_greedy_tokens(variant, tokenizer, tmp_path):
    checkpoint = load_checkpoint(gptlab_checkpoint(tmp_path, tokenizer,
                                                   **GPTLAB_VARIANTS[variant]))
    original, idx = checkpoint.model(), tokens(tokenizer)
    folder = export(checkpoint, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = "GPT2LMHeadModel" if original.config.pos_emb == "learned" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    assert_same(hf_logits(hf, idx), original(idx))
    assert hf_greedy(hf, PROMPT, 20) == gptlab_greedy(original, tokenizer, 20)

    back = HFModel(str(folder)).model()
    assert_same(back(idx), original(idx))
    assert gptlab_greedy(back, tokenizer, 20) == gptlab_greedy(original, tokenizer, 20)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_exported_tokenizer_encodes_and_decodes_like_gptlab(kind, tokenizer, tmp_path,
                                                          shakespeare):
    text = shakespeare[60_000:62_000]
    if kind == "bpe":
        text += "<|endoftext|>é 🙂"
    else:
        tokenizer = train_tokenizer("char", [shakespeare])
    folder = export(load_checkpoint(gptlab_checkpoint(tmp_path, tokenizer)), tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(folder)
    assert theirs(text)["input_ids"] == tokenizer.encode(text)
    assert theirs.decode(tokenizer.encode(text)) == text
    assert theirs.eos_token == ("<|endoftext|>" if kind == "bpe" else None)
    assert theirs.model_max_length == 64
    assert HFModel(str(folder)).tokenizer.encode(text) == tokenizer.encode(text)


def test_export_writes_a_new_folder_only(tokenizer, tmp_path):
    checkpoint = load_checkpoint(gptlab_checkpoint(tmp_path, tokenizer))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export(checkpoint, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    export(checkpoint, tmp_path / "new" / "hf")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["hf"]  # no temp left


@pytest.mark.parametrize(("architecture", "named"), [
    (dict(pos_emb="learned", norm="rmsnorm", mlp="gelu"), "norm=rmsnorm"),
    (dict(pos_emb="learned", norm="layernorm", mlp="swiglu"), "mlp=swiglu"),
    (dict(pos_emb="rope", norm="layernorm", mlp="swiglu"), "norm=layernorm"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="gelu_tanh"), "mlp=gelu_tanh"),
])
def test_export_refuses_models_without_an_exact_twin(architecture, named):
    with pytest.raises(UserError, match=f"cannot export model {named}"):
        family_of(GPTConfig(**architecture))


def test_export_refuses_config_fields_it_does_not_know():
    extended = dataclasses.make_dataclass(
        "Extended", [("architecture", str, "decoder_only")], bases=(GPTConfig,))
    family_of(extended(pos_emb="rope", norm="rmsnorm", mlp="swiglu"))
    with pytest.raises(UserError, match="architecture=encoder_decoder.*no.*equivalent"):
        family_of(extended(pos_emb="rope", norm="rmsnorm", mlp="swiglu",
                           architecture="encoder_decoder"))


def test_export_command_refuses_with_one_line(tokenizer, tmp_path, capsys):
    path = gptlab_checkpoint(tmp_path, tokenizer, pos_emb="rope", norm="layernorm", mlp="gelu")
    line = hf_fails(capsys, "export", f"ckpt={path}", f"out={tmp_path / 'hf'}")
    assert "norm=layernorm" in line and "LlamaForCausalLM" in line
    assert not (tmp_path / "hf").exists()
    assert "out=<folder>" in hf_fails(capsys, "export", f"ckpt={path}")
    assert "usage" in hf_fails(capsys, "export", "checkpoint=x")
    assert "say what to do" in hf_fails(capsys)


@pytest.mark.parametrize(("model_type", "config", "named"), [
    ("gpt2", dict(activation_function="relu"), "has activation_function='relu'"),
    ("gpt2", dict(scale_attn_weights=False), "has scale_attn_weights=False"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True),
     "has scale_attn_by_inverse_layer_idx=True"),
    ("gpt2", dict(add_cross_attention=True), "has add_cross_attention=True"),
    ("llama", dict(hidden_act="gelu"), "has hidden_act='gelu'"),
    ("llama", dict(num_key_value_heads=1), "has num_key_value_heads=1"),
    ("llama", dict(head_dim=16), "has head_dim=16"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "has rope_parameters="),
    ("llama", dict(attention_bias=True, mlp_bias=False), "has mlp_bias=False"),
    ("opt", {}, "is a model of type opt; gptlab imports gpt2 and llama models"),
])
def test_import_refuses_what_gptlab_cannot_reproduce(model_type, config, named):
    shape = {"gpt2": GPT2_SHAPE, "llama": LLAMA_SHAPE}.get(model_type, {})
    with pytest.raises(UserError, match=re.escape(f"hf:some/model {named}")):
        gptlab_config(AutoConfig.for_model(model_type, **shape, **config), "some/model")


def test_import_needs_a_tokenizer_as_large_as_the_model(tokenizer, tmp_path):
    padded = hf_model(tokenizer, "gpt2", **GPT2_SHAPE | dict(vocab_size=tokenizer.vocab_size + 4))
    folder = save_hf(padded, tokenizer, tmp_path / "hf")
    with pytest.raises(UserError, match=f"{tokenizer.vocab_size + 4} token embeddings.*"
                                        f"{tokenizer.vocab_size} tokens"):
        HFModel(str(folder))


def test_import_of_a_missing_folder_or_a_folder_that_is_no_model(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        HFModel(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="cannot load this model folder"):
        HFModel(str(tmp_path))


def test_gpt2_hf_preset_is_transformers_gpt2():
    preset = instantiate(compose_train("model=gpt2_hf").model, vocab_size=50257)
    assert preset == gptlab_config(GPT2Config(), "gpt2")
    assert preset.mlp_width == 3072 and preset.norm_epsilon == 1e-5


@pytest.fixture(scope="module")
def gpt2_folder(tokenizer, tmp_path_factory) -> Path:
    original = hf_model(tokenizer, "gpt2", **GPT2_SHAPE)
    return save_hf(original, tokenizer, tmp_path_factory.mktemp("gpt2") / "hf")


def test_init_from_hf_loads_the_weights_into_a_task(gpt2_folder, tokenizer):
    config = asdict(HFModel(str(gpt2_folder)).config)
    task = ClassificationTask(config, {"lr": 1e-3}, {}, labels=["a", "b"], tokenizer=tokenizer,
                              init_from=f"hf:{gpt2_folder}")
    idx = tokens(tokenizer)
    original = AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    assert_same(task.model.eval()(idx), hf_logits(original, idx))
    with pytest.raises(UserError, match="another shape"):
        ClassificationTask(config | {"n_embd": 48}, {"lr": 1e-3}, {}, labels=["a", "b"],
                           tokenizer=tokenizer, init_from=f"hf:{gpt2_folder}")


GPT2_SHRUNK = ("model.n_layer=2", "model.n_head=3", "model.n_embd=24", "model.block_size=64")


@pytest.mark.slow
def test_sst2_from_hf_gpt2_then_export_the_run(workspace, gpt2_folder, tmp_path):
    """HF folder -> the SST-2 GPT-2 recipe (shrunk, local weights) -> export -> transformers."""
    out = run_entry("train.py", "experiment=sst2_finetune_gpt2", *workspace.args, *FAST,
                    *GPT2_SHRUNK, f"task.init_from=hf:{gpt2_folder}")
    run = run_folder(out)
    assert "/classify/runs/" in str(run) and "val_full/acc" in out
    imported = HFModel(str(gpt2_folder))
    assert (run / "tokenizer.json").read_text() == imported.tokenizer.to_str()

    printed = run_hf("export", f"run={run}", f"out={tmp_path / 'exported'}")
    assert "AutoModelForCausalLM.from_pretrained" in printed
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    trained = load_checkpoint(*find_checkpoint(run=str(run))).model()
    idx = tokens(imported.tokenizer)
    assert_same(hf_logits(exported, idx), trained(idx))
    assert not torch.allclose(trained(idx), imported.model()(idx))  # it did train


@pytest.mark.slow
def test_pretrain_from_hf_llama(workspace, tokenizer, tmp_path):
    """A Llama-family folder continues pretraining as model=nano (its shape), with its eps."""
    nano = dict(max_position_embeddings=64, hidden_size=48, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=3, tie_word_embeddings=True,
                rms_norm_eps=1e-5)
    folder = save_hf(hf_model(tokenizer, "llama", **nano), tokenizer, tmp_path / "llama")
    out = run_entry("train.py", *workspace.args, *FAST, "model=nano", "model.norm_eps=1e-5",
                    f"task.init_from=hf:{folder}")
    run = run_folder(out)
    assert (run / "tokenizer.json").read_text() == HFModel(str(folder)).tokenizer.to_str()
    assert "/pretrain/runs/" in str(run) and "val_full/loss" in out


def test_a_hub_id_without_network_is_one_error_line(workspace, tmp_path):
    out = run_entry("train.py", *workspace.args, *FAST, "model=nano", "task=classify",
                    "data=sst2", "task.init_from=hf:gptlab-tests/no-such-model", expect_rc=2,
                    env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "hf:gptlab-tests/no-such-model" in errors[0] and "network" in errors[0]


HIDE_HF = """
import importlib.metadata as metadata, sys
HIDDEN = ("transformers", "safetensors")
class Hide:  # as if neither package were installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
def distribution(name, _real=metadata.distribution):
    if name.lower() in HIDDEN:
        raise metadata.PackageNotFoundError(name)
    return _real(name)
metadata.distribution = distribution
"""


def test_without_the_hf_extra_gptlab_runs_and_says_how_to_install_it(tokenizer, tmp_path):
    checkpoint = gptlab_checkpoint(tmp_path, tokenizer)
    script = HIDE_HF + f"""
import gptlab.pipeline, gptlab.tasks
from gptlab.checkpoints import load_checkpoint
from gptlab.errors import UserError
try:
    load_checkpoint(__import__("pathlib").Path({str(checkpoint)!r}))
except UserError as err:
    print("load:", err)
from gptlab.hf import main
main(["export", "ckpt={checkpoint}", "out={tmp_path / 'hf'}"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "load: safetensors checkpoints need the safetensors package; install it with " \
           "pip install -e '.[hf]'" in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "error: Hugging Face interop needs the transformers package; install it with "
        "pip install -e '.[hf]'"]
