"""Text-to-text fine-tuning with the decoder-only GPT: `source <|sep|> target <|endoftext|>`.

The loss is the next-token loss on the target side only (optionally label-smoothed), so it is
-sum_i log P(y_i | x_i) for the target sentence y_i given the source x_i. With
`aux_lm_weight` > 0 the source side's next-token loss is added, GPT-1's auxiliary objective.
Validation decodes every source (greedily in training; with `beam_size` in evaluate.py and
generate.py) and scores the outputs against the references with sacreBLEU's BLEU and
chrF (torchmetrics' implementations).
"""

from __future__ import annotations

import torch
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.text import CHRFScore, SacreBLEUScore

from gptlab.data.finetune import encode_sources, eos_id
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.errors import UserError
from gptlab.tasks.base import GPTTask, lm_loss


class Seq2SeqTask(GPTTask):
    """Logs val/loss (target tokens), val/bleu, val/chrf (0-100, like sacreBLEU), val/bleu_best."""

    task_name = "seq2seq"
    summary_metrics = ("bleu", "chrf", "loss")
    default_eval_split = "test"

    def __init__(self, model_config, optimizer: dict, scheduler: dict,
                 aux_lm_weight: float = 0.0, label_smoothing: float = 0.0,
                 max_new_tokens: int = 64, beam_size: int = 1, bleu_tokenize: str = "13a",
                 **kwargs):
        super().__init__(model_config, optimizer, scheduler, **kwargs)
        if beam_size < 1:
            raise UserError(f"task.beam_size={beam_size} must be >= 1 (1 is greedy)")
        self.val_loss = MeanMetric()
        self.val_bleu = SacreBLEUScore(tokenize=bleu_tokenize)
        self.val_chrf = CHRFScore()
        self.val_bleu_best = MaxMetric()
        # Set by evaluate.py: decode with the beam and keep the outputs, by example index.
        self.evaluating = False
        self.hypotheses: dict[int, str] = {}

    def split_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token targets of the target side, and of the source side."""
        targets, on_target = batch["targets"], batch["target_mask"]
        return (targets.masked_fill(~on_target, IGNORE_INDEX),
                targets.masked_fill(on_target, IGNORE_INDEX))

    def batch_tokens(self, batch: dict) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def training_step(self, batch: dict, batch_idx: int):
        target_side, source_side = self.split_targets(batch)
        hidden = self.model(batch["input_ids"], return_hidden=True)
        if not self.hparams.aux_lm_weight:
            # Output logits only where the loss reads them: the LM head over the vocabulary
            # is a large share of the compute, and source positions are ~half the tokens.
            scored = target_side != IGNORE_INDEX
            logits = self.model.lm_head(hidden[scored])
            loss = lm_loss(logits, target_side[scored], self.hparams.label_smoothing)
            self.record(loss=loss)
            return loss
        logits = self.model.lm_head(hidden)
        target_loss = lm_loss(logits, target_side, self.hparams.label_smoothing)
        source_loss = lm_loss(logits, source_side)
        loss = target_loss + self.hparams.aux_lm_weight * source_loss
        self.record(loss=loss, target_loss=target_loss, lm_loss=source_loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        target_side, _ = self.split_targets(batch)
        loss = lm_loss(self.model(batch["input_ids"]), target_side)
        self.val_loss.update(loss, weight=(target_side != IGNORE_INDEX).sum())
        # Greedy in training's validations (fast); the configured beam in evaluate.py.
        hypotheses = self.decode(batch["prompts"], greedy=not self.evaluating)
        self.val_bleu.update(hypotheses, [[r] for r in batch["references"]])
        self.val_chrf.update(hypotheses, [[r] for r in batch["references"]])
        if self.evaluating:
            self.hypotheses |= dict(zip(batch["indices"], hypotheses, strict=True))

    def on_validation_epoch_end(self) -> None:
        p = self.eval_prefix
        bleu = 100 * self.val_bleu.compute()
        self.log_dict({f"{p}/loss": self.val_loss.compute(), f"{p}/bleu": bleu,
                       f"{p}/chrf": 100 * self.val_chrf.compute()}, prog_bar=p == "val")
        for metric in (self.val_loss, self.val_bleu, self.val_chrf):
            metric.reset()
        if p == "val" and self.trainer.state.fn == "fit":
            self.val_bleu_best.update(bleu)
            self.log("val/bleu_best", self.val_bleu_best.compute())
        self.log_progress()

    # -- decoding ------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, prompts: list[list[int]], greedy: bool = False) -> list[str]:
        """Target text for each prompt (source tokens + separator)."""
        eos = eos_id(self.tokenizer)
        outputs = self.model.generate(prompts, self.hparams.max_new_tokens, temperature=0.0,
                                      stop_token=eos,
                                      beam_size=1 if greedy else self.hparams.beam_size)
        return [self.tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids).strip()
                for ids in outputs]

    def translate(self, texts: list[str], batch_size: int = 64) -> list[str]:
        prompts = encode_sources(self.tokenizer, texts, self.model.config.block_size)
        outputs = []
        for start in range(0, len(prompts), batch_size):
            outputs += self.decode(prompts[start : start + batch_size])
        return outputs

    # -- evaluate.py ---------------------------------------------------------------------
    def evaluation_passes(self, datamodule, split: str) -> list[tuple[str, object]]:
        self.evaluating = True
        return super().evaluation_passes(datamodule, split)

    def evaluation_details(self) -> dict:
        return {"hypotheses": [self.hypotheses[i] for i in sorted(self.hypotheses)]}

    def report(self, results: dict[str, float], split: str) -> str:
        beam = self.hparams.beam_size
        how = "greedy" if beam == 1 else f"beam {beam}"
        return (f"{split}: BLEU {results[f'{split}/bleu']:.2f} (sacreBLEU, "
                f"{self.hparams.bleu_tokenize} tokenization), chrF {results[f'{split}/chrf']:.2f},"
                f" target-token loss {results[f'{split}/loss']:.4f}; decoding: {how}")
