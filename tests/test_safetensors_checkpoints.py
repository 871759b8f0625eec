"""gptlab checkpoints as .safetensors: the .ckpt's weights and artifacts, read without pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from gptlab import safetensors_checkpoints
from gptlab.checkpoints import find_checkpoint, load_checkpoint
from gptlab.errors import UserError
from tests.conftest import run_entry, run_folder
from tests.test_hf import hf_fails, run_hf
from tests.test_user_errors import fails

FAST = ("model=nano", "debug=fast", "logger=csv", "hardware=cpu")


@pytest.fixture(scope="module")
def run(workspace) -> Path:
    """A short pretraining run whose checkpoint callback also writes .safetensors twins."""
    out = run_entry("train.py", *workspace.args, *FAST, "trainer.max_steps=9",
                    "callbacks.model_checkpoint.safetensors=true")
    return run_folder(out)


def checkpoint_files(run: Path, suffix: str) -> list[str]:
    return sorted(p.stem for p in (run / "checkpoints").glob(f"*{suffix}"))


def test_every_checkpoint_has_a_safetensors_twin_and_stale_ones_go(run):
    names = checkpoint_files(run, ".ckpt")
    assert checkpoint_files(run, ".safetensors") == names
    # Validated at steps 3, 6 and 9: the first best was replaced, its twin removed with it.
    assert len(names) == 2 and names[0].startswith("best-") and names[0] != "best-step000003"


def test_safetensors_checkpoint_carries_what_the_ckpt_carries(run):
    best, _ = find_checkpoint(run=str(run))
    ckpt, safe = load_checkpoint(best), load_checkpoint(best.with_suffix(".safetensors"))
    resume_state = safetensors_checkpoints.RESUME_STATE  # the .ckpt alone resumes
    assert safe.artifacts == {k: v for k, v in ckpt.artifacts.items() if k not in resume_state}
    assert safe.contents["hyper_parameters"] == ckpt.contents["hyper_parameters"]
    assert safe.contents["state_dict"].keys() == ckpt.contents["state_dict"].keys()
    for name, tensor in ckpt.contents["state_dict"].items():
        torch.testing.assert_close(safe.contents["state_dict"][name], tensor, rtol=0, atol=0)
    st = safetensors_checkpoints._safetensors()
    with st.safe_open(str(best.with_suffix(".safetensors")), framework="pt") as f:
        stored = set(f.keys())
    assert "model.wte.weight" in stored and "model.lm_head.weight" not in stored  # tied: once


def test_loading_runs_no_pickle(run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a safetensors checkpoint must load without pickle")

    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    checkpoint = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert checkpoint.model()(torch.tensor([[1, 2, 3]])).shape == (1, 3, 65)


@pytest.mark.slow
def test_evaluate_and_generate_accept_a_safetensors_checkpoint(run):
    best, _ = find_checkpoint(run=str(run))
    reports = []
    for path in (best, best.with_suffix(".safetensors")):
        run_entry("evaluate.py", f"ckpt={path}", "trainer.limit_val_batches=2")
        reports.append(json.loads((run / f"evaluation-{best.stem}-val.json").read_text()))
    assert reports[1].pop("checkpoint") == str(best.with_suffix(".safetensors"))
    assert reports[0].pop("checkpoint") == str(best)
    assert reports[0] == reports[1] and "val_full/loss" in reports[0]

    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    prompt = last.tokenizer.encode("ROMEO:")
    greedy = last.tokenizer.decode(last.model().generate([prompt], 40, temperature=0)[0])
    out = run_entry("generate.py", f"ckpt={run / 'checkpoints' / 'last.safetensors'}",
                    "num_samples=1", "max_new_tokens=40", "text=ROMEO:", "temperature=0")
    assert "ROMEO:" + greedy in out


def test_init_from_a_safetensors_checkpoint(run, workspace):
    out = run_entry("train.py", *workspace.args, *FAST,
                    f"task.init_from={run / 'checkpoints' / 'last.safetensors'}")
    assert (run_folder(out) / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()


def test_safetensors_command_converts_a_ckpt(run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    printed = run_hf("safetensors", f"run={run}", f"out={out}")
    assert str(out) in printed
    best, _ = find_checkpoint(run=str(run))
    converted, twin = load_checkpoint(out), load_checkpoint(best.with_suffix(".safetensors"))
    assert converted.artifacts == twin.artifacts
    for name, tensor in twin.contents["state_dict"].items():
        assert torch.equal(converted.contents["state_dict"][name], tensor)
    line = hf_fails(capsys, "safetensors", f"ckpt={out}")
    assert "already a safetensors checkpoint" in line


def test_a_corrupt_or_foreign_safetensors_file_is_a_user_error(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError, match="corrupt or not a safetensors file"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "model.safetensors"
    foreign.write_bytes(safetensors_checkpoints._safetensors().torch.save(
        {"w": torch.zeros(2)}, {"format": "pt"}))
    with pytest.raises(UserError, match="no gptlab metadata.*init_from=hf:"):
        load_checkpoint(foreign)
    line = fails("evaluate.py", f"ckpt={corrupt}")
    assert str(corrupt) in line
