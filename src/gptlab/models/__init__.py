"""Model definitions."""

from gptlab.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
