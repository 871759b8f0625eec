"""The customer-service agent: a GPT that reads a conversation and writes the agent's turns.

Training reads conversations rendered as one sequence (data/dialogue.py) with the next-token
loss on the agent's turns only, its text replies and its API calls, markers and `<|end|>`
included: -sum over agent tokens of log P(x_t | x_<t). The customer's words and the APIs'
results are context (`aux_lm_weight` > 0 adds their LM loss, GPT-1's auxiliary objective).

Evaluation prompts the model with the true history before every agent turn and lets it write
the turn greedily (the one decoding loop of models/generation.py, batched), then compares it
with what the agent did:

- `call_exact_match`: of the turns where the agent called an API, the share where the model
  made the same call: same API and the same arguments as parsed JSON;
- `call_name_acc`: ... the share where it called the same API;
- `arg_f1`: ... the F1 of the arguments' (key path, value) pairs, averaged over those turns
  (a list's items are matched as a multiset; a turn without a call, or whose arguments are not
  JSON, scores 0);
- `call_precision`, `call_recall`: whether it called an API when it should have ("call"
  against "reply", call being the positive class);
- `bleu`, `chrf`: sacreBLEU's corpus BLEU and chrF (0-100) of the model's text against the
  agent's text on the turns where the agent replied (an API call there counts as empty text);
- `loss`, `ppl`: teacher-forced loss and perplexity on the agent's tokens.

A decoding constraint keeps every generated turn a turn: it starts with `<|agent|>` or
`<|call|>` and holds no other role marker before `<|end|>` (a logits processor). More
processors (e.g. a safety filter's) go in `extra_processors`. With `num_candidates` > 1 and a
`reranker` (a reward model's scorer), the model samples that many candidate turns and keeps
the best scored: best-of-n.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sacrebleu.metrics import BLEU, CHRF
from torchmetrics import MaxMetric, MeanMetric

from gptlab.data.dialogue import (
    AGENT,
    CALL,
    END,
    SPECIAL_TOKENS,
    AgentTurn,
    Turn,
    check_markers,
    encode_segments,
    history_start,
    parse_agent_turn,
)
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.data.tokenizers import EOS_TOKEN, SEP_TOKEN, Tokenizer
from gptlab.errors import UserError
from gptlab.models.generation import LogitsProcessor
from gptlab.tasks.base import GPTTask, lm_loss

# (contexts as rendered text, candidate turns as rendered text) -> a score per candidate
Reranker = Callable[[list[str], list[str]], list[float]]
GENERATION_BATCH = 64  # prompts decoded together (best-of-n: times num_candidates rows)
METRICS = ("call_exact_match", "call_name_acc", "arg_f1", "call_precision", "call_recall",
           "bleu", "chrf")


# -- scoring one generated turn ------------------------------------------------------------
def argument_pairs(value: Any, path: str = "") -> Counter:
    """The (key path, value) leaves of JSON arguments; list items share the path `key[]`."""
    if isinstance(value, dict):
        pairs: Counter = Counter()
        for key, item in value.items():
            pairs += argument_pairs(item, f"{path}.{key}" if path else str(key))
        return pairs
    if isinstance(value, list):
        pairs = Counter()
        for item in value:
            pairs += argument_pairs(item, f"{path}[]")
        return pairs
    return Counter({f"{path}={value!r}": 1})


def argument_f1(predicted: Any, reference: Any) -> float:
    """F1 of the argument leaves; two empty argument sets agree fully."""
    ours, theirs = argument_pairs(predicted), argument_pairs(reference)
    if not ours and not theirs:
        return 1.0
    common = sum((ours & theirs).values())
    if not common:
        return 0.0
    precision, recall = common / sum(ours.values()), common / sum(theirs.values())
    return 2 * precision * recall / (precision + recall)


def kind(turn: Turn | None) -> str:
    return "invalid" if turn is None else "call" if turn.role == "call" else "reply"


def turn_record(reference: Turn, output: str) -> dict:
    """How a generated turn (`output`, markers included) compares with the agent's."""
    predicted = parse_agent_turn(output)
    record = {"reference": reference.as_dict(), "output": output,
              "reference_kind": kind(reference), "predicted_kind": kind(predicted)}
    if reference.role == "call":
        is_call = predicted is not None and predicted.role == "call"
        parsed = is_call and predicted.data is not None
        record |= {
            "name_match": is_call and predicted.name == reference.name,
            "exact_match": parsed and predicted.name == reference.name
            and predicted.data == reference.data,
            "arg_f1": argument_f1(predicted.data, reference.data) if parsed else 0.0,
        }
    else:
        record["text"] = predicted.text if predicted is not None and predicted.role == "agent" \
            else ""
    return record


