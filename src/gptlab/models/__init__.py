"""Model definitions: the decoder-only GPT and the encoder-decoder, built from one set of blocks."""

from torch import nn

from gptlab.models.encoder_decoder import EncoderDecoder
from gptlab.models.gpt import GPT, GPTConfig


def build_model(config: GPTConfig) -> nn.Module:
    """The model a config describes (`architecture`): a decoder-only GPT or an encoder-decoder."""
    return EncoderDecoder(config) if config.architecture == "encoder_decoder" else GPT(config)


__all__ = ["GPT", "EncoderDecoder", "GPTConfig", "build_model"]
