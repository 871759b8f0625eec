"""Conversations between a customer and an agent that calls APIs, as one token sequence.

A conversation is a list of turns: the customer's words, the agent's text replies, the agent's
API calls and the APIs' results. It is rendered as one sequence with a role marker before
every turn; the agent's turns (its replies and its calls) end with `<|end|>`, so a model that
generates the agent's next turn starts with `<|agent|>` (reply) or `<|call|>` (API call) and
stops at `<|end|>`:

    <|customer|>one chai latte please<|call|>get_menu_items {"query":"chai latte"}<|end|>
    <|result|>{"menu_items":[{"menu_item_id":"chai-latte-1928","name":"Chai Latte"}]}
    <|agent|>Anything else?<|end|><|customer|>...

(one line here, no newlines in the sequence). Call arguments and results stay JSON, written
compactly with the keys sorted, so one value has one spelling and a call can be compared
exactly. The markers are special tokens of the tokenizer (one id each).

Training reads a conversation in windows of at most the context length that start at a turn
(the oldest turns dropped when a conversation is longer), with the loss on the agent's tokens;
evaluation prompts the model with the true history before each agent turn, cut the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gptlab.data.finetune import PAD_ID, FinetuneDataModule, pad
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import UserError

log = logging.getLogger("gptlab")

CUSTOMER, AGENT, CALL, RESULT = "<|customer|>", "<|agent|>", "<|call|>", "<|result|>"
END = "<|end|>"  # ends each agent turn (reply or call): where generation stops
MARKERS = {"customer": CUSTOMER, "agent": AGENT, "call": CALL, "result": RESULT}
SPECIAL_TOKENS = (CUSTOMER, AGENT, CALL, RESULT, END)
AGENT_ROLES = ("agent", "call")  # the turns the agent produces (and the loss is on)
RENDERING_VERSION = 1  # changes whenever render() would write another sequence


@dataclass(frozen=True)
class Turn:
    """One turn: `customer` or `agent` (text), `call` (API name + arguments), `result` (data).

    `data` is parsed JSON: a call's arguments or an API's result. A generated call whose
    arguments do not parse keeps them as the raw string in `text` and None in `data`.
    """

    role: str
    text: str = ""
    name: str = ""
    data: Any = None

    def as_dict(self) -> dict:
        """For JSON reports: only the fields that the role uses."""
        if self.role == "call":
            return {"role": "call", "name": self.name, "arguments": self.data,
                    **({"unparsed": self.text} if self.data is None else {})}
        if self.role == "result":
            return {"role": "result", "data": self.data}
        return {"role": self.role, "text": self.text}


def compact_json(value: Any) -> str:
    """The one spelling of a JSON value: no spaces, keys sorted, non-ASCII kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def without_markers(text: str) -> str:
    """Text with every marker removed, so typed or quoted text cannot fake a turn."""
    for marker in SPECIAL_TOKENS:
        text = text.replace(marker, "")
    return text


def render_turn(turn: Turn) -> str:
    if turn.role == "customer":
        return CUSTOMER + without_markers(turn.text)
    if turn.role == "result":
        return RESULT + compact_json(turn.data)
    if turn.role == "agent":
        return AGENT + without_markers(turn.text) + END
    if turn.role == "call":
        arguments = turn.text if turn.data is None else compact_json(turn.data)
        return f"{CALL}{turn.name} {arguments}{END}"
    raise ValueError(f"unknown role {turn.role!r}")


def render(turns: list[Turn]) -> str:
    return "".join(render_turn(turn) for turn in turns)


def parse_agent_turn(text: str) -> Turn | None:
    """The agent turn a model generated (`<|call|>name {json}<|end|>` or `<|agent|>text<|end|>`),
    or None when it is neither."""
    body = text.removesuffix(END)
    if body.startswith(AGENT):
        return Turn("agent", text=body[len(AGENT):].strip())
    if not body.startswith(CALL):
        return None
    name, _, arguments = body[len(CALL):].strip().partition(" ")
    try:
        data = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return Turn("call", text=arguments, name=name)
    return Turn("call", name=name, data=data if data is not None else {})


def check_markers(tokenizer: Tokenizer, where: str) -> dict[str, int]:
    """The id of every marker; a tokenizer without them cannot hold a conversation."""
    ids = {marker: tokenizer.token_to_id(marker) for marker in SPECIAL_TOKENS}
    missing = [marker for marker, i in ids.items() if i is None]
    if missing:
        raise UserError(
            f"the tokenizer of {where} has no {', '.join(missing)} token(s), the role markers of "
            f"a conversation; train one on the conversations (data.tokenizer=bpe, no "
            f"task.init_from) or start from a run pretrained on data=taskmaster4_text"
        )
    return ids


