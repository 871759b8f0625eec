"""A look inside a trained model: attention maps and, for classifiers, per-token attributions.

    python -m gptlab.interpret run=<run folder> | ckpt=<checkpoint> text="..." \\
        [target="..."] [label=<class>] [out=<folder>]

Reads a checkpoint, runs one forward pass over the text as the run's task reads it, and
writes PNG pictures (by default into <run folder>/interpret/<text>-<hash>/):

- attention maps, a grid of layers x heads with the tokens on both axes: `attention.png` for
  a decoder-only model; `attention_encoder.png`, `attention_decoder.png` and
  `attention_cross.png` (decoder tokens against source tokens) for an encoder-decoder.
  Text-to-text runs read `source <|sep|> target`, the target being `target=` or else the
  model's own output for the text.
- for classification runs, which tokens the prediction rests on (`label=` explains another
  class than the predicted one): gradient x input (the gradient of the class's log-probability,
  i.e. of its evidence against the other classes, with respect to each token's embedding,
  dotted with that embedding: signed) and attention rollout (Abnar &
  Zuidema 2020: the head-averaged attention of every layer plus the identity for the
  residual path, rows renormalised, multiplied through the layers, read at the pooled
  positions, each weighted by its share of the pooled vector: each token's share, summing
  to 1), as coloured text (`attribution.png`) and as a
  table, printed and written as `attribution.md` and `attribution.csv`.

The models compute attention with scaled_dot_product_attention, which returns no weights.
`record_attention` hooks every layer's `ScaledDotProduct` module during the forward pass and
keeps its own Q, K, V and mask; the maps are softmax(Q K^T / sqrt(d_k)) under that mask,
which times V gives back exactly what the layer computed (the tests check both).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.checkpoints import Checkpoint, find_checkpoint, load_checkpoint
from gptlab.data.finetune import encode_sources, encode_texts, eos_id, separator_id, source_limit
from gptlab.data.tokenizers import EOS_TOKEN, Tokenizer
from gptlab.errors import UserError
from gptlab.models.gpt import ScaledDotProduct
from gptlab.tasks.classification import pooled_shares
from gptlab.utils.files import save_atomic, write_atomic

MAX_LABELLED_TOKENS = 64  # more tokens than this: the axes of a map are not labelled
TITLES = {"self": "self-attention (causal): row = query token, column = key token",
          "encoder": "encoder self-attention (bidirectional)",
          "decoder": "decoder self-attention (causal)",
          "cross": "cross-attention: row = decoder token, column = source token"}


@dataclass
class Captured:
    """What one attention layer computed in a forward pass: its own Q, K, V, mask, output."""

    name: str  # the module's path in the model, e.g. decoder.blocks.1.cross_attn.attend
    q: torch.Tensor  # (B, heads, T, d_k)
    k: torch.Tensor  # (B, heads, S, d_k)
    v: torch.Tensor  # (B, heads, S, d_v)
    mask: torch.Tensor | None  # boolean, True where a query may attend to a key
    is_causal: bool
    output: torch.Tensor  # (B, heads, T, d_v)

    @property
    def kind(self) -> str:
        """self (a GPT), encoder, decoder or cross (an encoder-decoder)."""
        if ".cross_attn." in self.name:
            return "cross"
        return self.name.split("blocks.")[0].rstrip(".") or "self"

    def weights(self) -> torch.Tensor:
        return attention_weights(self.q, self.k, self.mask, self.is_causal)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                      is_causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) under SDPA's mask rules: (..., T, S), each row sums to 1."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
    if is_causal:  # SDPA's is_causal: query i sees keys 0..i
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1)


@contextmanager
def record_attention(model: nn.Module) -> Iterator[list[Captured]]:
    """Within the block, every attention layer of `model` that runs appends what it computed
    (detached) to the yielded list, in the order the layers run."""
    captured: list[Captured] = []

    def hook(name: str) -> Callable:
        def record(module, args, kwargs, output) -> None:
            q, k, v = (t.detach() for t in args[:3])
            mask = kwargs.get("mask")
            captured.append(Captured(name, q, k, v, None if mask is None else mask.detach(),
                                     bool(kwargs.get("is_causal", False)), output.detach()))
        return record

    handles = [module.register_forward_hook(hook(name), with_kwargs=True)
               for name, module in model.named_modules() if isinstance(module, ScaledDotProduct)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(captured: list[Captured]) -> dict[str, torch.Tensor]:
    """The first row's maps by kind, each (layers, heads, T, S) in layer order."""
    maps: dict[str, list[torch.Tensor]] = {}
    for record in captured:
        maps.setdefault(record.kind, []).append(record.weights()[0])
    return {kind: torch.stack(layers) for kind, layers in maps.items()}


