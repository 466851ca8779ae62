"""``guess_number``: a two-turn guessing game with "higher" / "lower" feedback.

The secret is the record's ``answer`` when it is a number (the arithmetic demo prompts: the policy's first answer
is its guess), else a number in ``[low, high]`` drawn from the prompt's text (the same for every episode of a
prompt, so a group compares like with like). The first turn's right guess earns 1, the second's 0.5; a wrong
guess is told "higher" or "lower" (a user turn) until ``max_turns`` guesses are spent.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping

from modalforge.rl.environment import Environment, Message

NUMBER = re.compile(r"-?\d+")


class GuessNumberEnvironment(Environment):
    def __init__(self, max_turns: int = 2, low: int = 0, high: int = 9, rewards: tuple[float, ...] = (1.0, 0.5)) -> None:
        super().__init__()
        self.max_turns, self.low, self.high, self.rewards = max_turns, low, high, tuple(rewards)
        self.secret, self.turn = 0, 0

    def reset(self, record: Mapping[str, Any]) -> list[Message]:
        self.turn = 0
        try:
            self.secret = int(float(str(record.get("answer"))))
            return []
        except (TypeError, ValueError):
            seed = int(hashlib.sha256(str(record.get("prompt")).encode()).hexdigest()[:8], 16)
            self.secret = self.low + seed % (self.high - self.low + 1)
            return [{"role": "user", "content": f"Guess my number between {self.low} and {self.high}."}]

    def step(self, message: Message) -> tuple[list[Message] | None, float, bool]:
        self.turn += 1
        found = NUMBER.findall(str(message.get("content") or ""))
        reward = self.rewards[min(self.turn, len(self.rewards)) - 1] if self.turn <= len(self.rewards) else 0.0
        if found and int(found[-1]) == self.secret:
            return None, reward, True
        if self.turn >= self.max_turns:
            return None, 0.0, True
        hint = "No number. Guess again." if not found else ("Higher." if int(found[-1]) < self.secret else "Lower.")
        return [{"role": "user", "content": hint}], 0.0, False
