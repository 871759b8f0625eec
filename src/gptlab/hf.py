"""Hugging Face interop: gptlab models to and from transformers' GPT-2 and Llama.

    python -m gptlab.hf export run=<run folder> | ckpt=<checkpoint> out=<folder>
    python -m gptlab.hf safetensors run=<run folder> | ckpt=<checkpoint> [out=<file>]
    python train.py ... task.init_from=hf:<folder or hub id>

A gptlab model has an exact transformers twin when its architecture is one of two families:
learned positions + LayerNorm + GELU is GPT2LMHeadModel, RoPE + RMSNorm + SwiGLU is
LlamaForCausalLM. Anything else is refused with the field that has no equivalent. Each family
is data (FAMILIES): which gptlab fields it fixes, which config keys carry the same value, and a
table of weight names. Both libraries order q, k, v and the heads alike and rotate the same
channel pairs (i, i + head_dim/2) in RoPE, so no weight is permuted: tensors are copied,
transposed (GPT-2's Conv1D stores (in, out)), or split and joined (our fused q|k|v and SwiGLU
gate|value against Llama's separate projections). A bias gptlab leaves out (bias=False) is
exported as zeros, which GPT-2 always has.

transformers is an optional dependency (pip install -e '.[hf]'): gptlab imports and trains
without it, and only what is here needs it.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from gptlab.checkpoints import find_checkpoint, load_checkpoint
from gptlab.data.tokenizers import EOS_TOKEN, Tokenizer
from gptlab.errors import UserError
from gptlab.models.gpt import GPT, NORM_EPS, GPTConfig
from gptlab.safetensors_checkpoints import SUFFIX, convert

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

INSTALL_HINT = "pip install -e '.[hf]'"
LOGITS_ATOL = 1e-4  # export checks the transformers model against gptlab's within this (fp32)

# (gptlab weight, transformers weight(s), how): "copy"; "t", transposed; "cat", ours is theirs
# stacked along dim 0, in order. {i} is the block index.
Row = tuple[str, tuple[str, ...], str]

GPT2_WEIGHTS: tuple[Row, ...] = (
    ("wte.weight", ("transformer.wte.weight",), "copy"),
    ("wpe.weight", ("transformer.wpe.weight",), "copy"),
    ("blocks.{i}.ln_1.weight", ("transformer.h.{i}.ln_1.weight",), "copy"),
    ("blocks.{i}.ln_1.bias", ("transformer.h.{i}.ln_1.bias",), "copy"),
    ("blocks.{i}.attn.c_attn.weight", ("transformer.h.{i}.attn.c_attn.weight",), "t"),
    ("blocks.{i}.attn.c_attn.bias", ("transformer.h.{i}.attn.c_attn.bias",), "copy"),
    ("blocks.{i}.attn.c_proj.weight", ("transformer.h.{i}.attn.c_proj.weight",), "t"),
    ("blocks.{i}.attn.c_proj.bias", ("transformer.h.{i}.attn.c_proj.bias",), "copy"),
    ("blocks.{i}.ln_2.weight", ("transformer.h.{i}.ln_2.weight",), "copy"),
    ("blocks.{i}.ln_2.bias", ("transformer.h.{i}.ln_2.bias",), "copy"),
    ("blocks.{i}.mlp.c_fc.weight", ("transformer.h.{i}.mlp.c_fc.weight",), "t"),
    ("blocks.{i}.mlp.c_fc.bias", ("transformer.h.{i}.mlp.c_fc.bias",), "copy"),
    ("blocks.{i}.mlp.c_proj.weight", ("transformer.h.{i}.mlp.c_proj.weight",), "t"),
    ("blocks.{i}.mlp.c_proj.bias", ("transformer.h.{i}.mlp.c_proj.bias",), "copy"),
    ("ln_f.weight", ("transformer.ln_f.weight",), "copy"),
    ("ln_f.bias", ("transformer.ln_f.bias",), "copy"),
    ("lm_head.weight", ("lm_head.weight",), "copy"),
)

_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"
LLAMA_WEIGHTS: tuple[Row, ...] = (
    ("wte.weight", ("model.embed_tokens.weight",), "copy"),
    ("blocks.{i}.ln_1.weight", ("model.layers.{i}.input_layernorm.weight",), "copy"),
    ("blocks.{i}.attn.c_attn.weight",
     (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"), "cat"),
    ("blocks.{i}.attn.c_attn.bias",
     (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"), "cat"),
    ("blocks.{i}.attn.c_proj.weight", (f"{_ATTN}.o_proj.weight",), "copy"),
    ("blocks.{i}.attn.c_proj.bias", (f"{_ATTN}.o_proj.bias",), "copy"),
    ("blocks.{i}.ln_2.weight", ("model.layers.{i}.post_attention_layernorm.weight",), "copy"),
    ("blocks.{i}.mlp.c_fc.weight", (f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight"), "cat"),
    ("blocks.{i}.mlp.c_fc.bias", (f"{_MLP}.gate_proj.bias", f"{_MLP}.up_proj.bias"), "cat"),
    ("blocks.{i}.mlp.c_proj.weight", (f"{_MLP}.down_proj.weight",), "copy"),
    ("blocks.{i}.mlp.c_proj.bias", (f"{_MLP}.down_proj.bias",), "copy"),
    ("ln_f.weight", ("model.norm.weight",), "copy"),
    ("lm_head.weight", ("lm_head.weight",), "copy"),
)

# GPT-2's activation_function names; gelu_new and gelu_pytorch_tanh are the same tanh formula.
GELU_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
GELU_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _rope(hf) -> dict:
    return dict(getattr(hf, "rope_parameters", None) or {})


@dataclass(frozen=True)
class Family:
    """One transformers architecture that some gptlab models equal exactly."""

    model_type: str  # transformers' config.model_type
    architecture: str  # what AutoModelForCausalLM builds for it
    fixes: dict[str, tuple]  # gptlab fields this family needs, and the values it takes
    same: dict[str, str]  # gptlab field -> transformers config key holding the same value
    eps_key: str  # the norm's eps
    width_key: str  # the MLP's hidden width
    weights: tuple[Row, ...]
    to_hf: Callable[[GPTConfig], dict]  # the remaining config keys
    from_hf: Callable[[object], dict]  # the remaining gptlab fields
    # (config key, accepted?, why not) for transformers configs gptlab cannot reproduce
    refusals: tuple[tuple[str, Callable[[object], bool], str], ...]


GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    fixes={"pos_emb": ("learned",), "norm": ("layernorm",), "mlp": tuple(GELU_TO_HF)},
    same={"vocab_size": "vocab_size", "block_size": "n_positions", "n_layer": "n_layer",
          "n_head": "n_head", "n_embd": "n_embd", "tie_weights": "tie_word_embeddings"},
    eps_key="layer_norm_epsilon",
    width_key="n_inner",
    weights=GPT2_WEIGHTS,
    to_hf=lambda c: {"activation_function": GELU_TO_HF[c.mlp], "resid_pdrop": c.dropout,
                     "embd_pdrop": c.dropout, "attn_pdrop": c.dropout},
    from_hf=lambda hf: {"pos_emb": "learned", "norm": "layernorm", "bias": True,
                        "mlp": GELU_FROM_HF[hf.activation_function], "dropout": hf.resid_pdrop},
    refusals=(
        ("activation_function", lambda hf: hf.activation_function in GELU_FROM_HF,
         f"gptlab's GELU MLP takes {', '.join(GELU_FROM_HF)}"),
        ("scale_attn_weights", lambda hf: hf.scale_attn_weights,
         "gptlab always scales attention scores by 1/sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", lambda hf: not hf.scale_attn_by_inverse_layer_idx,
         "gptlab does not scale attention by depth"),
        ("add_cross_attention", lambda hf: not hf.add_cross_attention,
         "a decoder-only GPT has no cross-attention"),
    ),
)

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    fixes={"pos_emb": ("rope",), "norm": ("rmsnorm",), "mlp": ("swiglu",)},
    same={"vocab_size": "vocab_size", "block_size": "max_position_embeddings",
          "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
          "tie_weights": "tie_word_embeddings"},
    eps_key="rms_norm_eps",
    width_key="intermediate_size",
    weights=LLAMA_WEIGHTS,
    to_hf=lambda c: {"hidden_act": "silu", "num_key_value_heads": c.n_head,
                     "head_dim": c.head_dim, "attention_bias": c.bias, "mlp_bias": c.bias,
                     "attention_dropout": c.dropout,
                     "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base}},
    from_hf=lambda hf: {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                        "bias": hf.attention_bias, "rope_base": _rope(hf)["rope_theta"],
                        "dropout": hf.attention_dropout},
    refusals=(
        ("hidden_act", lambda hf: hf.hidden_act == "silu", "gptlab's SwiGLU gates with silu"),
        ("num_key_value_heads", lambda hf: hf.num_key_value_heads == hf.num_attention_heads,
         "gptlab has no grouped-query attention"),
        ("head_dim", lambda hf: hf.head_dim * hf.num_attention_heads == hf.hidden_size,
         "gptlab's head size is n_embd / n_head"),
        ("rope_parameters", lambda hf: _rope(hf).get("rope_type", "default") == "default",
         "gptlab's RoPE has no scaling"),
        ("mlp_bias", lambda hf: hf.mlp_bias == hf.attention_bias,
         "gptlab's bias flag covers attention and MLP together"),
    ),
)

FAMILIES = (GPT2, LLAMA)
# GPTConfig fields the families translate; any other field must keep its default to export.
_TRANSLATED = {"pos_emb", "norm", "mlp", "norm_eps", "mlp_hidden", "bias", "dropout",
               "rope_base", *GPT2.same, *LLAMA.same}


class Pretrained(Protocol):
    """A checkpoint (checkpoints.Checkpoint) or a transformers model (HFModel)."""

    @property
    def artifacts(self) -> dict: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def weights(self) -> dict[str, torch.Tensor]: ...


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise UserError(f"Hugging Face interop needs the transformers package; install it "
                        f"with {INSTALL_HINT}") from err
    return transformers


# -- configs --------------------------------------------------------------------------------
def family_of(config: GPTConfig) -> Family:
    """The family whose transformers model equals this gptlab model, or a UserError why none."""
    family = next(f for f in FAMILIES if config.pos_emb in f.fixes["pos_emb"])
    for field, allowed in family.fixes.items():
        if getattr(config, field) not in allowed:
            raise UserError(
                f"cannot export model {field}={getattr(config, field)}: with pos_emb="
                f"{config.pos_emb} the transformers twin is {family.architecture}, which needs "
                f"{field}={'|'.join(allowed)} (GPT-2: learned + layernorm + gelu|gelu_tanh; "
                f"Llama: rope + rmsnorm + swiglu); train with those settings to export")
    for f in fields(config):
        if f.name not in _TRANSLATED and getattr(config, f.name) != f.default:
            raise UserError(f"cannot export model {f.name}={getattr(config, f.name)}: "
                            f"neither GPT-2 nor Llama in transformers has an equivalent")
    return family


def hf_config(config: GPTConfig, eos_id: int | None) -> PretrainedConfig:
    """The transformers config of a gptlab model (see family_of for what is refused)."""
    family = family_of(config)
    values = {key: getattr(config, field) for field, key in family.same.items()}
    values |= {family.eps_key: config.norm_epsilon, family.width_key: config.mlp_width,
               "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
               "architectures": [family.architecture], **family.to_hf(config)}
    return _transformers().AutoConfig.for_model(family.model_type, **values)


def _family_named(model_type: str, source: str) -> Family:
    family = next((f for f in FAMILIES if f.model_type == model_type), None)
    if family is None:
        raise UserError(f"hf:{source} is a model of type {model_type}; gptlab imports "
                        f"{' and '.join(f.model_type for f in FAMILIES)} models")
    return family


def gptlab_config(hf: PretrainedConfig, source: str) -> GPTConfig:
    """The GPTConfig of a transformers config, or a UserError naming what gptlab lacks."""
    family = _family_named(hf.model_type, source)
    for key, accepted, why in family.refusals:
        if not accepted(hf):
            raise UserError(f"hf:{source} has {key}={getattr(hf, key)!r}, which gptlab cannot "
                            f"reproduce exactly ({why}); it cannot be imported")
    values = {field: getattr(hf, key) for field, key in family.same.items()}
    values |= family.from_hf(hf)
    eps = getattr(hf, family.eps_key)
    values["norm_eps"] = None if eps == NORM_EPS[values["norm"]] else eps
    usual_width = GPTConfig(**values).mlp_width  # what mlp_hidden=None gives
    width = getattr(hf, family.width_key)
    values["mlp_hidden"] = None if width in (None, usual_width) else width
    return GPTConfig(**values)


# -- weights --------------------------------------------------------------------------------
def _rows(table: tuple[Row, ...], n_layer: int) -> Iterator[Row]:
    for ours, theirs, how in table:
        for i in range(n_layer) if "{i}" in ours else [None]:
            yield ours.format(i=i), tuple(name.format(i=i) for name in theirs), how


def to_hf(ours: dict[str, torch.Tensor], family: Family, n_layer: int,
          expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gptlab's GPT state dict -> transformers names; `expected` is the target's state dict."""
    out = {}
    for name, theirs, how in _rows(family.weights, n_layer):
        if name in ours:
            tensor = ours[name]
            parts = [tensor.t()] if how == "t" else list(tensor.chunk(len(theirs)))
        elif name.endswith(".bias") and all(key in expected for key in theirs):
            parts = [torch.zeros_like(expected[key]) for key in theirs]  # bias=False: zeros
        else:
            continue
        out |= {key: part.contiguous() for key, part in zip(theirs, parts, strict=True)}
    return out