def attention_rollout(maps: torch.Tensor) -> torch.Tensor:
    """(layers, heads, T, T) self-attention -> (T, T): how much each position's final state
    draws on each input token through attention and the residual path (Abnar & Zuidema)."""
    eye = torch.eye(maps.size(-1))
    rollout = eye
    for layer in maps:
        step = 0.5 * layer.mean(0) + 0.5 * eye  # rows still sum to 1
        rollout = step @ rollout
    return rollout


@dataclass
class Attribution:
    """How much each input token counts for one class of a classifier."""

    tokens: list[str]
    label: str
    probability: float
    gradient_x_input: list[float]
    rollout: list[float]


@dataclass
class Explanation:
    maps: dict[str, torch.Tensor]  # kind -> (layers, heads, rows, columns)
    axes: dict[str, tuple[list[str], list[str]]]  # kind -> (row tokens, column tokens)
    attribution: Attribution | None = None
    target: str | None = None  # the target a text-to-text run was read with


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token as its own text, with newlines, tabs and lone spaces made visible."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i]).replace("\n", "\\n").replace("\t", "\\t")
        labels.append(text.replace(" ", "\u2423") if text.isspace() else text)
    return labels


def explain(ckpt: Checkpoint, text: str, target: str | None = None,
            label: str | None = None) -> Explanation:
    """The pictures' content for this checkpoint and text, as its task reads the text."""
    task_name = ckpt.artifacts["task"]
    if label is not None and task_name != "classify":
        raise UserError(f"label={label} is for classification runs; this is a {task_name} run")
    if target is not None and task_name not in ("seq2seq", "summarize"):
        raise UserError(f"target= is for text-to-text runs (seq2seq, summarize); this is a "
                        f"{task_name} run")
    if task_name == "classify":
        return explain_classifier(ckpt.task(), text, label)
    if task_name in ("seq2seq", "summarize"):
        return explain_text_to_text(ckpt.task(), text, target)
    return explain_text(ckpt.model(), ckpt.tokenizer, text)


def explain_text(model: nn.Module, tokenizer: Tokenizer, text: str) -> Explanation:
    """Any decoder-only run: the attention over the text's tokens (cut to the context)."""
    if model.config.architecture != "decoder_only":
        raise UserError("this run's model is an encoder-decoder, but its task does not say "
                        "what the encoder reads; interpret it as a seq2seq/summarize run")
    ids = tokenizer.encode(text)[: model.config.block_size]
    if not ids:
        raise UserError('text="" has no tokens; give the text to look at: text="..."')
    return _decoder_only(model, tokenizer, ids)


def _decoder_only(model: nn.Module, tokenizer: Tokenizer, ids: list[int]) -> Explanation:
    with torch.no_grad(), record_attention(model) as captured:
        model(torch.tensor([ids]))
    tokens = token_labels(tokenizer, ids)
    return Explanation(attention_maps(captured), {"self": (tokens, tokens)})


def explain_text_to_text(task, text: str, target: str | None) -> Explanation:
    """`source <|sep|>` then the target (given, or the model's own output for the source)."""
    tokenizer, config = task.tokenizer, task.model.config
    if target is None:
        target = task.translate([text])[0]
    prompt = encode_sources(tokenizer, [text], source_limit(task.hparams.max_source_tokens,
                                                             config.block_size))[0]
    target_ids = tokenizer.encode(target)
    if config.architecture == "decoder_only":
        ids = (prompt + target_ids + [eos_id(tokenizer)])[: config.block_size]
        explanation = _decoder_only(task.model, tokenizer, ids)
    else:
        decoder_ids = ([separator_id(tokenizer)] + target_ids)[: config.block_size]
        with torch.no_grad(), record_attention(task.model) as captured:
            task.model(torch.tensor([prompt]), torch.tensor([decoder_ids]))
        source, decoded = token_labels(tokenizer, prompt), token_labels(tokenizer, decoder_ids)
        explanation = Explanation(attention_maps(captured), {
            "encoder": (source, source), "decoder": (decoded, decoded),
            "cross": (decoded, source)})
    explanation.target = target
    return explanation