# -- a conversation as token segments -------------------------------------------------------
def encode_segments(tokenizer: Tokenizer, conversations: list[list[Turn]]) -> list[list[list[int]]]:
    """Every turn's tokens, per conversation (markers are special tokens, so the turns'
    tokens concatenate to those of the whole rendered conversation)."""
    flat = tokenizer.encode_batch([render_turn(t) for turns in conversations for t in turns])
    out, at = [], 0
    for turns in conversations:
        out.append(flat[at : at + len(turns)])
        at += len(turns)
    return out


def history_start(starts: np.ndarray, i: int, limit: int) -> int:
    """Where the history before segment i begins when it may hold at most `limit` tokens:
    the oldest whole turns are dropped; if even the last turn is longer, its end is kept."""
    fits = np.nonzero(starts[i] - starts[: i + 1] <= limit)[0]
    first = int(fits[0])
    return int(starts[first]) if first < i else max(0, int(starts[i]) - limit)


def training_windows(lengths: list[int], scored: list[bool],
                     limit: int) -> list[tuple[int, int, list[int]]]:
    """(first token, end token, scored segments) of windows of at most `limit` tokens that
    score every scored segment once, each window starting at a turn.

    A window scores its first scored segment, after up to half a window of history (so that
    windows advance by about half their length), and every later one that ends inside it; a
    segment longer than a whole window is scored up to the window's end.
    """
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    todo = [j for j, s in enumerate(scored) if s]
    windows = []
    while todo:
        first = todo[0]
        begin = history_start(starts, first, max(0, min(limit - lengths[first], limit // 2)))
        end = min(int(starts[-1]), begin + limit)
        here = [first] + [j for j in todo[1:] if starts[j + 1] <= end]
        windows.append((begin, end, here))
        todo = [j for j in todo if j > here[-1]]
    return windows


class AgentTurn:
    """An agent turn to generate: the true history before it (cut to fit) and the truth.

    A plain class, not a dataclass: Lightning moves batches to the device by rebuilding every
    dataclass in them, which a frozen `Turn` refuses (and which would copy them for nothing).
    """

    __slots__ = ("prompt", "reference", "conversation_id", "turn", "index")

    def __init__(self, prompt: list[int], reference: Turn, conversation_id: str, turn: int,
                 index: int):
        self.prompt, self.reference = prompt, reference
        self.conversation_id = conversation_id
        self.turn = turn  # index of the turn in its conversation
        self.index = index  # number of the agent turn in its split


def conversation_rows(conversation_id: str, turns: list[Turn], segments: list[list[int]],
                      block_size: int, prompt_limit: int, first_index: int) -> list[dict]:
    """A conversation's training windows, each with the agent turns whose loss it carries
    (`agent_mask`: which next-token targets are theirs), their generation prompts, and which
    targets are the context's (`context_mask`: customer and API tokens)."""
    lengths = [len(s) for s in segments]
    tokens = [token for segment in segments for token in segment]
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    owner = np.repeat(np.arange(len(segments)), lengths)  # the segment of every token
    agent = [t.role in AGENT_ROLES for t in turns]
    rows, index = [], first_index
    for begin, end, scored in training_windows(lengths, agent, block_size + 1):
        row_turns = []
        for j in (j for j in scored if j > 0):  # a conversation's first turn has no history
            prompt = tokens[history_start(starts, j, prompt_limit) : int(starts[j])]
            row_turns.append(AgentTurn(prompt, turns[j], conversation_id, j, index))
            index += 1
        targets_of = owner[begin + 1 : end]
        rows.append({"sequence": tokens[begin:end], "input_ids": tokens[begin : end - 1],
                     "agent_mask": np.isin(targets_of, scored).tolist(),
                     "context_mask": (~np.asarray(agent)[targets_of]).tolist(),
                     "turns": row_turns})
    return rows


def split_rendered(text: str) -> list[str]:
    """A rendered conversation cut before every role marker: its turns' texts."""
    cuts = sorted({i for marker in MARKERS.values() for i in _find_all(text, marker)} | {0})
    return [text[a:b] for a, b in zip(cuts, [*cuts[1:], len(text)], strict=True) if b > a]


def _find_all(text: str, marker: str) -> list[int]:
    found, at = [], text.find(marker)
    while at != -1:
        found.append(at)
        at = text.find(marker, at + 1)
    return found


def scored_input(context: list[list[int]], candidate: list[int], block_size: int) -> list[int]:
    """A reward model's input: the candidate turn (cut to half the context) after as much of
    the history as fits, oldest turns dropped first."""
    candidate = candidate[: block_size // 2]
    tokens = [token for segment in context for token in segment]
    starts = np.concatenate([[0], np.cumsum([len(s) for s in context], dtype=np.int64)])
    begin = history_start(starts, len(context), block_size - len(candidate))
    return tokens[begin:] + candidate


class DialogueDataModule(FinetuneDataModule):
    """Shared by the agent and reward data: a tokenizer with the role markers."""

    special_tokens = SPECIAL_TOKENS

    @property
    def tokenizer(self) -> Tokenizer:
        tokenizer = super().tokenizer
        where = ("task.init_from" if isinstance(self.tokenizer_spec, Tokenizer)
                 else f"data.tokenizer={self.tokenizer_spec}")
        check_markers(tokenizer, where)
        return tokenizer


class AgentDataModule(DialogueDataModule):
    """Conversations (`source.examples(split)`: objects with `id` and `turns`) as training
    windows with the loss on the agent's turns, and the agent turns to generate.

    `max_turn_tokens`: the longest agent turn; generation stops there, and the history before
    a turn is cut to block_size - max_turn_tokens tokens (oldest turns first).
    """

    def __init__(self, *args, max_turn_tokens: int = 128, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= max_turn_tokens <= self.block_size // 2:
            raise UserError(f"data.max_turn_tokens={max_turn_tokens} must be between 1 and half "
                            f"the context ({self.block_size // 2}), leaving room for history")
        self.max_turn_tokens = max_turn_tokens

    def task_arguments(self) -> dict:
        return {"max_new_tokens": self.max_turn_tokens}

    def tokenizer_texts(self) -> list[str]:
        return [render(conversation.turns) for conversation in self.examples("train")]

    def encode(self, split: str) -> list[dict]:
        conversations = self.examples(split)
        segments = encode_segments(self.tokenizer, [c.turns for c in conversations])
        rows, turns = [], 0
        for conversation, conversation_segments in zip(conversations, segments, strict=True):
            rows += conversation_rows(conversation.id, conversation.turns, conversation_segments,
                                      self.block_size, self.block_size - self.max_turn_tokens,
                                      turns)
            turns = sum(len(r["turns"]) for r in rows)
        if len(rows) > len(conversations):
            log.info("%d of %d %s conversations of '%s' are longer than block_size=%d tokens: "
                     "read in %d windows that drop their oldest turns", sum(
                         len(s) > 0 and sum(map(len, s)) > self.block_size + 1 for s in segments),
                     len(conversations), split, self.name, self.block_size, len(rows))
        for row in rows:
            row["split_turns"] = turns
        return rows

    def collate(self, rows: list[dict]) -> dict:
        """Inputs, next-token targets of the agent's turns scored here, and of the context."""
        sequences = pad([r["sequence"] for r in rows], IGNORE_INDEX)
        targets = sequences[:, 1:]
        agent = pad([r["agent_mask"] for r in rows], 0).bool()
        context = pad([r["context_mask"] for r in rows], 0).bool()
        return {
            "input_ids": sequences[:, :-1].masked_fill(sequences[:, :-1] == IGNORE_INDEX, PAD_ID),
            "targets": targets.masked_fill(~agent, IGNORE_INDEX),
            "context_targets": targets.masked_fill(~context, IGNORE_INDEX),
            "turns": [turn for r in rows for turn in r["turns"]],
            "split_turns": rows[0]["split_turns"],
        }


class RewardDataModule(DialogueDataModule):
    """Reward examples (`source.examples(split)`: objects with `context`, `candidate` turns and
    `good`): the rendered history then the candidate turn, labeled good (1) or bad (0)."""

    def task_arguments(self) -> dict:
        good = sum(example.good for example in self.examples("train"))
        return {"class_counts": [len(self.examples("train")) - good, good]}

    def tokenizer_texts(self) -> list[str]:
        return [render([*e.context, e.candidate]) for e in self.examples("train")]

    def encode(self, split: str) -> list[dict]:
        examples = self.examples(split)
        contexts = encode_segments(self.tokenizer, [e.context for e in examples])
        candidates = self.tokenizer.encode_batch([render_turn(e.candidate) for e in examples])
        return [{"input_ids": scored_input(context, candidate, self.block_size),
                 "label": int(example.good), "index": i}
                for i, (example, context, candidate) in enumerate(
                    zip(examples, contexts, candidates, strict=True))]

    def collate(self, rows: list[dict]) -> dict:
        return {
            "input_ids": pad([r["input_ids"] for r in rows]),
            "lengths": torch.tensor([len(r["input_ids"]) for r in rows]),
            "labels": torch.tensor([r["label"] for r in rows], dtype=torch.float),
            "indices": [r["index"] for r in rows],
        }
