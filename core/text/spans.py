"""Where each assistant turn lies in the rendering of the whole conversation.

Published templates are not prefix-stable: Qwen3 drops earlier reasoning, DeepSeek-R1's
generation prompt ends in ``<think>\\n`` that the rendered answer lacks, Phi-3 closes a
conversation with ``<|endoftext|>``, Mistral v0.3 moves the system prompt. Slicing turn
by turn therefore trains text the template never renders. Here the conversation is
rendered once, as the model will see it, and each assistant message's slot is found by
rendering it again with two sentinel contents ``S1``/``S2``: the text that changes is the
message's own, and the identity ``T_i == T[:start] + a + S_i + b + T[end:]`` (``a``/``b``
sentinel-independent) proves it. Anything else is refused, never guessed. The learned span
then grows back to where the generation prompt ends and forward over the end-of-turn marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from modalforge.text.formats import Message

#: ASCII (survives JSON and HTML escaping), no whitespace (survives ``trim``), distinct first and last characters
S1, S2 = "Qmfsentinel1x", "Zmfsentinel2y"
#: End-of-turn markers of the published families; the learned span stops after the first one.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>",
               "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|end_of_text|>", "<|END_OF_TURN_TOKEN|>", "<|return|>",
               "<|call|>")


class SpanError(Exception):
    """The template's rendering of an assistant message could not be located exactly."""


Render = Callable[[list[Message], bool], str]


@dataclass
class Slot:
    start: int  # first character that depends on the message
    end: int  # one past the last
    tail: str  # sentinel-independent template text after the last sentinel (``b``)


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix (binary search on slices: C-speed compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_suffix(a: str, b: str) -> int:
    return common_prefix(a[::-1], b[::-1])


def with_sentinel(message: Message, sentinel: str) -> Message:
    """``message`` with its content (after any ``</think>``) and tool-call names and arguments replaced."""
    out = dict(message)
    content = message.get("content")
    if isinstance(content, str) and (content or not message.get("tool_calls")):
        keep = content[: content.rindex("</think>") + len("</think>")] if "</think>" in content else ""
        out["content"] = keep + sentinel
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                call = {**call, "function": {**call["function"], "name": sentinel, "arguments": {"mf": sentinel}}}
            elif isinstance(call, dict):
                call = {**call, "name": sentinel, "arguments": {"mf": sentinel}}
            calls.append(call)
        out["tool_calls"] = calls
    return out


def _template_only(text: str, specials: list[str]) -> bool:
    for token in specials:
        text = text.replace(token, "")
    return not text.strip()


def find_slot(full: str, first: str, second: str, *, specials: list[str], markers: tuple[str, ...],
              has_tool_calls: bool) -> Slot:
    """The characters of ``full`` that depend on one message, given its two sentinel renderings."""
    p = min(common_prefix(full, first), common_prefix(full, second))
    q = min(common_suffix(full, first), common_suffix(full, second))
    q = min(q, len(full) - p, len(first) - p, len(second) - p)
    mid1, mid2 = first[p:len(first) - q], second[p:len(second) - q]
    if S1 not in mid1:
        raise SpanError("the template does not render this message's tool calls" if has_tool_calls else
                        "the template does not render this message's content")
    if mid1.replace(S1, S2) != mid2 or mid2.replace(S2, S1) != mid1:
        raise SpanError("the message's rendering depends on its content in more than one place")
    pieces = mid1.split(S1)
    if not has_tool_calls and (len(pieces) != 2 or not all(_template_only(x, specials) for x in pieces)):
        raise SpanError("the template renders the message's content with other text around it")
    if any(m in piece for piece in pieces[1:-1] for m in markers):
        raise SpanError("the message's tool calls are rendered across more than one turn")
    return Slot(p, len(full) - q, pieces[-1])


def first_marker_end(text: str, markers: tuple[str, ...]) -> int | None:
    found = [i + len(m) for m in markers if (i := text.find(m)) >= 0]
    return min(found) if found else None


def assistant_spans(render: Render, messages: list[Message], full: str, *, specials: list[str],
                    markers: tuple[str, ...]) -> list[tuple[int, int]]:
    """Character spans of ``full`` to learn: each assistant turn, from the end of its generation
    prompt (what the model sees before it speaks) to its end-of-turn marker."""
    if S1 in full or S2 in full:
        raise SpanError("the conversation contains modalforge's sentinel text")
    spans: list[tuple[int, int]] = []
    previous_end = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        variants = [messages[:k] + [with_sentinel(message, s)] + messages[k + 1:] for s in (S1, S2)]
        first, second = render(variants[0], False), render(variants[1], False)
        try:
            slot = find_slot(full, first, second, specials=specials, markers=markers,
                             has_tool_calls=bool(message.get("tool_calls")))
        except SpanError as err:
            raise SpanError(f"message {k}: {err}") from None
        start = _generation_start(render, messages, k, full, slot.start)
        # the turn's closing: what follows the message when it is last, as far as ``full`` agrees
        alone = first if k == len(messages) - 1 else render(variants[0][: k + 1], False)
        at = alone.rfind(S1) + len(S1)
        rest = full[slot.end:]
        if S1 in alone and alone[at:].startswith(slot.tail):
            closing = rest[:common_prefix(alone[at + len(slot.tail):], rest)]
        else:  # rendered otherwise when last: only a marker right after the slot is the turn's own
            closing = rest[:len(rest) - len(rest.lstrip())]
            closing += next((m for m in markers if rest[len(closing):].startswith(m)), "")
        cut = first_marker_end(closing, markers)
        end = slot.end + (cut if cut is not None else len(closing.rstrip()))
        start = max(start, previous_end)
        if slot.start < previous_end or end < start:
            raise SpanError(f"assistant message {k} overlaps the previous one in the rendering")
        spans.append((start, end))
        previous_end = end
    return spans


def _generation_start(render: Render, messages: list[Message], k: int, full: str, slot_start: int) -> int:
    """Where message ``k``'s turn starts to be the model's output: after the generation prompt's
    part that ``full`` renders (DeepSeek's ``<think>\\n`` is not), else at its slot."""
    if k == 0:
        return slot_start
    try:
        prompt = render(messages[:k], True)
    except Exception:  # noqa: BLE001 - a prefix the template refuses: the slot is all we know
        return slot_start
    m = min(common_prefix(prompt, full), slot_start)
    if m == len(prompt):
        return m
    try:
        without = render(messages[:k], False)
    except Exception:  # noqa: BLE001
        return slot_start
    generation = len(prompt) - common_prefix(prompt, without)
    return m if len(prompt) - m <= generation else slot_start


def added_tokens(tokenizer: Any) -> list[str]:
    """Added / special token strings, longest first (they are template text, never content)."""
    tokens = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    tokens |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((t for t in tokens if t), key=len, reverse=True)
