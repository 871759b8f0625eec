"""The Transformer of "Attention Is All You Need" (Vaswani et al. 2017): encoder and decoder.

An encoder reads the source with bidirectional self-attention; a decoder writes the target
with causal self-attention plus cross-attention to the encoder's output. Both halves are
`gpt.Transformer` stacks of the same blocks, norms, positions and MLPs as the GPT (pre-norm,
as GPT-2 and most later models, rather than the paper's post-norm), so every
`model.` option means the same in both architectures. The source and target share one token
table unless `share_embeddings=false`; the output layer is tied to the target table unless
`tie_weights=false`.

With `pointer_generator=true` the output layer can also copy (See et al. 2017, "Get To The
Point"): a copy attention from the decoder's last hidden state over the encoder's output puts
probability on the source tokens themselves, and a gate mixes that with the vocabulary
distribution. Summaries and subject lines reuse the source's rarer words, which a small model
trained briefly cannot spell out of an 8k vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import UserError
from gptlab.models.generation import DecodingState, LogitsProcessor, generate
from gptlab.models.gpt import GPTConfig, Memory, Transformer, init_weights


class EncoderDecoder(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = Transformer(config, config.n_layer, cross_attention=True)
        shared = self.decoder.wte if config.share_embeddings else None
        self.encoder = Transformer(config, config.encoder_layers, causal=False, wte=shared)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.decoder.wte.weight
        self.pointer = PointerGenerator(config) if config.pointer_generator else None
        # Residual writes: attention + MLP per encoder layer, and cross-attention too per
        # decoder layer; each stack is scaled for its own depth.
        init_weights(self.encoder, residual_writes=2 * config.encoder_layers)
        init_weights(self.decoder, residual_writes=3 * config.n_layer)
        init_weights(self.lm_head, residual_writes=1)
        if self.pointer is not None:
            init_weights(self.pointer, residual_writes=1)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops the position tables and pure lookup tables
        (a separate source table; the target table too when the output layer is untied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(s.wpe.weight.numel() for s in (self.encoder, self.decoder)
                     if s.wpe is not None)
            if not self.config.share_embeddings:
                n -= self.encoder.wte.weight.numel()
            if not self.config.tie_weights:
                n -= self.decoder.wte.weight.numel()
        return n

    def memory(self, source_ids: torch.Tensor, source_mask: torch.Tensor | None = None) -> Memory:
        """Encode the sources (B, S) once: every decoder layer's cross-attention keys/values.

        source_mask (B, S): True/1 at real tokens, False/0 at padding (None: no padding).
        """
        encoded = self.encoder.hidden(source_ids, attention_mask=source_mask)
        memory = Memory([block.cross_attn.keys_values(encoded) for block in self.decoder.blocks],
                        None if source_mask is None else source_mask.bool()[:, None, None, :])
        if self.pointer is not None:
            memory.source_ids, memory.copy_keys = source_ids, self.pointer.key(encoded)
        return memory

    def output(self, hidden: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Decoder hidden states (R, T, C) -> next-token logits (R, T, vocab).

        With the pointer-generator these are log-probabilities of the mixture, which are
        logits too (their softmax is the mixture), so losses, sampling and beam search treat
        both alike.
        """
        logits = self.lm_head(hidden)
        return logits if self.pointer is None else self.pointer(hidden, logits, memory)

    def forward(
        self,
        source_ids: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        source_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Sources (B, S) and decoder inputs (B, T) -> logits (B, T, vocab) (or hidden states).

        The decoder inputs are right-padded (causal attention never reads the padding after a
        token); the sources may be padded anywhere that source_mask says.
        """
        memory = self.memory(source_ids, source_mask)
        hidden = self.decoder.hidden(input_ids, memory=memory)
        return hidden if return_hidden else self.output(hidden, memory)

    def start_decoding(
        self, prompts: list[list[int]], sources: list[list[int]] | None = None,
        use_cache: bool = True,
    ) -> DecodingState:
        """The decoding state of `models.generation.generate`; the sources are encoded once."""
        if sources is None or len(sources) != len(prompts) or any(not s for s in sources):
            raise UserError("an encoder-decoder needs one non-empty source per prompt "
                            "(sources=[...], as many as prompts)")
        device = self.decoder.wte.weight.device
        width = max(len(s) for s in sources)
        source_ids = torch.zeros(len(sources), width, dtype=torch.long, device=device)
        real = torch.zeros(len(sources), width, dtype=torch.bool, device=device)
        for i, source in enumerate(sources):
            source_ids[i, : len(source)] = torch.tensor(source, dtype=torch.long, device=device)
            real[i, : len(source)] = True
        padded = min(len(s) for s in sources) != width
        memory = self.memory(source_ids, real if padded else None)
        return DecodingState(self.decoder, self.output, prompts, memory=memory,
                             use_cache=use_cache)

    def generate(
        self,
        sources: list[list[int]],
        max_new_tokens: int,
        *,
        start_token: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        processors: Sequence[LogitsProcessor] = (),
    ) -> list[list[int]]:
        """The target for each source, decoded from start_token; see `generation.generate`."""
        return generate(
            self, [[start_token]] * len(sources), max_new_tokens, sources=sources,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_token=stop_token,
            use_cache=use_cache, generator=generator, beam_size=beam_size,
            length_penalty=length_penalty, processors=processors,
        )


class PointerGenerator(nn.Module):
    """Mixes the vocabulary distribution with copies of source tokens (See et al. 2017).

    P(w) = p_gen * softmax(logits)_w + (1 - p_gen) * sum of a_s over source positions s
    holding w, where a is a one-head attention from the decoder's hidden state over the
    encoder's output (its own projections: the cross-attention layers' weights come out of
    fused kernels) and p_gen = sigmoid(gate(hidden)) is chosen per position. Padded source
    positions get no attention.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.query = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.key = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.gate = nn.Linear(config.n_embd, 1)

    def copy_attention(self, hidden: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Attention (P, g * T, S) of each position over its source's tokens.

        The R = P * g rows of hidden (R, T, C) hold g consecutive rows (beams) per source,
        read as one row of g * T queries, as in the cross-attention.
        """
        R, T, C = hidden.size()
        P = memory.source_ids.size(0)
        q = self.query(hidden).reshape(P, R // P * T, C)
        scores = q @ memory.copy_keys.transpose(1, 2) / math.sqrt(C)
        if memory.mask is not None:
            scores = scores.masked_fill(~memory.mask[:, 0], float("-inf"))
        return F.softmax(scores.float(), dim=-1)

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Log-probabilities (R, T, vocab) of the mixture, in fp32."""
        attention = self.copy_attention(hidden, memory)
        copied = attention.new_zeros(*attention.shape[:2], logits.size(-1))
        copied.scatter_add_(2, memory.source_ids[:, None, :].expand_as(attention), attention)
        p_gen = torch.sigmoid(self.gate(hidden).float())
        mixture = (p_gen * F.softmax(logits.float(), dim=-1)
                   + (1 - p_gen) * copied.view(logits.shape))
        # Clamped only where fp32 underflows to 0, so the log stays finite.
        return mixture.clamp_min(torch.finfo(torch.float32).tiny).log()
