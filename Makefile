# gptlab: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where a local CPU build of torch lies on disk (as on the project's CI machines), install it
# instead of letting pip fetch the multi-GB CUDA build; elsewhere pip picks the platform's torch.
LOCAL_TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl))
# Offline copies of the data sets, where this checkout has them beside it (as on CI).
ifneq ($(wildcard ../shared/data/tinyshakespeare),)
export GPTLAB_DATA_MIRROR ?= $(abspath ../shared/data)
endif

.PHONY: help install train finetune-sst2 finetune-sst2-gpt2 translate-multi30k \
	summarize-aeslc agent-taskmaster4 rerank-taskmaster4 interpret-examples nanogpt-cpu \
	nanogpt-gpu gpt1-ablation gpt1-layers scaling seq2seq-architectures test test-slow lint bench \
	bench-prepare clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

# Reinstalls when the dependencies change.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(LOCAL_TORCH_WHEEL),$(BIN)/pip install --quiet $(LOCAL_TORCH_WHEEL))
	$(BIN)/pip install --quiet -e '.[dev,hf]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install gptlab with its dependencies

# SEEDS=1,2,3 makes a recipe's (last) training step a multirun over those seeds: every run is
# trained and evaluated as alone, then gptlab.reporting.compare prints each figure's mean and
# spread over the seeds (comparison_by_setting.md in the sweep folder). Recipes that already
# sweep seeds (gpt1-ablation, gpt1-layers, seq2seq-architectures) take SEEDS instead of theirs.
SEED_SWEEP = $(if $(SEEDS),hydra.mode=MULTIRUN seed=$(SEEDS))
# $(call compare_sweep,compare options): when train.py printed several run folders ($$runs),
# the sweep's comparison again, now with the test figures that evaluate.py added.
compare_sweep = set -- $$runs; if [ -n "$$2" ]; then \
	$(BIN)/python -m gptlab.reporting.compare "$$(dirname "$$1")" $(1); fi

# $(call train_and_evaluate,experiment[,compare options]): train (one run, or a sweep), then
# evaluate.py on every run folder that train.py printed, then compare a sweep's runs.
# ARGS go to train.py, EVAL_ARGS to evaluate.py.
define train_and_evaluate
@set -eo pipefail; runs=$$($(BIN)/python train.py experiment=$(1) $(SEED_SWEEP) $(ARGS) \
    | tee /dev/stderr | sed -n 's/^run folder: //p'); \
for run in $$runs; do $(BIN)/python evaluate.py run=$$run $(EVAL_ARGS); done; \
$(call compare_sweep,$(2))
endef

train: install  ## prepare Tiny Shakespeare and train the default model (SEEDS=1,2,3: a sweep)
	$(BIN)/python train.py $(SEED_SWEEP) $(ARGS)

# A recipe's second step starts from the run folder that its first step prints last.
finetune-sst2: install  ## SST-2 recipe: pretrain on unlabeled text, fine-tune, print dev accuracy
	@set -eo pipefail; pretrained=$$($(BIN)/python train.py experiment=sst2_pretrain $(ARGS) \
	    | tee /dev/stderr | sed -n 's/^run folder: //p'); \
	$(BIN)/python train.py experiment=sst2_finetune task.init_from=$$pretrained $(SEED_SWEEP) \
	    $(ARGS)

finetune-sst2-gpt2: install  ## SST-2 fine-tuning from GPT-2 small's weights (hf:gpt2; a GPU)
	$(BIN)/python train.py experiment=sst2_finetune_gpt2 $(SEED_SWEEP) $(ARGS)

translate-multi30k: install  ## Multi30k en->de recipe: train, then BLEU/chrF on test2016 (4 beams)
	$(call train_and_evaluate,translate_multi30k_en_de)

# ARCH=decoder_only runs the AESLC recipe with a GPT instead of the encoder-decoder.
ARCH ?= encoder_decoder
SUMMARIZE_EXPERIMENT = $(if $(filter encoder_decoder,$(ARCH)),summarize_aeslc,$(if \
	$(filter decoder_only,$(ARCH)),summarize_aeslc_decoder_only,$(error ARCH=$(ARCH): use \
	encoder_decoder or decoder_only)))
summarize-aeslc: install  ## AESLC email -> subject recipe: train, then ROUGE on test (ARCH=...)
	$(call train_and_evaluate,$(SUMMARIZE_EXPERIMENT))