def explain_classifier(task, text: str, label: str | None) -> Explanation:
    """Attention maps, and gradient x input and rollout for `label` (default: predicted)."""
    if label is not None and label not in task.labels:
        raise UserError(f"label={label} is not a class of this run; its labels: "
                        f"{', '.join(task.labels)}")
    ids = encode_texts(task.tokenizer, [text], task.model.config.block_size)[0]
    embeddings: list[torch.Tensor] = []
    hook = task.model.wte.register_forward_hook(lambda module, args, out: embeddings.append(out))
    try:
        with torch.enable_grad(), record_attention(task.model) as captured:
            logits, hidden = task(torch.tensor([ids]), torch.tensor([len(ids)]))
    finally:
        hook.remove()
    probabilities = logits.detach().softmax(-1)[0]
    index = int(probabilities.argmax()) if label is None else task.labels.index(label)
    # log P(class), not the logit: a change that moves every class's logit alike is no
    # evidence for any of them.
    (grad,) = torch.autograd.grad(logits.log_softmax(-1)[0, index], embeddings[0])
    gradient_x_input = (grad * embeddings[0]).sum(-1)[0].detach()
    maps = attention_maps(captured)
    rollout = attention_rollout(maps["self"])
    pooled = pooled_shares(hidden[0].detach().float(), task.hparams.pooling) @ rollout
    tokens = token_labels(task.tokenizer, ids)
    attribution = Attribution(tokens, task.labels[index], float(probabilities[index]),
                              gradient_x_input.tolist(), pooled.tolist())
    return Explanation(maps, {"self": (tokens, tokens)}, attribution)


# -- pictures and tables -----------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    save_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    _pyplot().close(fig)
    return path


def plot_attention(maps: torch.Tensor, rows: list[str], columns: list[str], title: str,
                   path: Path) -> Path:
    """A grid of layers x heads, one shared 0..1 colour scale, tokens on both axes."""
    plt = _pyplot()
    n_layers, n_heads = maps.shape[:2]
    panel = min(4.5, max(2.2, 0.14 * max(len(rows), len(columns))))
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(panel * n_heads + 1.5,
                                                         panel * n_layers + 1.0),
                             squeeze=False, layout="constrained")
    labelled = max(len(rows), len(columns)) <= MAX_LABELLED_TOKENS
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            image = ax.imshow(maps[layer, head].numpy(), vmin=0.0, vmax=1.0, cmap="viridis",
                              interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            _token_ticks(ax, rows, columns, labelled, left=head == 0,
                         bottom=layer == n_layers - 1)
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight")
    fig.suptitle(title)
    return _save(fig, path)


def _token_ticks(ax, rows: list[str], columns: list[str], labelled: bool, left: bool,
                 bottom: bool) -> None:
    ax.set_xticks(range(len(columns)) if labelled and bottom else [])
    ax.set_yticks(range(len(rows)) if labelled and left else [])
    if labelled and bottom:
        ax.set_xticklabels(columns, rotation=90, fontsize=6)
    if labelled and left:
        ax.set_yticklabels(rows, fontsize=6)


def _scale(values: list[float], tokens: list[str]) -> float:
    """The largest magnitude among the text's own tokens: the final <|endoftext|> of a
    classifier input, where the head reads, often dwarfs them and is drawn clipped."""
    own = [abs(v) for v, token in zip(values, tokens, strict=True) if token != EOS_TOKEN]
    return max(own or [abs(v) for v in values]) or 1.0


def plot_attribution(attribution: Attribution, path: Path) -> Path:
    """The text twice, each token on a background coloured by its score: gradient x input
    (red for the class, blue against it) and attention rollout (darker: larger share)."""
    plt = _pyplot()
    from matplotlib import colormaps

    font, width_pt = 12, 720.0
    char_pt, line_pt = 0.6 * font, 2.0 * font  # a monospace character; a line of text
    tokens = attribution.tokens
    strongest = _scale(attribution.gradient_x_input, tokens)
    largest = _scale(attribution.rollout, tokens)
    panels = [
        (f"gradient x input for class '{attribution.label}' (p = {attribution.probability:.3f};"
         f" red: for it, blue: against)",
         [0.5 + 0.5 * max(-1.0, min(1.0, g / strongest)) for g in attribution.gradient_x_input],
         colormaps["RdBu_r"]),
        ("attention rollout (each token's share of the pooled position)",
         [min(1.0, r / largest) for r in attribution.rollout], colormaps["Greens"]),
    ]
    placed, y = [], line_pt
    for title, shades, colormap in panels:
        placed.append((0.0, y, title, None, "black"))
        y += line_pt
        x = 0.0
        for token, shade in zip(tokens, shades, strict=True):
            width = (len(token) + 0.6) * char_pt
            if x + width > width_pt and x > 0:
                x, y = 0.0, y + line_pt
            colour = colormap(shade)
            placed.append((x, y, token, colour, "white" if _dark(colour) else "black"))
            x += width
        y += 1.5 * line_pt
    placed.append((0.0, y - 0.75 * line_pt, "colours are scaled to the text's own tokens; "
                   f"{EOS_TOKEN} may lie beyond the scale (see the table)", None, "dimgray"))
    height_pt = y
    fig = plt.figure(figsize=((width_pt + 2 * font) / 72, (height_pt + font) / 72))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-font, width_pt + font)
    ax.set_ylim(height_pt + font, 0)
    ax.axis("off")
    for x, y, text, colour, ink in placed:
        if colour is None:
            ax.text(x, y, text, fontsize=font - 2 * (ink != "black"), color=ink, va="center",
                    weight="bold" if ink == "black" else "normal")
        else:
            ax.text(x, y, text, fontsize=font, family="monospace", va="center", color=ink,
                    bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5})
    return _save(fig, path)


