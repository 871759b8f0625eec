"""A GPT-style decoder-only language model, after Karpathy's nanoGPT, and the blocks it is made of.

The building blocks (norms, rotary embedding, self- and cross-attention, MLP, block, KV cache,
and `Transformer`: embeddings + blocks + final norm) are configured by `GPTConfig`, so the
encoder-decoder (models/encoder_decoder.py) is built from the same modules rather than copies.
The no-cache, no-mask training path is kept as lean as nanoGPT's because it is what every
training step runs. Generation (greedy, sampling, beam search) lives in models/generation.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import UserError
from gptlab.models.generation import DecodingState, LogitsProcessor, generate

ARCHITECTURES = ("decoder_only", "encoder_decoder")
POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu")
# The usual eps of each norm (PyTorch's LayerNorm, Llama's RMSNorm), used when norm_eps is None.
NORM_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}


@dataclass
class GPTConfig:
    """Model hyperparameters; plain fields only, so `dataclasses.asdict` round-trips it."""

    vocab_size: int = 65
    block_size: int = 256  # context length: the most tokens the model ever attends over
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # bias in Linear and LayerNorm layers (RMSNorm never has one)
    pos_emb: str = "learned"  # "learned" | "rope"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float | None = None  # None: the norm's usual eps (NORM_EPS)
    mlp: str = "gelu"  # "gelu" (exact, erf) | "gelu_tanh" (GPT-2's approximation) | "swiglu"
    # None picks a width that gives both MLP kinds about the same parameter count; see mlp_width.
    mlp_hidden: int | None = None
    rope_base: float = 10000.0
    tie_weights: bool = True
    # "encoder_decoder": the Transformer of Vaswani et al. (2017), see models/encoder_decoder.py.
    architecture: str = "decoder_only"
    n_encoder_layer: int | None = None  # encoder depth; None: n_layer (encoder_decoder only)
    share_embeddings: bool = True  # one token table for source and target (encoder_decoder only)
    # encoder_decoder only: an output layer that can also copy source tokens (See et al. 2017).
    pointer_generator: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("architecture", ARCHITECTURES), ("pos_emb", POS_EMBS),
                              ("norm", NORMS), ("mlp", MLPS)):
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(
                    f"model config: {name}={value!r} is unknown; use one of {', '.join(allowed)}"
                )
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"model config: {name}={getattr(self, name)} must be a positive integer"
                )
        if self.pointer_generator and self.architecture != "encoder_decoder":
            raise UserError(
                "model config: pointer_generator=true copies from an encoder's source; set "
                "architecture=encoder_decoder, or pointer_generator=false"
            )
        if self.n_encoder_layer is not None and self.n_encoder_layer < 1:
            raise UserError(
                f"model config: n_encoder_layer={self.n_encoder_layer} must be a positive "
                "integer, or null for n_layer"
            )
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise UserError(
                f"model config: mlp_hidden={self.mlp_hidden} must be positive, or null for "
                "the default width"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout={self.dropout} must be in [0, 1)")
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_embd as a multiple of n_head"
            )
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise UserError(
                f"model config: pos_emb='rope' needs an even head size, but n_embd/n_head = "
                f"{self.n_embd}/{self.n_head} = {self.n_embd // self.n_head}; change n_embd or "
                "n_head"
            )
        if self.norm_eps is not None and self.norm_eps <= 0:
            raise UserError(
                f"model config: norm_eps={self.norm_eps} must be positive, or null for the "
                "norm's usual eps"
            )
        if self.rope_base <= 0:
            raise UserError(f"model config: rope_base={self.rope_base} must be positive")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def norm_epsilon(self) -> float:
        return NORM_EPS[self.norm] if self.norm_eps is None else self.norm_eps

    @property
    def encoder_layers(self) -> int:
        return self.n_layer if self.n_encoder_layer is None else self.n_encoder_layer

    @property
    def mlp_width(self) -> int:
        """Hidden width of the MLP.

        GELU (either form) uses GPT-2's 4 * n_embd, i.e. 8 * n_embd^2 weights. SwiGLU has three
        matrices, so 8/3 * n_embd gives the same count; it is rounded up to a multiple of 64 for
        efficient matmuls, which is exact for n_embd = 384 (1024) and a few percent more elsewhere.
        """
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        return -(-8 * self.n_embd // (3 * 64)) * 64


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.norm_epsilon, bias=config.bias)


def make_dropout(config: GPTConfig) -> nn.Module:
    # nn.Dropout(0.0) still dispatches a kernel per call: about 1 ms of a 60 ms CPU step.
    return nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (..., T, head_dim) by position angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the cache is fp32; keep bf16 models in bf16
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), with cos/sin precomputed up to max_len."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        # Not persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(
        self, seq_len: int, *, offset: int = 0, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions offset..offset+seq_len-1, or for per-row position_ids (B, T).

        The result broadcasts against q and k of shape (B, n_head, T, head_dim).
        """
        if position_ids is None:
            return self.cos[offset : offset + seq_len], self.sin[offset : offset + seq_len]
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