agent-taskmaster4: install  ## Taskmaster-4 agent: train, then generate and score every test turn
	$(call train_and_evaluate,agent_taskmaster4)

# AGENT=<run folder of make agent-taskmaster4>: the reward model starts from it.
rerank-taskmaster4: install  ## reward model from AGENT=<run>, then best-of-4 vs greedy on test
	@test -n "$(AGENT)" || { echo "error: pass AGENT=<agent run folder> (make \
	agent-taskmaster4 prints it)" >&2; exit 2; }
	@set -eo pipefail; runs=$$($(BIN)/python train.py experiment=reward_taskmaster4 \
	    task.init_from=$(AGENT) $(SEED_SWEEP) $(ARGS) | tee /dev/stderr \
	    | sed -n 's/^run folder: //p'); \
	for run in $$runs; do $(BIN)/python evaluate.py run=$$run $(EVAL_ARGS); \
	    $(BIN)/python evaluate.py run=$(AGENT) num_candidates=4 rerank=$$run $(EVAL_ARGS); done; \
	$(call compare_sweep)

# docs/interpret.md's pictures, redrawn from the recipes' run folders.
interpret-examples: install  ## docs/interpret.md's pictures from SST2_RUN=<run> and MT_RUN=<run>
	@test -n "$(SST2_RUN)" -a -n "$(MT_RUN)" || { echo "error: give SST2_RUN=<make finetune-sst2 \
	run folder> MT_RUN=<make translate-multi30k run folder>" >&2; exit 2; }
	$(BIN)/python -m gptlab.interpret run=$(SST2_RUN) text="a sometimes tedious film ." \
	    out=docs/interpret/sst2
	$(BIN)/python -m gptlab.interpret run=$(MT_RUN) text="People are fixing the roof of a house." \
	    target="Leute Reparieren das Dach eines Hauses." out=docs/interpret/multi30k

# Reproductions: each an experiment= config; results and commands in docs/experiments.md.
nanogpt-cpu: install  ## nanoGPT's Shakespeare-char CPU recipe (nanoGPT: val loss 1.88; ~3 min)
	$(BIN)/python train.py experiment=nanogpt_shakespeare_char_cpu $(SEED_SWEEP) $(ARGS)

nanogpt-gpu: install  ## nanoGPT's Shakespeare-char GPU recipe (nanoGPT: 1.4697; needs a GPU)
	$(BIN)/python train.py experiment=nanogpt_shakespeare_char $(SEED_SWEEP) $(ARGS)

gpt1-ablation: install  ## GPT-1 Table 5 on SST-2: pretrain once, 3 variants x 3 seeds
	$(BIN)/python train.py experiment=gpt1_ablation $(SEED_SWEEP) $(ARGS)

gpt1-layers: install  ## GPT-1 figure 2: SST-2 accuracy against pretrained layers transferred
	$(BIN)/python train.py experiment=gpt1_layers $(SEED_SWEEP) $(ARGS)

scaling: install  ## loss against model size and against tokens, with power-law fits
	$(BIN)/python train.py experiment=scaling $(SEED_SWEEP) $(ARGS)
	$(BIN)/python train.py experiment=scaling_tokens $(SEED_SWEEP) $(ARGS)

# The sweep, then every run scored on test2016 and the sweep's comparison redrawn with those.
seq2seq-architectures: install  ## decoder-only vs encoder-decoder on Multi30k, 2 seeds each
	$(call train_and_evaluate,seq2seq_architectures,--curves val/chrf val/loss)

# pytest-xdist workers, each with one thread (tests/conftest.py). CI runs both targets.
TEST_WORKERS ?= 2
test: install  ## the test suite without the slow end-to-end recipes (~9 min on 2 cores)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow" $(ARGS)

test-slow: install  ## the slow tests: experiments, DDP and bf16 on every task, agent, ...
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m slow $(ARGS)

lint: install  ## ruff
	$(BIN)/ruff check .

bench: install  ## speed on this machine: matmul peak, tokens/s and MFU, Lightning, KV cache, beam, data
	$(BIN)/python bench/speed.py $(ARGS)

bench-prepare: install  ## ~1 GB corpus: preparation MB/s, peak memory (1, 2 processes), tokens/s
	$(BIN)/python bench/prepare_speed.py $(ARGS)

clean:  ## remove caches and build files (keeps logs/ and data/)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