def from_hf(theirs: dict[str, torch.Tensor], family: Family,
            n_layer: int) -> dict[str, torch.Tensor]:
    """transformers state dict -> gptlab's GPT names."""
    out = {}
    for name, keys, how in _rows(family.weights, n_layer):
        if all(key in theirs for key in keys):
            parts = [theirs[key] for key in keys]
            out[name] = parts[0].t().contiguous() if how == "t" else torch.cat(parts)
    return out


# -- import: task.init_from=hf:... --------------------------------------------------------
class HFModel:
    """A transformers checkpoint as task.init_from sees a pretraining run.

    It has the run's model config (translated), its tokenizer and, on demand, its weights
    under gptlab's names. The config and tokenizer load without the weights, so choosing the
    run's tokenizer before the data is prepared costs little.
    """

    def __init__(self, source: str) -> None:
        transformers = _transformers()
        self.source = source
        self.hf_config = _from_hf_source(transformers.AutoConfig.from_pretrained, source)
        self.config = gptlab_config(self.hf_config, source)
        self.family = _family_named(self.hf_config.model_type, source)
        self._tokenizer = _import_tokenizer(source)
        if self._tokenizer.vocab_size != self.config.vocab_size:
            raise UserError(
                f"hf:{source} has {self.config.vocab_size} token embeddings but its tokenizer "
                f"has {self._tokenizer.vocab_size} tokens; gptlab sizes a model by its "
                f"tokenizer, so it imports only checkpoints where the two agree")

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def artifacts(self) -> dict:
        return {"task": "pretrain", "model_config": asdict(self.config),
                "tokenizer": self._tokenizer.to_str(), "data_config": None}

    def weights(self) -> dict[str, torch.Tensor]:
        load = _transformers().AutoModelForCausalLM.from_pretrained
        model = _from_hf_source(load, self.source, dtype=torch.float32)
        return from_hf(model.state_dict(), self.family, self.config.n_layer)

    def model(self) -> GPT:
        """The gptlab GPT with these weights, in eval mode."""
        model = GPT(self.config)
        model.load_state_dict(self.weights())
        return model.eval()


