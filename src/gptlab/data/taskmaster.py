"""Taskmaster-4 (Byrne & Ganesh, 2024): coffee-ordering conversations with the agent's API
calls, and reward examples (a context, a candidate next agent turn, good or bad).

`data/*.json` holds 3,710 conversations. The agent's API calls ride, as annotations, on the
customer's utterance before the agent's reply: `api_call` (the API's name), `request` (its
JSON arguments), `api_response` and `response` (the JSON result), in order, paired by their
`context` (`api_call_N`, `api_response_N`). They become turns in that order: the customer's
words, then call, result, call, result, ..., then the agent's reply. 70 of the 30,715 JSON
values double their quotes (`""latte-5252""`) and one holds a raw tab; they are repaired
(`parse_json`), and a value that still does not parse is an error naming the conversation.

`reward/*.json` holds 3,228 examples (2,775 good, 453 bad), each from a conversation of its
own (none of them in `data/`), in another layout: turns `{role: agent, text}`,
`{role: agent, api: {name: arguments}}`, `{role: api, response: {name: result}}` and
`{role: user, text}`; they are read into the same turns.

There is no official split: a stable hash of `conversation_id` puts each conversation, with
all its turns, in train, val or test (`split_of`). Files come from the data mirror or the
repository (sources.TASKMASTER4, sha256-checked). CC BY 4.0, Google LLC.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.data import sources
from gptlab.data.dialogue import RENDERING_VERSION, SPECIAL_TOKENS, Turn, render
from gptlab.data.documents import Text, digest
from gptlab.errors import UserError

SPLITS = ("train", "val", "test")
_DOUBLED_QUOTES = re.compile(r'""([^"]+)""')
_TRAILING_DOUBLE_QUOTE = re.compile(r'(\w)""(?=\s*[,}\]])')
_DECODER = json.JSONDecoder(strict=False)  # strict=False: a raw tab inside a string


def split_of(conversation_id: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a conversation: a uniform number from the sha256 of its id."""
    u = int(hashlib.sha256(conversation_id.encode()).hexdigest()[:16], 16) / 2**64
    if u < 1 - val_fraction - test_fraction:
        return "train"
    return "val" if u < 1 - test_fraction else "test"


def parse_json(value: str, where: str) -> Any:
    """A JSON value of the corpus, repaired where its writers doubled quotes."""
    try:
        return _DECODER.decode(value)
    except json.JSONDecodeError:
        pass
    try:
        return _DECODER.decode(_TRAILING_DOUBLE_QUOTE.sub(r'\1"', _DOUBLED_QUOTES.sub(r'"\1"',
                                                                                   value)))
    except json.JSONDecodeError:
        pass
    raise UserError(f"{where}: {value[:60]!r}... is not JSON, even repaired; replace the file "
                    f"with the corpus's own copy")


def conversation_turns(raw: dict, where: str) -> list[Turn]:
    """The turns of one conversation of `data/*.json` (see the module docstring)."""
    turns = []
    for utterance in raw["utterances"]:
        if utterance["speaker"] == "assistant":
            turns.append(Turn("agent", text=utterance["text"].strip()))
            continue
        turns.append(Turn("customer", text=utterance["text"].strip()))
        calls: dict[str, dict] = {}
        for note in utterance.get("annotations") or []:
            number = note["context"].rsplit("_", 1)[-1]
            calls.setdefault(number, {})[note["name"]] = note["value"]
        for number, call in calls.items():
            here = f"{where} call {number}"
            arguments = parse_json(call["request"], here) if "request" in call else {}
            turns.append(Turn("call", name=call["api_call"], data=arguments))
            if "response" in call:
                turns.append(Turn("result", data=parse_json(call["response"], here)))
    return turns


def reward_turn(raw: dict, where: str) -> Turn:
    """One turn of a reward example's context or candidate (see the module docstring)."""
    if raw.get("role") == "user":
        return Turn("customer", text=raw["text"].strip())
    if raw.get("role") == "agent" and "text" in raw:
        return Turn("agent", text=raw["text"].strip())
    payload = raw.get("api") if raw.get("role") == "agent" else raw.get("response")
    if not isinstance(payload, dict) or len(payload) != 1:
        raise UserError(f"{where}: {str(raw)[:80]} is not a turn of the reward examples' layout; "
                        f"replace the file with the corpus's own copy")
    ((name, data),) = payload.items()
    return Turn("call", name=name, data=data) if raw["role"] == "agent" else Turn(
        "result", data=data)


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: list[Turn]


