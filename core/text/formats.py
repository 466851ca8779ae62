"""Record formats of instruction / chat data, normalised to OpenAI-style ``messages``.

Detected per record (or forced with ``data.format=``):
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` (strings or message lists);
- ``messages``: OpenAI chat, ``{"messages": [{"role", "content", "tool_calls"?, ...}]}``;
- ``alpaca``: ``{"instruction", "input"?, "output"}``;
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}``;
- ``dolly``: ``{"instruction", "context"?, "response"}`` (databricks-dolly-15k);
- ``oasst``: OpenAssistant message trees, one message per row (``message_id``, ``parent_id``,
  ``role``, ``text``, ``rank``) or a whole tree per record (``{"prompt": {..., "replies": [...]}}``),
  flattened by :mod:`~modalforge.text.oasst`;
- ``pretokenized``: ``{"input_ids", "labels"?, "attention_mask"?}``, used as they are by the caller.

A record that fits two formats is an error, not a guess. A message may carry ``train: false``
or ``weight: 0`` (axolotl's per-message flags): :func:`train_flags` reads them.

Empty values / truncated media / duplicates / mixed types: ``null`` where text belongs, and a
blank answer (a completion, an output, an assistant turn without tool calls, unless masked), are
errors naming the record; a blank prompt or user turn is kept (a completion from nothing is a
record some datasets mean). No media here. Repeated records are kept (the data modules count them).
A number where text belongs (a prompt, a content, a ShareGPT value) is an error, never ``str()``'d:
it is almost always a column mix-up.
"""

from __future__ import annotations

import json
from typing import Any

from modalforge.data.errors import DataError
from modalforge.data.readers import Record

FORMATS = ("prompt_completion", "messages", "alpaca", "sharegpt", "dolly", "oasst", "pretokenized")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "system": "system", "tool": "tool", "function_call": "assistant",
                  "observation": "tool", "function": "tool"}
Message = dict[str, Any]
#: Per-message keys that say whether the message is learned; never passed to the template.
FLAG_KEYS = ("train", "weight")


def is_oasst_row(data: dict[str, Any]) -> bool:
    """One message of an OASST tree (the Hub's row layout)."""
    return "message_id" in data and "parent_id" in data and "role" in data and ("text" in data or "content" in data)


def is_oasst_tree(data: dict[str, Any]) -> bool:
    """A whole OASST tree in one record (the ``*.trees.jsonl`` export)."""
    return isinstance(data.get("prompt"), dict) and "replies" in data["prompt"]


def formats_of(data: dict[str, Any]) -> list[str]:
    """Every format whose fields the record has (more than one is ambiguous)."""
    found = []
    if isinstance(data.get("messages"), list):
        found.append("messages")
    if isinstance(data.get("conversations"), list):
        found.append("sharegpt")
    if "instruction" in data and "output" in data:
        found.append("alpaca")
    if "instruction" in data and "response" in data:
        found.append("dolly")
    if "prompt" in data and "completion" in data:
        found.append("prompt_completion")
    if is_oasst_row(data) or is_oasst_tree(data):
        found.append("oasst")
    if isinstance(data.get("input_ids"), list):
        found.append("pretokenized")
    return found


def detect_format(data: dict[str, Any]) -> str | None:
    """The record's format, or ``None`` when it fits none or several (:func:`formats_of` says which)."""
    found = formats_of(data)
    return found[0] if len(found) == 1 else None


