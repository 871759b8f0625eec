"""Text-to-text fine-tuning with either architecture, on `source <|sep|> target <|endoftext|>`.

decoder_only: the GPT reads each pair as one sequence. encoder_decoder: the encoder reads
`source <|sep|>`, and the decoder reads `<|sep|> target` and predicts `target <|endoftext|>`
(the same rows, split by `encoder_decoder_batch`). Either way the loss is the next-token loss
on the target side only (optionally label-smoothed): -sum_i log P(y_i | x_i) for the target
sentence y_i given the source x_i. With `aux_lm_weight` > 0 a decoder-only model also gets the
source side's next-token loss, GPT-1's auxiliary objective.

Validation decodes every source (greedily in training; with `beam_size` in evaluate.py and
generate.py) and scores the outputs with sacreBLEU itself: BLEU, chrF (character n-grams
only, word_order=0) and chrF++ (plus word unigrams and bigrams, word_order=2), each 0-100.
evaluate.py prints sacreBLEU's signature of each, so figures compare with papers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sacrebleu.metrics import BLEU, CHRF
from torchmetrics import MaxMetric, MeanMetric

from gptlab.data.finetune import PAD_ID, encode_sources, eos_id, separator_id, source_limit
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.errors import UserError
from gptlab.models.generation import LogitsProcessor
from gptlab.models.gpt import ARCHITECTURES
from gptlab.tasks.base import GPTTask, lm_loss


def encoder_decoder_batch(batch: dict) -> tuple[torch.Tensor, ...]:
    """The rows of a batch split for an encoder-decoder: (source ids, source mask, decoder
    inputs, decoder targets).

    A row `source <|sep|> target <|endoftext|>` gives the encoder `source <|sep|>` and the
    decoder `<|sep|> target`, predicting `target <|endoftext|>`: the decoder's part starts
    at the separator, column source_len - 1.
    """
    ids, targets, lengths = batch["input_ids"], batch["targets"], batch["source_lens"]
    columns = torch.arange(int(lengths.max()), device=ids.device)
    source_mask = columns[None, :] < lengths[:, None]
    source_ids = ids[:, : columns.numel()].masked_fill(~source_mask, PAD_ID)
    n_targets = batch["target_mask"].sum(1)
    steps = torch.arange(int(n_targets.max()), device=ids.device)
    read = ((lengths - 1)[:, None] + steps[None, :]).clamp(max=ids.size(1) - 1)
    inside = steps[None, :] < n_targets[:, None]
    return (source_ids, source_mask, ids.gather(1, read).masked_fill(~inside, PAD_ID),
            targets.gather(1, read).masked_fill(~inside, IGNORE_INDEX))


class Seq2SeqTask(GPTTask):
    """Logs val/loss (target tokens), val/bleu, val/chrf, val/chrf++ (0-100), val/bleu_best."""

    task_name = "seq2seq"
    architectures = ARCHITECTURES
    summary_metrics = ("bleu", "chrf", "chrf++", "loss")
    primary_metric = "bleu"  # val/<this>_best is logged during training
    default_eval_split = "test"

    def __init__(self, model_config, optimizer: dict, scheduler: dict,
                 aux_lm_weight: float = 0.0, label_smoothing: float = 0.0,
                 max_new_tokens: int = 64, beam_size: int = 1, bleu_tokenize: str = "13a",
                 max_source_tokens: int | None = None, prefix_space: bool = False, **kwargs):
        super().__init__(model_config, optimizer, scheduler, **kwargs)
        if beam_size < 1:
            raise UserError(f"task.beam_size={beam_size} must be >= 1 (1 is greedy)")
        self.encoder_decoder = self.model.config.architecture == "encoder_decoder"
        if aux_lm_weight and self.encoder_decoder:
            raise UserError("task.aux_lm_weight is the source side's LM loss of a decoder-only "
                            "model; an encoder-decoder has none: set it to 0 or use "
                            "model.architecture=decoder_only")
        if bleu_tokenize not in BLEU.TOKENIZERS:
            raise UserError(f"task.bleu_tokenize={bleu_tokenize!r} is not a sacreBLEU "
                            f"tokenizer; use one of {', '.join(BLEU.TOKENIZERS)}")
        self.val_loss = MeanMetric()
        self.val_best = MaxMetric()
        self.val_best.persistent(True)  # a resumed run keeps its best so far
        self.reset_collected()
        self.signatures: dict[str, str] = {}  # how each metric was computed, by name
        # Set by evaluate.py: decode with the beam and keep the outputs, by example index.
        self.evaluating = False
        self.hypotheses: dict[int, str] = {}

    def split_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token targets of the target side, and of the source side."""
        targets, on_target = batch["targets"], batch["target_mask"]
        return (targets.masked_fill(~on_target, IGNORE_INDEX),
                targets.masked_fill(on_target, IGNORE_INDEX))

    def target_states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states and their next-token targets (IGNORE_INDEX off the target side)."""
        if self.encoder_decoder:
            source_ids, source_mask, decoder_ids, targets = encoder_decoder_batch(batch)
            return self.model(source_ids, decoder_ids, source_mask=source_mask,
                              return_hidden=True), targets
        return self.model(batch["input_ids"], return_hidden=True), self.split_targets(batch)[0]

    def target_loss(self, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
        if self.encoder_decoder and self.model.pointer is not None:
            # The copy path reads each row's source, so it scores whole rows; the plain output
            # layer below skips the padding (about a fifth of Multi30k's decoder positions).
            source_ids, source_mask, decoder_ids, targets = encoder_decoder_batch(batch)
            logits = self.model(source_ids, decoder_ids, source_mask=source_mask)
            return lm_loss(logits, targets, label_smoothing)
        hidden, targets = self.target_states(batch)
        # Output logits only where the loss reads them: the LM head over the vocabulary is a
        # large share of the compute, and source positions are ~half the tokens.
        scored = targets != IGNORE_INDEX
        return lm_loss(self.model.lm_head(hidden[scored]), targets[scored], label_smoothing)

    def batch_tokens(self, batch: dict) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def training_loss(self, batch: dict):
        if not self.hparams.aux_lm_weight:
            return self.target_loss(batch, self.hparams.label_smoothing), {}
        target_side, source_side = self.split_targets(batch)
        logits = self.model(batch["input_ids"])
        target_loss = lm_loss(logits, target_side, self.hparams.label_smoothing)
        source_loss = lm_loss(logits, source_side)
        loss = target_loss + self.hparams.aux_lm_weight * source_loss
        return loss, {"target_loss": target_loss, "lm_loss": source_loss}

    def validation_step(self, batch: dict, batch_idx: int):
        self.val_loss.update(self.target_loss(batch), weight=batch["target_mask"].sum())
        # Greedy in training's validations (fast); the configured beam in evaluate.py.
        hypotheses = self.decode(batch["prompts"], greedy=not self.evaluating)
        self.collect(hypotheses, batch)
        if self.evaluating:
            self.hypotheses |= dict(zip(batch["indices"], hypotheses, strict=True))

    collected = ("outputs", "references")  # what corpus_scores reads, gathered from ranks

    def collect(self, hypotheses: list[str], batch: dict) -> None:
        """Keep what `corpus_scores` needs of this batch (this rank's share of the split)."""
        self.outputs += hypotheses
        self.references += batch["references"]

    def reset_collected(self) -> None:
        self.outputs: list[str] = []
        self.references: list[str] = []

    def gather_collected(self) -> None:
        """Under DDP each rank decoded its own batches: a corpus score needs all of them."""
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return
        for name in self.collected:
            parts: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, getattr(self, name))
            setattr(self, name, [item for part in parts for item in part])

    def corpus_scores(self) -> dict[str, float]:
        """Scores of the outputs collected in this validation, by metric name (sacreBLEU)."""
        scores = {}
        for name, metric in (("bleu", BLEU(tokenize=self.hparams.bleu_tokenize)),
                             ("chrf", CHRF(word_order=0)), ("chrf++", CHRF(word_order=2))):
            scores[name] = metric.corpus_score(self.outputs, [self.references]).score
            self.signatures[name] = f"sacreBLEU {metric.get_signature()}"
        return scores

    def on_validation_epoch_end(self) -> None:
        p = self.eval_prefix
        self.gather_collected()
        scores = self.corpus_scores()
        self.reset_collected()
        self.log_dict({f"{p}/loss": self.val_loss.compute()}
                      | {f"{p}/{name}": value for name, value in scores.items()},
                      prog_bar=p == "val")
        self.val_loss.reset()
        if self.fitting_validation():
            self.val_best.update(scores[self.primary_metric])
            self.log(f"val/{self.primary_metric}_best", self.val_best.compute())
        self.log_progress()

    # -- decoding ------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, prompts: list[list[int]], greedy: bool = False,
               processors: Sequence[LogitsProcessor] = ()) -> list[str]:
        """Target text for each prompt (source tokens + separator); processors as in
        `models.generation.generate` (e.g. a safety filter's)."""
        eos = eos_id(self.tokenizer)
        options = dict(temperature=0.0, stop_token=eos, processors=processors,
                       beam_size=1 if greedy else self.hparams.beam_size)
        if self.encoder_decoder:
            outputs = self.model.generate(prompts, self.hparams.max_new_tokens,
                                          start_token=separator_id(self.tokenizer), **options)
        else:
            outputs = self.model.generate(prompts, self.hparams.max_new_tokens, **options)
        return [self.tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids).strip()
                for ids in outputs]

    def translate(self, texts: list[str], batch_size: int = 64,
                  processors: Sequence[LogitsProcessor] = ()) -> list[str]:
        """The output text for each input text, as training's data module encodes inputs."""
        limit = source_limit(self.hparams.max_source_tokens, self.model.config.block_size)
        prompts = encode_sources(self.tokenizer, texts, limit, self.hparams.prefix_space)
        outputs = []
        for start in range(0, len(prompts), batch_size):
            outputs += self.decode(prompts[start : start + batch_size], processors=processors)
        return outputs

    # -- evaluate.py ---------------------------------------------------------------------
    def evaluation_passes(self, datamodule, split: str) -> list[tuple[str, object]]:
        self.evaluating = True
        return super().evaluation_passes(datamodule, split)

    def evaluation_details(self) -> dict:
        return {"signatures": self.signatures,
                "hypotheses": [self.hypotheses[i] for i in sorted(self.hypotheses)]}

    def decoding(self) -> str:
        beam = self.hparams.beam_size
        return "greedy" if beam == 1 else f"beam {beam}"

    def report(self, results: dict[str, float], split: str) -> str:
        return "\n".join([
            f"{split}: BLEU {results[f'{split}/bleu']:.2f}, chrF {results[f'{split}/chrf']:.2f}"
            f", chrF++ {results[f'{split}/chrf++']:.2f}, target-token loss "
            f"{results[f'{split}/loss']:.4f}; decoding: {self.decoding()}",
            *(f"  {name:<7} {signature}" for name, signature in self.signatures.items()),
        ])
