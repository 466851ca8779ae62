"""Record formats of instruction / chat data, normalised to OpenAI-style ``messages``.

Detected per record (or forced with ``data.format=``):
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` (strings or message lists);
- ``messages``: OpenAI chat, ``{"messages": [{"role", "content", "tool_calls"?, ...}]}``;
- ``alpaca``: ``{"instruction", "input"?, "output"}``;
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}``.
"""

from __future__ import annotations

from typing import Any

from modalforge.data.errors import DataError
from modalforge.data.readers import Record

FORMATS = ("prompt_completion", "messages", "alpaca", "sharegpt")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "system": "system", "tool": "tool", "function_call": "assistant",
                  "observation": "tool", "function": "tool"}
Message = dict[str, Any]


def detect_format(data: dict[str, Any]) -> str | None:
    if isinstance(data.get("messages"), list):
        return "messages"
    if isinstance(data.get("conversations"), list):
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    return None


def _as_messages(value: Any, role: str) -> list[Message]:
    return list(value) if isinstance(value, list) else [{"role": role, "content": str(value)}]


def _check(messages: list[Message], record: Record) -> list[Message]:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"message {i} has no 'role' (expected {{'role': ..., 'content': ...}})",
                            source=record.source, location=record.location)
        if message.get("content") is None and not message.get("tool_calls"):
            raise DataError(f"message {i} ({message['role']}) has neither content nor tool_calls",
                            source=record.source, location=record.location)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("the conversation has no assistant message to learn from",
                        source=record.source, location=record.location)
    return messages


def to_messages(record: Record, fmt: str | None = None) -> list[Message]:
    """The record as a ``messages`` list, or a ``DataError`` naming file, line and the formats tried."""
    data = record.data
    fmt = fmt or detect_format(data)
    if fmt is None or fmt not in FORMATS:
        raise DataError(f"record fits none of the formats {', '.join(FORMATS)} (keys present: {sorted(data)}); "
                        "set data.format= to force one", source=record.source, location=record.location)
    try:
        if fmt == "messages":
            messages = [dict(m) for m in data["messages"]]
        elif fmt == "prompt_completion":
            messages = _as_messages(data["prompt"], "user") + _as_messages(data["completion"], "assistant")
        elif fmt == "alpaca":
            prompt = data["instruction"] + (f"\n\n{data['input']}" if data.get("input") else "")
            messages = ([{"role": "system", "content": data["system"]}] if data.get("system") else []) + [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": data["output"]}]
        else:
            messages = []
            for turn in data["conversations"]:
                role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
                if role is None:
                    raise DataError(f"sharegpt turn with unknown 'from': {turn.get('from')!r} "
                                    f"(expected one of {sorted(SHAREGPT_ROLES)})",
                                    source=record.source, location=record.location)
                messages.append({"role": role, "content": turn.get("value")})
    except KeyError as err:
        raise DataError(f"format {fmt!r} needs field {err.args[0]!r}; keys present: {sorted(data)}",
                        source=record.source, location=record.location) from None
    return _check(messages, record)


def split_prompt(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """(everything before the last assistant turn, the final assistant turn(s))."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] != "assistant") if any(
        m["role"] != "assistant" for m in messages) else -1
    return messages[: last_user + 1], messages[last_user + 1:]
