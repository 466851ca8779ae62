"""Record formats of instruction / chat data, normalised to OpenAI-style ``messages``.

Detected per record (or forced with ``data.format=``):
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` (strings or message lists);
- ``messages``: OpenAI chat, ``{"messages": [{"role", "content", "tool_calls"?, ...}]}``;
- ``alpaca``: ``{"instruction", "input"?, "output"}``;
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}``.
"""

from __future__ import annotations

import json
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


ROLES = ("system", "user", "assistant", "tool", "developer")


def as_messages(value: Any, role: str, record: Record, field: str) -> list[Message]:
    """A field that is a string or a list of messages, as messages; ``None``, empty or a number is an error.

    ``str(None)`` would teach a model to answer "None"; a number where text belongs is
    almost always a column mix-up, so neither is converted silently."""
    if isinstance(value, list):
        return [dict(m) if isinstance(m, dict) else m for m in value]
    if value is None:
        raise DataError(f"field '{field}' is null (expected a string or a list of messages)",
                        source=record.source, location=record.location)
    if not isinstance(value, str):
        raise DataError(f"field '{field}' is {type(value).__name__} {value!r}, expected a string or a list of messages",
                        source=record.source, location=record.location)
    if not value.strip() and role == "assistant":
        raise DataError(f"field '{field}' is empty: nothing to learn", source=record.source, location=record.location)
    return [{"role": role, "content": value}]


def check_messages(messages: list[Message], record: Record, *, need_assistant: bool = True,
                   field: str = "messages") -> list[Message]:
    """Every message a mapping with a known ``role`` and string ``content`` (or tool calls), checked where read.

    Returns a normalised copy: content parts joined as text, tool-call arguments as objects."""
    messages = list(messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"{field}[{i}] has no 'role' (expected {{'role': ..., 'content': ...}})",
                            source=record.source, location=record.location)
        if message["role"] not in ROLES:
            raise DataError(f"{field}[{i}] has role {message['role']!r}, expected one of {', '.join(ROLES)}",
                            source=record.source, location=record.location)
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise DataError(f"{field}[{i}] ({message['role']}) has neither content nor tool_calls",
                            source=record.source, location=record.location)
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{field}[{i}] ({message['role']}) content is {type(content).__name__}, expected a string",
                            source=record.source, location=record.location)
        if isinstance(content, list):
            message = {**message, "content": text_of_parts(content, record, f"{field}[{i}]")}
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [_parse_arguments(c, record, f"{field}[{i}]")
                                                 for c in message["tool_calls"]]}
        messages[i] = message
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{field}: the conversation has no assistant message to learn from",
                        source=record.source, location=record.location)
    return messages


def text_of_parts(parts: list[Any], record: Record, field: str) -> str:
    """OpenAI / HF content parts (``[{"type": "text", "text": ...}]``) joined as the text they carry.

    Joined, not left as a list: most published templates print a list content as its
    Python repr. Any other part (an image, audio) is an error here: the text plugins have
    no encoder for it."""
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataError(f"{field} content part {j} is of type {kind!r}; this text-only plugin takes only "
                            "'text' parts", source=record.source, location=record.location,
                            hint="images belong to plugin=vlm; drop the non-text parts for a text model")
        texts.append(part["text"])
    return "".join(texts)


def _parse_arguments(call: Any, record: Record, field: str) -> Any:
    """A tool call whose ``arguments`` is a JSON string (OpenAI's wire format) gets them as an object.

    Templates print ``arguments | tojson``: a string would be quoted a second time, so the
    two spellings of the same call would train two different outputs."""
    if not isinstance(call, dict):
        return call
    function = call.get("function") if isinstance(call.get("function"), dict) else None
    holder = function if function is not None else call
    arguments = holder.get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as err:
        raise DataError(f"{field} tool call arguments are a string that is not JSON ({err.msg}): {arguments[:60]!r}",
                        source=record.source, location=record.location) from None
    holder = {**holder, "arguments": parsed}
    return {**call, "function": holder} if function is not None else holder


def _check(messages: list[Message], record: Record) -> list[Message]:
    return check_messages(messages, record)


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
            messages = as_messages(data["prompt"], "user", record, "prompt") + as_messages(
                data["completion"], "assistant", record, "completion")
        elif fmt == "alpaca":
            for key in ("instruction", "output"):
                if not isinstance(data[key], str):
                    raise DataError(f"field '{key}' is {type(data[key]).__name__}, expected a string",
                                    source=record.source, location=record.location)
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


def record_tools(record: Record) -> list[dict[str, Any]] | None:
    """The record's ``tools`` (JSON-schema function specs) for the chat template, or ``None``.

    Some datasets store the list as a JSON string; it is parsed here, once."""
    tools = record.data.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"field 'tools' is a string that is not JSON ({err.msg})", source=record.source,
                            location=record.location) from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError("field 'tools' must be a list of function specs ({'type': 'function', 'function': {...}})",
                        source=record.source, location=record.location)
    return tools


def fold_system(messages: list[Message]) -> list[Message]:
    """The system messages put in front of the first user turn (``data.system_prompt=fold``).

    For templates without a system role (Gemma 2 raises) or that drop it (Mistral v0.3
    keeps it only when the conversation ends on a user turn)."""
    system = [str(m.get("content") or "") for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if not system or first_user is None:
        return messages
    user = rest[first_user]
    rest[first_user] = {**user, "content": "\n\n".join(system + [str(user.get("content") or "")])}
    return rest