class KVCache:
    """Keys and values of past positions for every layer, preallocated to max_len.

    Each attention layer writes its new keys/values at `length` through `update`; the caller
    (GPT.forward) advances `length` once all layers have seen the new tokens.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0
        # Whole buffers behind k and v (which may use only their first rows), and a second
        # set that `reorder` copies into.
        self._bases = self.k + self.v
        self._spare: list[torch.Tensor] | None = None

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_head, T, head_dim) after the past; return all keys and values."""
        end = self.length + k.size(2)
        self.k[layer_idx][:, :, self.length : end] = k
        self.v[layer_idx][:, :, self.length : end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep these batch rows, in this order (beam search; rows that finished are dropped).

        The filled part of every buffer is gathered into a second set of buffers, which then
        swaps with the first: beam search reorders at every step, and taking fresh memory each
        time (page faults) would cost several times the copy itself. The spare set is sized
        for the largest batch seen, so dropping rows needs no new memory either.
        """
        n, live = len(rows), self.k + self.v
        if self._spare is None or self._spare[0].size(0) < n:
            self._spare = [t.new_empty((n, *t.shape[1:])) for t in live]
        kept = [spare[:n] for spare in self._spare]
        for source, target in zip(live, kept, strict=True):
            torch.index_select(source[:, :, : self.length], 0, rows,
                               out=target[:, :, : self.length])
        self._bases, self._spare = self._spare, self._bases
        self.k, self.v = kept[: len(self.k)], kept[len(self.k) :]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V written out, to check the fused kernel against.

    mask is boolean, True where a query may attend to a key; None means causal.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is None:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


class ScaledDotProduct(nn.Module):
    """softmax(Q K^T / sqrt(d_k)) V through `F.scaled_dot_product_attention`.

    A module of its own, without weights, so that forward hooks can read each attention
    layer's own Q, K, V and mask (`gptlab.interpret` draws attention maps from them: the fused
    kernels return no weights). Calling it costs what calling SDPA costs.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal)


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, n_head, T, C / n_head)."""
    B, T, C = x.size()
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, n_head, T, head_dim) -> (B, T, n_head * head_dim)."""
    B, H, T, D = y.size()
    return y.transpose(1, 2).contiguous().view(B, T, H * D)


class SelfAttention(nn.Module):
    """Multi-head self-attention: causal in a decoder, bidirectional in an encoder."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0, causal: bool = True) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which KVCache slot this layer owns
        self.causal = causal
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # q, k, v in one matmul: fewer, larger kernels.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attend = ScaledDotProduct()
        self.resid_dropout = make_dropout(config)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        mask: boolean (B or 1, 1, T, S), True where a query may attend to a key. None means
        plain causal attention (or full attention when not causal), which for a causal layer
        is only right when there is no past or T == 1 (a single new query sees every cached
        key); Transformer.hidden builds a mask otherwise.
        """
        q, k, v = (split_heads(z, self.n_head) for z in self.c_attn(x).split(self.n_embd, dim=2))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = self.attend(
            q,
            k,
            v,
            mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            # Without a mask, the is_causal flag lets SDPA pick its fused kernels.
            is_causal=self.causal and mask is None and x.size(1) > 1,
        )
        return self.resid_dropout(self.c_proj(merge_heads(y)))