def _from_hf_source(load: Callable, source: str, **kwargs):
    """load(folder or hub id), with the reasons it can fail said in one line."""
    local = Path(source).expanduser()
    if not local.is_dir() and source.startswith(("/", ".", "~")):
        raise UserError(f"hf:{source}: folder {local} does not exist; pass a model folder "
                        f"(save_pretrained, python -m gptlab.hf export) or a hub id such as gpt2")
    try:
        return load(str(local) if local.is_dir() else source, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if local.is_dir():
            raise UserError(f"hf:{source}: cannot load this model folder ({reason}); pass a "
                            f"folder written by save_pretrained or python -m gptlab.hf "
                            f"export") from err
        raise UserError(
            f"hf:{source} is not a local folder, so it is a Hugging Face hub id, and fetching "
            f"it needs the network ({reason}); connect (and unset HF_HUB_OFFLINE), or download "
            f"it where there is a network (hf download {source} --local-dir DIR) and pass "
            f"hf:DIR") from err


def _import_tokenizer(source: str) -> Tokenizer:
    load = _transformers().AutoTokenizer.from_pretrained
    backend = getattr(_from_hf_source(load, source), "backend_tokenizer", None)
    kind = type(backend.model).__name__ if backend is not None else "slow (Python)"
    if kind not in ("BPE", "WordLevel"):
        raise UserError(f"hf:{source} has a {kind} tokenizer; gptlab runs BPE and WordLevel "
                        f"tokenizers (tokenizer.json) only")
    return Tokenizer.from_str(backend.to_str(), origin=f"the tokenizer of hf:{source}")


# -- export ---------------------------------------------------------------------------------
def export(pretrained: Pretrained, out: str | Path) -> Path:
    """Write a transformers model folder (config, model.safetensors, tokenizer) to `out`.

    The folder appears whole or not at all (written beside it, then renamed), and is checked
    before: the transformers model's logits must equal gptlab's within LOGITS_ATOL.
    """
    transformers = _transformers()
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={out} already exists; export writes a new folder, so choose "
                        f"another path or delete that one")
    config = GPTConfig(**pretrained.artifacts["model_config"])
    tokenizer = pretrained.tokenizer
    family, hf_cfg = family_of(config), hf_config(config, tokenizer.eos_id)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    weights = pretrained.weights()
    model.load_state_dict(to_hf(weights, family, config.n_layer, model.state_dict()))
    _check_logits(config, weights, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"  # mkdir keeps the umask
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        hf_tokenizer(tokenizer, config.block_size).save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_logits(config: GPTConfig, weights: dict[str, torch.Tensor],
                  model: PreTrainedModel) -> None:
    ours = GPT(config)
    ours.load_state_dict(weights)
    idx = torch.arange(min(config.block_size, 16))[None] % config.vocab_size
    with torch.no_grad():
        diff = (ours.eval()(idx) - model(idx).logits).abs().max().item()
    if not diff <= LOGITS_ATOL:
        raise RuntimeError(f"exported {type(model).__name__} differs from gptlab's model by "
                           f"{diff:.2e} in logits (allowed {LOGITS_ATOL}); this is a bug")


def hf_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """The tokenizer.json wrapped for AutoTokenizer, <|endoftext|> as its BOS/EOS if it has one."""
    from tokenizers import Tokenizer as RawTokenizer

    special = EOS_TOKEN if tokenizer.eos_id is not None else None
    return _transformers().PreTrainedTokenizerFast(
        tokenizer_object=RawTokenizer.from_str(tokenizer.to_str()), bos_token=special,
        eos_token=special, model_max_length=max_length)


# -- command line ---------------------------------------------------------------------------
def _export_command(out: str | None = None, run: str | None = None,
                    ckpt: str | None = None) -> None:
    _transformers()  # before reading any checkpoint
    if not out:
        raise UserError("say where to write the model folder: out=<folder>")
    path, run_dir = find_checkpoint(run, ckpt)
    folder = export(load_checkpoint(path, run_dir), out)
    print(f"exported {path} to {folder}; load it with "
          f"AutoModelForCausalLM.from_pretrained('{folder}') and AutoTokenizer")


def _safetensors_command(out: str | None = None, run: str | None = None,
                         ckpt: str | None = None) -> None:
    path, _ = find_checkpoint(run, ckpt)
    target = Path(out).expanduser() if out else path.with_suffix(SUFFIX)
    if target.resolve() == path.resolve():
        raise UserError(f"{path} is already a safetensors checkpoint; pass a .ckpt file")
    convert(path, target)
    print(f"wrote {target}; use it as ckpt={target} or task.init_from={target}")


COMMANDS = {"export": _export_command, "safetensors": _safetensors_command}
USAGE = ("python -m gptlab.hf export run=<run folder>|ckpt=<checkpoint> out=<folder> | "
         "python -m gptlab.hf safetensors run=<run folder>|ckpt=<checkpoint> [out=<file>]")


def _parse(argv: list[str]) -> tuple[Callable[..., None], dict[str, str]]:
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"say what to do: {USAGE}")
    options = {}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("run", "ckpt", "out"):
            raise UserError(f"{arg!r} is not an option of {argv[0]}; usage: {USAGE}")
        options[key] = value
    return COMMANDS[argv[0]], options


def main(argv: list[str] | None = None) -> None:
    """The command line: user errors print one line and exit with status 2."""
    try:
        command, options = _parse(sys.argv[1:] if argv is None else argv)
        command(**options)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