def _dark(colour: tuple[float, ...]) -> bool:
    red, green, blue = colour[:3]
    return 0.299 * red + 0.587 * green + 0.114 * blue < 0.5


def attribution_rows(attribution: Attribution) -> list[dict[str, object]]:
    return [{"position": i, "token": token, "gradient_x_input": round(g, 6),
             "rollout": round(r, 6)}
            for i, (token, g, r) in enumerate(zip(attribution.tokens,
                                                  attribution.gradient_x_input,
                                                  attribution.rollout, strict=True))]


def markdown_table(attribution: Attribution) -> str:
    lines = [f"class '{attribution.label}', probability {attribution.probability:.4f}", "",
             "| position | token | gradient x input | rollout |", "|---:|---|---:|---:|"]
    for row in attribution_rows(attribution):
        token = str(row["token"]).replace("|", "\\|")
        lines.append(f"| {row['position']} | `{token}` | {row['gradient_x_input']:.4f} | "
                     f"{row['rollout']:.4f} |")
    return "\n".join(lines) + "\n"


def csv_table(attribution: Attribution) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["position", "token", "gradient_x_input",
                                                "rollout"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(attribution_rows(attribution))
    return buffer.getvalue()


def write_pictures(explanation: Explanation, out: Path) -> list[Path]:
    """Every picture and table of the explanation, into `out` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, maps in explanation.maps.items():
        rows, columns = explanation.axes[kind]
        name = "attention.png" if kind == "self" else f"attention_{kind}.png"
        written.append(plot_attention(maps, rows, columns, TITLES[kind], out / name))
    if explanation.attribution is not None:
        written.append(plot_attribution(explanation.attribution, out / "attribution.png"))
        for name, table in (("attribution.md", markdown_table(explanation.attribution)),
                            ("attribution.csv", csv_table(explanation.attribution))):
            write_atomic(out / name, table)
            written.append(out / name)
    return written


def default_folder(ckpt: Checkpoint, text: str, target: str | None, label: str | None) -> Path:
    """<run folder>/interpret/<the text's first words>-<hash of the inputs>."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].rstrip("-") or "text"
    digest = hashlib.sha256(repr((text, target, label)).encode()).hexdigest()[:8]
    return (ckpt.run_dir or ckpt.path.parent) / "interpret" / f"{words}-{digest}"


# -- command line ---------------------------------------------------------------------------
USAGE = ('python -m gptlab.interpret run=<run folder>|ckpt=<checkpoint> text="..." '
         '[target="..."] [label=<class>] [out=<folder>]')
OPTIONS = ("run", "ckpt", "text", "target", "label", "out")


def interpret(run: str | None = None, ckpt: str | None = None, text: str | None = None,
              target: str | None = None, label: str | None = None,
              out: str | None = None) -> list[Path]:
    """Write the pictures for one text; print the attribution table of a classifier."""
    if not text:
        raise UserError(f'say which text to look at: text="..."; usage: {USAGE}')
    path, run_dir = find_checkpoint(run, ckpt)
    checkpoint = load_checkpoint(path, run_dir)
    explanation = explain(checkpoint, text, target, label)
    folder = Path(out).expanduser() if out else default_folder(checkpoint, text, target, label)
    written = write_pictures(explanation, folder)
    if explanation.target is not None:
        print(f"target: {explanation.target}" + ("" if target else " (the model's output)"))
    if explanation.attribution is not None:
        print(markdown_table(explanation.attribution))
    print("written: " + ", ".join(map(str, written)))
    return written


def _parse(argv: list[str]) -> dict[str, str]:
    options = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise UserError(f"{arg!r} is not an option; usage: {USAGE}")
        options[key] = value
    return options


def main(argv: list[str] | None = None) -> None:
    """The command line: user errors print one line and exit with status 2."""
    try:
        interpret(**_parse(sys.argv[1:] if argv is None else argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