class CrossAttention(nn.Module):
    """Decoder queries against the encoder's output ("encoder-decoder attention").

    The keys and values depend only on the source, so `keys_values` computes them once per
    source and decoding reuses them at every step. No positions enter here (the encoder has
    already placed its tokens) and no causal mask: every target position sees the whole
    source, except its padding.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attend = ScaledDotProduct()
        self.resid_dropout = make_dropout(config)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (P, S, C) -> keys and values (P, n_head, S, head_dim)."""
        k, v = self.c_kv(memory).split(self.n_embd, dim=2)
        return split_heads(k, self.n_head), split_heads(v, self.n_head)

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (R, T, C) against the keys/values of P sources, R = P * g (g rows per source).

        The g rows of one source (its beams) are consecutive; since queries do not interact,
        they are read as one row of g * T queries, so the keys and values are never copied
        per beam. mask: (P, 1, 1, S), True at real source tokens; None when nothing is padded.
        """
        R, T, C = x.size()
        P = k.size(0)
        q = split_heads(self.c_q(x).reshape(P, R // P * T, C), self.n_head)
        y = self.attend(q, k, v, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(merge_heads(y).reshape(R, T, C)))


class MLP(nn.Module):
    """GPT-2's GELU MLP, or SwiGLU (Shazeer 2020): silu(x W) * (x V), then the output matrix.

    GELU is exact (erf) for mlp="gelu" and GPT-2's tanh approximation for mlp="gelu_tanh".
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_width
        self.swiglu = config.mlp == "swiglu"
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        # SwiGLU's gate and value projections are fused into one matmul.
        fc_out = 2 * hidden if self.swiglu else hidden
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = make_dropout(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.c_proj(h))


@dataclass
class Memory:
    """What a decoder reads of P encoded sources: each layer's cross-attention keys and values.

    mask (P, 1, 1, S) is True at real source tokens (None: no padding). A pointer-generator
    output layer also reads the source tokens (P, S) and its own keys of them (P, S, C).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor | None
    source_ids: torch.Tensor | None = None
    copy_keys: torch.Tensor | None = None

    def select(self, sources: torch.Tensor) -> Memory:
        """The memory of these sources only, in this order."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[sources]
        return Memory([(k[sources], v[sources]) for k, v in self.kv], pick(self.mask),
                      pick(self.source_ids), pick(self.copy_keys))


class Block(nn.Module):
    """Pre-norm transformer block: the residual stream itself is never normalised.

    A decoder block of an encoder-decoder adds cross-attention between self-attention and MLP.
    """

    def __init__(
        self, config: GPTConfig, layer_idx: int = 0, *, causal: bool = True,
        cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = SelfAttention(config, layer_idx, causal)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.ln_cross = make_norm(config) if cross_attention else None
        self.cross_attn = CrossAttention(config) if cross_attention else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cross: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """cross: this layer's (keys, values, mask) of the encoder output, for a decoder block."""
        x = x + self.attn(self.ln_1(x), rope=rope, mask=mask, kv_cache=kv_cache)
        if cross is not None:
            x = x + self.cross_attn(self.ln_cross(x), *cross)
        return x + self.mlp(self.ln_2(x))


def init_weights(model: nn.Module, residual_writes: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) everywhere, and the projections that write into the
    residual stream scaled by 1/sqrt(their number), so its variance does not grow with depth."""
    model.apply(_init_module)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(residual_writes))


def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


class Transformer(nn.Module):
    """Token embedding, positions, a stack of blocks and the final norm: the body of a GPT, and
    of each half of an encoder-decoder.

    causal=False makes an encoder (every token sees the whole input); cross_attention=True a
    decoder that also reads an encoder's output. `wte` passes in a token table to share.
    """

    def __init__(
        self, config: GPTConfig, n_layer: int | None = None, *, causal: bool = True,
        cross_attention: bool = False, wte: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.wte = wte if wte is not None else nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (
            nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        )
        self.rope = (
            RotaryEmbedding(config.head_dim, config.block_size, config.rope_base)
            if config.pos_emb == "rope"
            else None
        )
        self.drop = make_dropout(config)
        n_layer = config.n_layer if n_layer is None else n_layer
        self.blocks = nn.ModuleList(
            Block(config, i, causal=causal, cross_attention=cross_attention)
            for i in range(n_layer)
        )
        self.ln_f = make_norm(config)

    def hidden(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        memory: Memory | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> final-norm hidden states (B, T, C).

        attention_mask (B, past + T): True/1 for real tokens, False/0 for padding keys.
        position_ids (B, T): per-row positions, for left-padded batches; default counts on
        from the cache length. kv_cache: idx holds only the new tokens, which are appended.
        memory: the encoder output that a decoder's cross-attention reads.
        """
        if idx.size(1) > self.config.block_size:
            raise UserError(
                f"input has {idx.size(1)} tokens but the model's block_size is "
                f"{self.config.block_size}; crop the input or train with a larger block_size"
            )
        T = idx.size(1)
        past = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None and past + T > kv_cache.max_len:
            raise UserError(
                f"KV cache holds {past} tokens and cannot take {T} more (max_len "
                f"{kv_cache.max_len}); start a new cache or crop the input"
            )

        x = self.wte(idx)
        if self.wpe is not None:
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=idx.device)
            x = x + self.wpe(position_ids)
        rope = None if self.rope is None else self.rope(T, offset=past, position_ids=position_ids)
        x = self.drop(x)

        mask = None
        if not self.causal:
            if attention_mask is not None:
                mask = attention_mask.bool()[:, None, None, :]
        elif attention_mask is not None or (past > 0 and T > 1):
            mask = self._attention_mask(attention_mask, T, past, idx.device)
        for i, block in enumerate(self.blocks):
            cross = None if memory is None else (*memory.kv[i], memory.mask)
            x = block(x, rope=rope, mask=mask, kv_cache=kv_cache, cross=cross)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, T: int, past: int, device: torch.device
    ) -> torch.Tensor:
        """Causal mask over past + T keys, minus padding keys, as (B or 1, 1, T, past + T)."""
        q_pos = torch.arange(past, past + T, device=device)[:, None]
        k_pos = torch.arange(past + T, device=device)[None, :]
        mask = k_pos <= q_pos
        if attention_mask is not None:
            # A padding query would see no key at all and produce NaNs that leak through
            # 0 * NaN in later layers' attention; letting it see itself keeps it finite.
            mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)
        return mask if mask.dim() == 4 else mask[None, None]

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for this stack's self-attention, holding up to block_size tokens."""
        return KVCache(
            len(self.blocks), batch_size, self.config.n_head, self.config.block_size,
            self.config.head_dim, device=self.wte.weight.device, dtype=self.wte.weight.dtype,
        )