@dataclass(frozen=True)
class RewardExample:
    conversation_id: str
    context: list[Turn]
    candidate: Turn
    good: bool


class _Files:
    """The corpus files of one kind (`data` or `reward`), from the mirror or a download."""

    def __init__(self, kind: str, download_dir: str | None, val_fraction: float,
                 test_fraction: float):
        if min(val_fraction, test_fraction) <= 0 or val_fraction + test_fraction >= 1:
            raise UserError(f"data.source.val_fraction={val_fraction} and test_fraction="
                            f"{test_fraction} must be > 0 and sum to less than 1, e.g. 0.05 each")
        folder = f"taskmaster4/{kind}/"
        self.files = [f for f in sources.TASKMASTER4 if f.relpath.startswith(folder)]
        self.download_dir = Path(download_dir) if download_dir else None
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    @property
    def splits(self) -> list[str]:
        return list(SPLITS)

    def records(self) -> Iterator[tuple[dict, str]]:
        """Every record of every file, with where it is (for error messages)."""
        for file in self.files:
            path = sources.locate(file, None, self.download_dir)
            try:
                records = json.loads(sources.read_text(path))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} is not JSON ({exc.msg}, line {exc.lineno}); delete it "
                                f"to download it again, or fix the mirror copy") from None
            for i, record in enumerate(records):
                yield record, f"{path} record {i} ({record.get('conversation_id')})"

    def split(self, conversation_id: str) -> str:
        return split_of(conversation_id, self.val_fraction, self.test_fraction)


class Taskmaster4(_Files):
    """The conversations of one split, as turns (data.source of data=taskmaster4)."""

    def __init__(self, download_dir: str | None = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05):
        super().__init__("data", download_dir, val_fraction, test_fraction)
        self._by_split: dict[str, list[Conversation]] | None = None

    def examples(self, split: str) -> list[Conversation]:
        if self._by_split is None:
            self._by_split = {name: [] for name in SPLITS}
            for record, where in self.records():
                conversation = Conversation(record["conversation_id"],
                                            conversation_turns(record, where))
                self._by_split[self.split(conversation.id)].append(conversation)
        return self._by_split[split]


class Taskmaster4Rewards(_Files):
    """The reward examples of one split (data.source of data=taskmaster4_reward)."""

    def __init__(self, download_dir: str | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1):
        super().__init__("reward", download_dir, val_fraction, test_fraction)

    def examples(self, split: str) -> list[RewardExample]:
        out = []
        for record, where in self.records():
            if self.split(record["conversation_id"]) != split:
                continue
            context = [reward_turn(t, where) for t in parse_json(record["context"], where)]
            candidate = reward_turn(parse_json(record["generation"], where), where)
            out.append(RewardExample(record["conversation_id"], context, candidate,
                                     float(record["reward"]) > 0.5))
        return out


class Taskmaster4Text:
    """The conversations, rendered as the agent reads them, as a pretraining corpus (the
    data.source of data=taskmaster4_text): one document per conversation, in the split that
    data=taskmaster4 gives it, and the role markers as special tokens of its tokenizer."""

    single_document = False
    split_names = {split: split for split in SPLITS}
    special_tokens = SPECIAL_TOKENS

    def __init__(self, download_dir: str | None = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05):
        self.conversations = Taskmaster4(download_dir, val_fraction, test_fraction)

    def fingerprint(self) -> str:
        source = self.conversations
        return digest(["Taskmaster4Text", [f.sha256 for f in source.files], source.val_fraction,
                       source.test_fraction, RENDERING_VERSION, SPECIAL_TOKENS])

    def documents(self) -> Iterator[Text]:
        for split in SPLITS:
            for conversation in self.conversations.examples(split):
                yield Text(render(conversation.turns), split)

    def size(self) -> None:
        return None