def dialogue_scores(records: list[dict]) -> dict[str, float]:
    """The metrics of the module docstring over turn records (0 where a metric has no turn)."""
    calls = [r for r in records if r["reference_kind"] == "call"]
    replies = [r for r in records if r["reference_kind"] == "reply"]
    predicted_calls = sum(r["predicted_kind"] == "call" for r in records)
    both = sum(r["predicted_kind"] == "call" for r in calls)

    def mean(key: str) -> float:
        return float(np.mean([float(r[key]) for r in calls])) if calls else 0.0

    scores = {"call_exact_match": mean("exact_match"), "call_name_acc": mean("name_match"),
              "arg_f1": mean("arg_f1"),
              "call_precision": both / predicted_calls if predicted_calls else 0.0,
              "call_recall": both / len(calls) if calls else 0.0}
    hypotheses = [r["text"] for r in replies]
    references = [[r["reference"]["text"] for r in replies]]
    scores["bleu"] = BLEU().corpus_score(hypotheses, references).score if replies else 0.0
    scores["chrf"] = CHRF().corpus_score(hypotheses, references).score if replies else 0.0
    return scores


def turn_grammar(tokenizer: Tokenizer) -> LogitsProcessor:
    """A logits processor that keeps a generated agent turn a turn: it starts with <|agent|>
    or <|call|>, and no other special token comes before <|end|>."""
    ids = {token: tokenizer.token_to_id(token) for token in (*SPECIAL_TOKENS, EOS_TOKEN, SEP_TOKEN)}
    starts = [ids[AGENT], ids[CALL]]
    inside = [i for token, i in ids.items() if i is not None and token != END]
    masks: dict[tuple, torch.Tensor] = {}

    def process(logits: torch.Tensor, tokens: torch.Tensor, prompt_index: torch.Tensor):
        first = tokens.size(1) == 0
        key = (first, logits.size(1), logits.device)
        if key not in masks:
            mask = torch.zeros(logits.size(1), dtype=torch.bool, device=logits.device)
            if first:
                mask[:] = True
                mask[starts] = False
            else:
                mask[inside] = True
            masks[key] = mask
        return logits.masked_fill(masks[key], float("-inf"))

    return process


