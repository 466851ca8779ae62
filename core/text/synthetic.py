"""Offline demo data of the alignment plugins: arithmetic questions with checkable answers.

SFT gets instructions in every supported record format (so the demo also exercises
format detection), a few multi-turn chats and tool calls; DPO and the reward model
get (prompt, right answer, wrong answer) pairs; KTO gets unpaired labelled answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice(list(OPS))
    return f"What is {a} {op} {b}?", OPS[op](a, b)


def sft_record(rng: random.Random) -> dict:
    q, answer = question(rng)
    style = rng.random()
    if style < 0.3:
        return {"prompt": q, "completion": str(answer)}
    if style < 0.5:
        return {"instruction": q, "output": str(answer)}
    if style < 0.6:
        return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": str(answer)}]}
    if style < 0.7:  # multi-turn
        q2, answer2 = question(rng)
        return {"messages": [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": q},
                             {"role": "assistant", "content": str(answer)}, {"role": "user", "content": q2},
                             {"role": "assistant", "content": str(answer2)}]}
    if style < 0.75:  # a tool call and its result
        return {"messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": q[8:-1]}}}]},
            {"role": "tool", "content": str(answer)},
            {"role": "assistant", "content": str(answer)}]}
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": str(answer)}]}


def wrong(answer: int, rng: random.Random) -> int:
    return answer + rng.choice([-3, -2, -1, 1, 2, 3, 10])


def preference_record(rng: random.Random) -> dict:
    q, answer = question(rng)
    return {"prompt": q, "chosen": str(answer), "rejected": str(wrong(answer, rng))}


def kto_record(rng: random.Random) -> dict:
    q, answer = question(rng)
    good = rng.random() < 0.5
    return {"prompt": q, "completion": str(answer if good else wrong(answer, rng)), "label": good}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def write_alignment_sets(folder: Path, *, num_train: int = 3000, num_val: int = 200, seed: int = 0) -> None:
    """``sft_{train,val}.jsonl``, ``pairs_{train,val}.jsonl`` and ``kto_{train,val}.jsonl`` in ``folder``."""
    rng = random.Random(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        write_jsonl(folder / f"sft_{split}.jsonl", [sft_record(rng) for _ in range(count)])
        write_jsonl(folder / f"pairs_{split}.jsonl", [preference_record(rng) for _ in range(count)])
        write_jsonl(folder / f"kto_{split}.jsonl", [kto_record(rng) for _ in range(count)])