def resolve_format(record: Record, fmt: str | None = None) -> str:
    """``fmt`` (``data.format``) checked, or the one format the record fits; else one error naming the
    record and the formats tried (or the formats it fits ambiguously)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"data.format={fmt!r} is not one of: {', '.join(FORMATS)}", source=record.source,
                            location=record.location)
        return fmt
    found = formats_of(record.data)
    keys = sorted(k for k in record.data if not k.startswith("__"))
    if not found:
        raise DataError(f"record fits none of the formats {', '.join(FORMATS)} (keys present: {keys}); "
                        "set data.format= to force one, or data.columns= to map its fields",
                        source=record.source, location=record.location)
    if len(found) > 1:
        raise DataError(f"record fits the formats {' and '.join(found)} ambiguously (keys present: {keys})",
                        source=record.source, location=record.location,
                        hint=f"set data.format= to one of {', '.join(found)}, or drop the other fields")
    return found[0]


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
        if _empty_answer(message):
            raise DataError(f"{field}[{i}] (assistant) is empty: it would teach the model to answer nothing",
                            source=record.source, location=record.location,
                            hint="fill it in, drop the record, or mask the turn with train: false")
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [_parse_arguments(c, record, f"{field}[{i}]")
                                                 for c in message["tool_calls"]]}
        messages[i] = message
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{field}: the conversation has no assistant message to learn from",
                        source=record.source, location=record.location)
    return messages


def _empty_answer(message: Message) -> bool:
    """A learned assistant turn with blank text and no tool calls (masked turns may be blank)."""
    if message["role"] != "assistant" or message.get("tool_calls") or message.get("train") is False \
            or message.get("weight") == 0:
        return False
    return isinstance(message.get("content"), str) and not message["content"].strip()


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
                            hint="images need a vision-language plugin; drop the non-text parts for a text model")
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
    """The record as a ``messages`` list, or a ``DataError`` naming file, line and the formats tried.

    Messages keep their ``train`` / ``weight`` flags (:func:`train_flags` takes them off)."""
    data = record.data
    fmt = resolve_format(record, fmt)
    try:
        if fmt == "messages":
            messages = [dict(m) if isinstance(m, dict) else m for m in data["messages"]]
        elif fmt == "prompt_completion":
            messages = as_messages(data["prompt"], "user", record, "prompt") + as_messages(
                data["completion"], "assistant", record, "completion")
        elif fmt in ("alpaca", "dolly"):
            extra, answer = ("input", "output") if fmt == "alpaca" else ("context", "response")
            for key in ("instruction", answer):
                if not isinstance(data[key], str):
                    raise DataError(f"field '{key}' is {type(data[key]).__name__}, expected a string",
                                    source=record.source, location=record.location)
            if data.get(extra) is not None and not isinstance(data[extra], str):
                raise DataError(f"field '{extra}' is {type(data[extra]).__name__}, expected a string",
                                source=record.source, location=record.location)
            prompt = data["instruction"] + (f"\n\n{data[extra]}" if data.get(extra) else "")
            messages = ([{"role": "system", "content": data["system"]}] if data.get("system") else []) + [
                {"role": "user", "content": prompt},
                *as_messages(data[answer], "assistant", record, answer)]
        elif fmt == "sharegpt":
            messages = []
            for turn in data["conversations"]:
                role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
                if role is None:
                    raise DataError(f"sharegpt turn with unknown 'from': {turn.get('from')!r} "
                                    f"(expected one of {sorted(SHAREGPT_ROLES)}; data.roles= maps others)",
                                    source=record.source, location=record.location)
                messages.append({"role": role, "content": turn.get("value"),
                                 **{k: turn[k] for k in FLAG_KEYS if k in turn}})
        elif fmt == "oasst":
            from modalforge.text.oasst import tree_paths

            if not is_oasst_tree(data):
                raise DataError("an OASST message row is one message of a tree: a conversation data module joins the "
                                "rows of a file into conversations (join_rows)", source=record.source, location=record.location)
            paths = tree_paths(data["prompt"], record, "best")
            if not paths:
                raise DataError("this OASST tree has no assistant reply", source=record.source,
                                location=record.location)
            messages = paths[0]
        else:
            raise DataError("a pre-tokenised record (input_ids) has no messages: it is trained as it is",
                            source=record.source, location=record.location)
    except KeyError as err:
        raise DataError(f"format {fmt!r} needs field {err.args[0]!r}; keys present: {sorted(data)}",
                        source=record.source, location=record.location) from None
    return _check(messages, record)


def train_flags(messages: list[Message], record: Record) -> tuple[list[Message], list[bool]]:
    """(the messages without their ``train`` / ``weight`` keys, whether each assistant message is learned).

    ``train: false`` or ``weight: 0`` masks an assistant message (it stays in the context);
    any other weight would be a loss weight, which is not supported, so it is an error, as is
    asking to learn a message that is not the assistant's."""
    clean, learn = [], []
    for i, message in enumerate(messages):
        flags = {k: message[k] for k in FLAG_KEYS if k in message}
        keep = True
        if "train" in flags and flags["train"] is not None:
            if not isinstance(flags["train"], bool):
                raise DataError(f"messages[{i}] 'train' is {flags['train']!r}, expected true or false",
                                source=record.source, location=record.location)
            keep = flags["train"]
        if "weight" in flags and flags["weight"] is not None:
            weight = flags["weight"]
            if isinstance(weight, bool) or weight not in (0, 1):
                raise DataError(f"messages[{i}] 'weight' is {weight!r}: only 0 (not learned) or 1 (learned) are "
                                "supported", source=record.source, location=record.location)
            keep = keep and weight == 1
        if message["role"] == "assistant":
            learn.append(keep)
        if message["role"] != "assistant" and flags.get("train") is True:
            raise DataError(f"messages[{i}] ({message['role']}) has train: true; only assistant messages are "
                            "learned", source=record.source, location=record.location)
        clean.append({k: v for k, v in message.items() if k not in FLAG_KEYS})
    return clean, learn


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
