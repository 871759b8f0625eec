"""Summarization: text-to-text fine-tuning (either architecture) scored with ROUGE.

Training is `Seq2SeqTask`'s. Validation scores the decoded summaries with ROUGE-1, ROUGE-2 and
ROUGE-L F-measure, x100, as Google's `rouge_score` package computes them with Porter stemming
(its default tokenizer: lowercase, letters and digits), averaged over the examples:

- `rouge1`, `rouge2`, `rougeL`: against each example's target (for AESLC the subject its
  sender wrote, the PEGASUS convention);
- `rouge1_ann`, `rouge2_ann`, `rougeL_ann`, where the data has extra references (AESLC's three
  annotators' subjects, the AESLC paper's convention): per example and per metric separately,
  the best F-measure over those references (`RougeScorer.score_multi`), then averaged.

evaluate.py also scores a lead baseline the same way: the source's first n words, n the
median length in words of the references it is compared with.
"""

from __future__ import annotations

import statistics
from importlib.metadata import version

from rouge_score.rouge_scorer import RougeScorer
from rouge_score.tokenizers import DefaultTokenizer

from gptlab.tasks.seq2seq import Seq2SeqTask

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(outputs: list[str], references: list[str] | list[list[str]]) -> dict[str, float]:
    """Mean ROUGE F-measure x100 by type; a list of references per output scores the best."""
    scorer = RougeScorer(list(ROUGE_TYPES), tokenizer=DefaultTokenizer(use_stemmer=True))
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for output, reference in zip(outputs, references, strict=True):
        scores = (scorer.score_multi(reference, output) if isinstance(reference, list)
                  else scorer.score(reference, output))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100 * total / max(1, len(outputs)) for name, total in totals.items()}


def lead(text: str, n_words: int) -> str:
    return " ".join(text.split()[:n_words])


def median_words(texts: list[str]) -> int:
    return max(1, round(statistics.median(len(t.split()) for t in texts)))


class SummarizationTask(Seq2SeqTask):
    """Logs val/loss (target tokens), val/rouge{1,2,L} and, with annotations, val/rouge*_ann."""

    task_name = "summarize"
    summary_metrics = ("rouge1", "rouge2", "rougeL", "loss")
    primary_metric = "rouge1"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.baselines: dict[str, dict[str, float]] = {}  # of the last evaluation

    def reset_collected(self) -> None:
        super().reset_collected()
        self.sources: list[str] = []
        self.annotations: list[list[str]] = []

    collected = (*Seq2SeqTask.collected, "sources", "annotations")

    def collect(self, hypotheses: list[str], batch: dict) -> None:
        super().collect(hypotheses, batch)
        self.sources += batch["sources"]
        self.annotations += batch.get("annotations") or []

    @property
    def annotated(self) -> bool:
        """Whether every example of this validation has extra references (AESLC's train has
        none, its dev and test three each)."""
        return bool(self.annotations) and all(self.annotations)

    def corpus_scores(self) -> dict[str, float]:
        if self.evaluating:
            self.baselines = self.reference_points()
        scores = rouge(self.outputs, self.references)
        self.signatures["rouge"] = (f"rouge_score {version('rouge-score')}, F-measure x100, "
                                    f"Porter stemmer, mean over {len(self.outputs)} examples")
        if self.annotated:
            scores |= {f"{name}_ann": value for name, value in
                       rouge(self.outputs, self.annotations).items()}
            self.signatures["rouge_ann"] = "best of each example's annotations, per metric"
        return scores

    def reference_points(self) -> dict[str, dict[str, float]]:
        """What the model's scores stand beside: lead baselines, and the targets themselves
        scored against the annotations (how close two people's summaries come)."""
        n = median_words(self.references)
        points = {f"lead-{n} vs target": rouge([lead(s, n) for s in self.sources],
                                                self.references)}
        if self.annotated:
            m = median_words([a for extra in self.annotations for a in extra])
            points[f"lead-{m} vs annotations"] = rouge([lead(s, m) for s in self.sources],
                                                        self.annotations)
            points["target vs annotations"] = rouge(self.references, self.annotations)
        return points

    def evaluation_details(self) -> dict:
        return super().evaluation_details() | {"reference_points": self.baselines}

    def report(self, results: dict[str, float], split: str) -> str:
        rows = [("model vs target", {name: results[f"{split}/{name}"] for name in ROUGE_TYPES})]
        if f"{split}/rouge1_ann" in results:
            rows.append(("model vs annotations (best)",
                         {name: results[f"{split}/{name}_ann"] for name in ROUGE_TYPES}))
        rows += list(self.baselines.items())
        lines = [f"{split}: ROUGE F x100 ({self.signatures['rouge']}); decoding: "
                 f"{self.decoding()}; target-token loss {results[f'{split}/loss']:.4f}",
                 f"{'':<30} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}"]
        lines += [f"{what:<30} " + " ".join(f"{scores[name]:>8.2f}" for name in ROUGE_TYPES)
                  for what, scores in rows]
        return "\n".join(lines)
