"""Generate entry point: `python generate.py [overrides]` (see conf/generate.yaml)."""

from gptlab.entry import hydra_entry
from gptlab.pipeline import generate

main = hydra_entry(__file__, "generate", generate, literal_keys=("text", "prompt"))

if __name__ == "__main__":
    main()
