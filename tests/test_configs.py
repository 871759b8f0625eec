"""Every option of every config group composes, and configs build what they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gptlab.models import build_model
from gptlab.models.gpt import GPTConfig
from gptlab.utils.config import register_resolvers

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["task", "model", "data", "trainer", "hardware", "logger", "callbacks", "debug",
          "experiment", "seq2seq_architecture"]
REQUIRED = {"data=text_files": ["data.source.paths=[a.txt]"],
            "data=hf_dataset": ["data.source.path=json"],
            "data=labeled_files": ["data.source.files.train=a.tsv", "data.source.files.val=b.tsv"],
            "data=parallel_text": ["data.source.files.train=[a.en,a.de]",
                                   "data.source.files.val=[b.en,b.de]"]}


def options(group: str) -> list[str]:
    """A group's selectable options; files starting with '_' are shared bases, not options."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_train(*overrides: str):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


ALL = [f"{group}={option}" for group in GROUPS for option in options(group)]


@pytest.mark.parametrize("override", ALL)
def test_every_option_composes_and_resolves(override):
    cfg = compose_train(override, *REQUIRED.get(override, []))
    tree = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "data",
            "trainer", "task", "logger", "callbacks", "paths")}
    assert tree["trainer"]["max_steps"] > 0
    assert tree["data"]["block_size"] == tree["model"]["block_size"]


@pytest.mark.parametrize("size", options("model"))
def test_model_sizes_build_a_config(size):
    config = instantiate(compose_train(f"model={size}").model, vocab_size=50304)
    assert isinstance(config, GPTConfig) and config.n_embd % config.n_head == 0


def test_model_sizes_have_the_documented_shapes():
    shapes = {s: (c.n_layer, c.n_head, c.n_embd, c.block_size) for s, c in (
        (s, compose_train(f"model={s}").model) for s in options("model"))}
    assert shapes["nano"] == (3, 3, 48, 64) and shapes["micro"][:3] == (4, 4, 128)
    assert shapes["mini"][:3] == (6, 6, 192) and shapes["small"] == (6, 6, 384, 256)
    assert shapes["gpt1"] == (12, 12, 768, 512) and shapes["gpt2"] == (12, 12, 768, 1024)
    assert shapes["gpt2_medium"][:3] == (24, 16, 1024)


def test_the_two_architectures_of_the_comparison_have_equal_parameter_counts():
    counts = {}
    for row in options("seq2seq_architecture"):
        cfg = compose_train("experiment=translate_multi30k_en_de", f"seq2seq_architecture={row}")
        with torch.device("meta"):
            model = build_model(instantiate(cfg.model, vocab_size=8000))
        counts[cfg.model.architecture] = model.num_params(non_embedding=False)
    assert set(counts) == {"decoder_only", "encoder_decoder"}
    assert counts["encoder_decoder"] == pytest.approx(counts["decoder_only"], rel=0.005)


def test_every_data_class_a_config_names_may_be_rebuilt_from_a_checkpoint():
    """evaluate.py rebuilds a run's data from its checkpoint, which may name only these."""
    from gptlab.checkpoints import ALLOWED_TARGETS

    named = {line.split(":", 1)[1].split("#")[0].strip()
             for path in (CONF / "data").glob("*.yaml")
             for line in path.read_text().splitlines() if "_target_:" in line}
    assert named and named <= ALLOWED_TARGETS


def test_the_sst2_recipe_settings_and_gpt1s_extract_token():
    recipe = compose_train("experiment=sst2_finetune").task
    assert (recipe.pooling, recipe.aux_lm_weight) == ("max", 0.0)
    for experiment in ("gpt1_ablation", "gpt1_layers"):  # as GPT-1 does
        assert compose_train(f"experiment={experiment}").task.pooling == "last"
