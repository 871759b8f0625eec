#!/usr/bin/env bash
# gptlab on one GPU in about five minutes: every hardware option trains, and how fast it is.
#   bench/gpu_check.sh [--skip-recipe] [--nanogpt path/to/nanoGPT]
# Needs torch and lightning (as GPU images ship them). What else gptlab needs comes from
# wheels in .whl/ when that folder exists (machines without a network; see README, "GPU check"),
# else from the environment. Data sets: $GPTLAB_DATA_MIRROR, else .data/ beside this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gptlab-site .whl/*.whl
    export PYTHONPATH="/tmp/gptlab-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
export GPTLAB_DATA_MIRROR="${GPTLAB_DATA_MIRROR:-$PWD/.data}"
exec python3 bench/gpu_check.py "$@"
