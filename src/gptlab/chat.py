"""A conversation with an agent run in the terminal: the customer types, the agent answers.

`python generate.py run=<agent run> chat=true [responses=<file.json>]`. Every line read from
standard input is a customer turn (a blank line is skipped; `/quit` ends the conversation).
After each, the agent writes its next turns until it replies in text: an API call is shown
and answered from the canned responses, else by asking for the result (one line of JSON,
from the same input). With piped input the whole conversation is scripted: customer lines
and, where the file has no answer, result lines, in the order the agent needs them.

Canned responses (`responses=`) are a JSON object from API name to result:

    {"get_menu_items": {"menu_items": [{"menu_item_id": "latte-1", "name": "Latte"}]},
     "add_order_item": [{"order_id": "7", "order_item_id": "1"},
                        {"order_id": "7", "order_item_id": "2"}]}

A list gives one result per call, in order, its last result answering any later call; to
answer with a list itself, wrap it in a list of one. The entry "*" answers every API that the
file does not name.

Generation-time features plug in twice: the generation runs the agent's logits processors
(`AgentTask.extra_processors`, e.g. a filter that bans token sequences) and every text reply
goes through `postprocess`, a list of functions text -> text (e.g. one that replaces unsafe
text by a refusal) before it is shown and enters the history. With `num_candidates` and a
`rerank` reward run, every agent turn is the best scored of that many samples.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from gptlab.data.dialogue import Turn, compact_json
from gptlab.data.sources import read_text
from gptlab.errors import UserError
from gptlab.tasks.agent import AgentTask

QUIT = ("/quit", "/exit")
ANY_API = "*"  # the canned responses' entry for any API they do not name
PostProcess = Callable[[str], str]


class CannedResponses:
    """API results by API name, from a JSON file (see the module docstring)."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.results: dict[str, list] = {}
        if path is None:
            return
        if not Path(path).is_file():
            raise UserError(f"responses={path} does not exist; give a JSON file of API results "
                            f"by API name, or leave responses unset to be asked for each result")
        try:
            data = json.loads(read_text(Path(path)))
        except json.JSONDecodeError as exc:
            raise UserError(f"responses={path} is not JSON ({exc.msg}, line {exc.lineno}); fix "
                            f"the file") from None
        if not isinstance(data, dict):
            raise UserError(f"responses={path} must hold a JSON object from API name to result, "
                            f"e.g. {{\"finish_order\": {{\"success\": true}}}}")
        self.results = {name: list(value) if isinstance(value, list) and value else [value]
                        for name, value in data.items()}

    def answer(self, call: Turn) -> tuple[bool, Any]:
        """(whether the file answers this call, its result); lists are used up in order."""
        queue = self.results.get(call.name) or self.results.get(ANY_API)
        if not queue:
            return False, None
        return True, queue.pop(0) if len(queue) > 1 else queue[0]


class Chat:
    """One conversation: customer lines in, the agent's turns out (see the module docstring)."""

    def __init__(self, agent: AgentTask, responses: CannedResponses, lines: Iterator[str],
                 out: TextIO = sys.stdout, postprocess: list[PostProcess] | None = None,
                 best_of: bool = False, max_calls: int = 8, interactive: bool = False):
        self.agent, self.responses, self.lines, self.out = agent, responses, lines, out
        self.postprocess = list(postprocess or [])
        self.best_of, self.max_calls, self.interactive = best_of, max_calls, interactive
        self.history: list[Turn] = []

    def run(self) -> list[Turn]:
        """Talk until the input ends or the customer types /quit; the conversation's turns."""
        while (line := self._read("customer> ")) is not None:
            text = line.strip()
            if not text:
                continue
            if text in QUIT:
                break
            if not self.interactive:
                self._show(f"customer: {text}")
            self.history.append(Turn("customer", text=text))
            self.agent_turns()
        return self.history

    def agent_turns(self) -> None:
        """The agent's turns up to its text reply (or max_calls API calls in a row)."""
        for _ in range(self.max_calls):
            turn, output = self.agent.respond(self.history, self.best_of)
            if turn is None:
                self._show(f"agent: (no valid turn: {output!r}; your turn)")
                return
            if turn.role == "agent":
                reply = Turn("agent", text=self._postprocessed(turn.text))
                self.history.append(reply)
                self._show(f"agent: {reply.text}")
                return
            self._show(f"[API call] {turn.name} "
                       f"{turn.text if turn.data is None else compact_json(turn.data)}")
            result = self._result(turn)
            self._show(f"[API result] {compact_json(result)}")
            self.history += [turn, Turn("result", data=result)]
        self._show(f"(the agent made {self.max_calls} API calls in a row without replying; "
                   f"your turn)")

    def _postprocessed(self, text: str) -> str:
        for step in self.postprocess:
            text = step(text)
        return text

    def _result(self, call: Turn) -> Any:
        """The call's result: from the canned responses, else asked for (one line of JSON)."""
        known, result = self.responses.answer(call)
        if known:
            return result
        while True:
            line = self._read(f"result of {call.name} (JSON)> ")
            if line is None:
                raise UserError(f"the input ended while the agent waited for the result of "
                                f"{call.name}; add a line of JSON for it, or give its result in "
                                f"responses=<file>")
            try:
                return json.loads(line)
            except json.JSONDecodeError as exc:
                if not self.interactive:
                    raise UserError(f"the result given for {call.name} is not JSON ({exc.msg}): "
                                    f"{line.strip()[:60]!r}; write one line of JSON") from None
                self._show(f"not JSON ({exc.msg}); try again")

    def _read(self, prompt: str) -> str | None:
        if self.interactive:
            self.out.write(prompt)
            self.out.flush()
        return next(self.lines, None)

    def _show(self, text: str) -> None:
        print(text, file=self.out, flush=True)