class GPT(Transformer):
    """The decoder-only language model: a causal Transformer plus the output layer."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # Input and output token representations share one matrix (Press & Wolf 2017).
            self.lm_head.weight = self.wte.weight
        init_weights(self, residual_writes=2 * config.n_layer)  # attention and MLP per layer

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding follows nanoGPT and drops the position table.

        With tied weights the token table stays counted because it doubles as the output
        layer. Untied, it is a pure lookup, so it is dropped too (lm_head stays counted).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward + backward FLOPs per trained token (PaLM appendix B, nanoGPT's estimate_mfu).

        6N for the weight matmuls (2 forward, 4 backward per parameter, N non-embedding) plus
        12 * n_layer * n_embd * T for the attention scores and weighted sum over T positions.
        seq_len defaults to block_size.
        """
        T = self.config.block_size if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    def forward(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab), or final-norm hidden states (B, T, C).

        The arguments are those of `Transformer.hidden`.
        """
        x = self.hidden(idx, attention_mask=attention_mask, position_ids=position_ids,
                        kv_cache=kv_cache)
        return x if return_hidden else self.lm_head(x)

    def start_decoding(
        self, prompts: list[list[int]], sources: list[list[int]] | None = None,
        use_cache: bool = True,
    ) -> DecodingState:
        """The decoding state of `models.generation.generate` for these prompts."""
        if sources is not None:
            raise UserError("a decoder-only model reads one sequence: put the source in the "
                            "prompt (source <|sep|>) instead of passing sources")
        return DecodingState(self, lambda hidden, _memory: self.lm_head(hidden), prompts,
                             use_cache=use_cache)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
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
        """Continue each prompt by up to max_new_tokens; return only the new tokens per row.

        See `models.generation.generate`: prompts may differ in length (each row gets what it
        would get alone), temperature 0 is greedy, beam_size > 1 is beam search, a row that
        emits stop_token ends there with the stop token kept, and use_cache never changes
        the result.
        """
        return generate(
            self, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_token=stop_token, use_cache=use_cache, generator=generator,
            beam_size=beam_size, length_penalty=length_penalty, processors=processors,
        )
