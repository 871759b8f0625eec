"""Evaluate entry point: `python evaluate.py [overrides]` (see conf/evaluate.yaml)."""

from gptlab.entry import hydra_entry
from gptlab.pipeline import evaluate

main = hydra_entry(__file__, "evaluate", evaluate)

if __name__ == "__main__":
    main()