class AgentTask(GPTTask):
    """Logs val/loss and val/ppl (agent tokens) and the generated turns' METRICS."""

    task_name = "agent"
    summary_metrics = ("call_exact_match", "call_name_acc", "arg_f1", "call_precision",
                       "call_recall", "bleu", "chrf", "loss")
    primary_metric = "call_exact_match"  # val/<this>_best is logged during training
    default_eval_split = "test"

    def __init__(self, model_config, optimizer: dict, scheduler: dict, max_new_tokens: int = 128,
                 aux_lm_weight: float = 0.0, val_turns: int | None = 300, **kwargs):
        super().__init__(model_config, optimizer, scheduler, **kwargs)
        if self.tokenizer is None:
            raise UserError("task=agent needs the tokenizer of its data (data=taskmaster4)")
        if val_turns is not None and val_turns < 1:
            raise UserError(f"task.val_turns={val_turns} must be >= 1, or null to generate "
                            f"every validation turn")
        self.end_id = check_markers(self.tokenizer, "this run")[END]
        self.grammar = turn_grammar(self.tokenizer)
        self.extra_processors: list[LogitsProcessor] = []  # e.g. a safety filter's
        self.reranker: Reranker | None = None  # best-of-n: set with num_candidates > 1
        self.num_candidates, self.sampling = 1, {"temperature": 1.0, "top_k": None, "top_p": None}
        self.sampling_seed, self.generator = 0, None  # candidates' sampling (torch.Generator)
        self.val_loss = MeanMetric()
        self.val_best = MaxMetric()
        self.val_best.persistent(True)  # a resumed run keeps its best so far
        self.records: list[dict] = []  # this validation's generated turns
        self.last_records: list[dict] = []  # the last validation's, for evaluate.py's report
        self.evaluating = False  # set by evaluate.py: generate every turn
        self.rerank_prefixes: set[str] = set()  # evaluation passes that decode best-of-n
        self.records_by_pass: dict[str, list[dict]] = {}  # evaluate.py's, by metric prefix
        self._sampled: dict[int, set[int]] = {}

    # -- training ------------------------------------------------------------------------
    def batch_tokens(self, batch: dict) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum()
                   + (batch["context_targets"] != IGNORE_INDEX).sum())

    def agent_loss(self, batch: dict) -> torch.Tensor:
        """Mean next-token loss on the agent's tokens (logits only where it reads them)."""
        hidden = self.model(batch["input_ids"], return_hidden=True)
        scored = batch["targets"] != IGNORE_INDEX
        return lm_loss(self.model.lm_head(hidden[scored]), batch["targets"][scored])

    def training_loss(self, batch: dict):
        if not self.hparams.aux_lm_weight:
            return self.agent_loss(batch), {}
        logits = self.model(batch["input_ids"])
        agent_loss = lm_loss(logits, batch["targets"])
        context_loss = lm_loss(logits, batch["context_targets"])
        loss = agent_loss + self.hparams.aux_lm_weight * context_loss
        return loss, {"agent_loss": agent_loss, "lm_loss": context_loss}

    # -- validation ----------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int):
        n_targets = (batch["targets"] != IGNORE_INDEX).sum()
        if n_targets:
            self.val_loss.update(self.agent_loss(batch), weight=n_targets)
        turns = [t for t in batch["turns"] if self._generates(t, batch["split_turns"])]
        if turns:
            outputs = self.next_turns([t.prompt for t in turns],
                                      best_of=self.eval_prefix in self.rerank_prefixes)
            self.records += [self.turn_result(turn, output) for turn, output in
                             zip(turns, outputs, strict=True)]

    def _generates(self, turn: AgentTurn, split_turns: int) -> bool:
        """Every turn in evaluate.py; in train.py's validations at most val_turns, evenly
        spread over the split (the same ones every time)."""
        limit = self.hparams.val_turns
        if self.evaluating or limit is None or split_turns <= limit:
            return True
        if split_turns not in self._sampled:
            self._sampled[split_turns] = set(
                np.linspace(0, split_turns - 1, limit).round().astype(int).tolist())
        return turn.index in self._sampled[split_turns]

    @staticmethod
    def turn_result(turn: AgentTurn, output: str) -> dict:
        return {"conversation_id": turn.conversation_id, "turn": turn.turn,
                **turn_record(turn.reference, output)}

    def on_validation_epoch_end(self) -> None:
        p = self.eval_prefix
        records = sorted(self.gather_list(self.records),
                         key=lambda r: (r["conversation_id"], r["turn"]))
        self.records, self.last_records = [], records
        loss = self.val_loss.compute()
        self.val_loss.reset()
        scores = dialogue_scores(records)
        self.log_dict({f"{p}/loss": loss, f"{p}/ppl": torch.exp(loss)}
                      | {f"{p}/{name}": value for name, value in scores.items()},
                      prog_bar=p == "val")
        if self.fitting_validation():
            self.val_best.update(scores[self.primary_metric])
            self.log(f"val/{self.primary_metric}_best", self.val_best.compute())
        self.log_progress()

    def final_eval_scope(self) -> str:
        limit = self.hparams.val_turns
        return super().final_eval_scope() + (f", at most {limit} turns generated" if limit else "")

    # -- generation ----------------------------------------------------------------------
    def processors(self) -> list[LogitsProcessor]:
        return [self.grammar, *self.extra_processors]

    @torch.no_grad()
    def next_turns(self, prompts: list[list[int]], best_of: bool = False) -> list[str]:
        """The agent's next turn after each prompt (history tokens), as text with its markers:
        greedy, or with `best_of` the best of num_candidates sampled turns."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        # Prompts of similar length together (less padding), a bounded number at a time.
        for start in range(0, len(order), GENERATION_BATCH):
            rows = order[start : start + GENERATION_BATCH]
            chunk = [prompts[i] for i in rows]
            texts = self._best_of(chunk) if best_of else self._greedy(chunk)
            for i, text in zip(rows, texts, strict=True):
                outputs[i] = text
        return outputs

    def _greedy(self, prompts: list[list[int]]) -> list[str]:
        outputs = self.model.generate(prompts, self.hparams.max_new_tokens, temperature=0.0,
                                      stop_token=self.end_id, processors=self.processors())
        return [self.tokenizer.decode(ids) for ids in outputs]

    def _best_of(self, prompts: list[list[int]]) -> list[str]:
        if self.reranker is None or self.num_candidates < 2:
            raise UserError("best-of-n needs num_candidates >= 2 and rerank=<reward run>")
        n = self.num_candidates
        repeated = [prompt for prompt in prompts for _ in range(n)]
        device = self.model.wte.weight.device
        if self.generator is None or self.generator.device != device:  # seeded once per device
            self.generator = torch.Generator(device=device).manual_seed(self.sampling_seed)
        outputs = self.model.generate(repeated, self.hparams.max_new_tokens,
                                      stop_token=self.end_id, processors=self.processors(),
                                      generator=self.generator, **self.sampling)
        candidates = [self.tokenizer.decode(ids) for ids in outputs]
        contexts = [self.tokenizer.decode(prompt) for prompt in repeated]
        scores = np.asarray(self.reranker(contexts, candidates)).reshape(len(prompts), n)
        return [candidates[i * n + int(best)] for i, best in enumerate(scores.argmax(1))]

    def prompt(self, history: list[Turn]) -> list[int]:
        """The tokens before the agent's next turn: the history, oldest turns dropped to leave
        max_new_tokens of the context for the turn."""
        segments = encode_segments(self.tokenizer, [history])[0]
        tokens = [token for segment in segments for token in segment]
        starts = np.concatenate([[0], np.cumsum([len(s) for s in segments], dtype=np.int64)])
        limit = self.model.config.block_size - self.hparams.max_new_tokens
        return tokens[history_start(starts, len(segments), limit):]

    def respond(self, history: list[Turn], best_of: bool = False) -> tuple[Turn | None, str]:
        """The agent's next turn after a conversation (parsed; None if it is not a turn) and
        the generated text."""
        if not history:
            raise UserError("the agent answers a conversation: give it at least one turn")
        output = self.next_turns([self.prompt(history)], best_of)[0]
        return parse_agent_turn(output), output

    def use_reranker(self, reranker: Reranker, num_candidates: int, sampling: dict,
                     seed: int) -> None:
        """Best-of-n from here on where asked: sample num_candidates turns (`sampling`:
        temperature, top_k, top_p) and keep the one `reranker` scores highest."""
        if num_candidates < 2:
            raise UserError(f"num_candidates={num_candidates}: best-of-n reranking needs at "
                            f"least 2 candidates")
        if sampling.get("temperature", 1.0) <= 0:
            raise UserError("best-of-n samples its candidates: set temperature > 0")
        self.reranker, self.num_candidates, self.sampling = reranker, num_candidates, sampling
        self.sampling_seed, self.generator = seed, None

    # -- evaluate.py ---------------------------------------------------------------------
    def evaluation_passes(self, datamodule, split: str) -> list[tuple[str, object]]:
        """Greedy on every turn; then, with a reranker, best-of-n on every turn."""
        self.evaluating = True
        passes = [(split, datamodule.eval_dataloader(split))]
        if self.reranker is not None:
            prefix = f"{split}_best_of_{self.num_candidates}"
            self.rerank_prefixes.add(prefix)
            passes.append((prefix, datamodule.eval_dataloader(split)))
        return passes

    def on_validation_end(self) -> None:
        super().on_validation_end()
        if self.evaluating:
            self.records_by_pass[self.eval_prefix] = self.last_records

    def evaluation_details(self) -> dict:
        return {"turns": self.records_by_pass}

    def report(self, results: dict[str, float], split: str) -> str:
        prefixes = [p for p in (split, *sorted(self.rerank_prefixes)) if f"{p}/loss" in results]
        lines = [f"{split}: every agent turn generated after the true history "
                 f"({self._counts(self.records_by_pass[split])})",
                 f"{'decoding':<20} " + " ".join(f"{m:>16}" for m in (*METRICS, "loss", "ppl"))]
        for p in prefixes:
            what = "greedy" if p == split else p.removeprefix(f"{split}_").replace("_", " ")
            lines.append(f"{what:<20} " + " ".join(
                f"{results[f'{p}/{m}']:>16.4f}" for m in (*METRICS, "loss", "ppl")))
        lines.append("call_*, arg_f1: 0-1 over the turns with an API call; bleu, chrf: "
                     "sacreBLEU 0-100 over the text replies; loss, ppl: agent tokens")
        return "\n".join(lines)

    @staticmethod
    def _counts(records: list[dict]) -> str:
        calls = sum(r["reference_kind"] == "call" for r in records)
        return f"{len(records)} turns: {calls} API calls, {len(records) - calls} text replies"

