"""Train entry point: `python train.py [overrides]` (see conf/train.yaml)."""

from gptlab.entry import hydra_entry
from gptlab.pipeline import train

main = hydra_entry(__file__, "train", train)

if __name__ == "__main__":
    main()
