"""Tokenise a conversation with its chat template and a mask of the tokens to learn.

The input ids are exactly ``tokenizer.apply_chat_template(messages, tools=tools)``: the
whole conversation is rendered once and tokenised once. The mask comes from the
template's ``{% generation %}`` blocks where it has them, else from
:func:`~modalforge.text.spans.assistant_spans`, which locates every
assistant message in that one rendering with sentinel renderings and checks the
result. Assistant turns are learned from the end of the generation prompt to their
end-of-turn marker (the header ``<|im_start|>assistant`` is prompt; the newline after
``<|im_end|>`` is not learned); ``train_on="all"`` learns every token. A template that
raises, or whose rendering cannot be located exactly, is a ``DataError`` naming the
record: never a silently different token sequence.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from modalforge.data.errors import DataError
from modalforge.text.formats import Message
from modalforge.text.spans import END_MARKERS, S1, SpanError, added_tokens, assistant_spans, common_prefix

log = logging.getLogger(__name__)

IGNORE = -100
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_HINTS = {"alternate": "this template needs user/assistant turns to alternate: merge consecutive turns of one "
                       "role, or choose another template with data.chat_template=",
          "system role": "this template has no system role: set data.system_prompt=fold to fold the system prompt "
                         "into the first user turn"}


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _template_name(tokenizer: Any) -> str:
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    return f"the chat template of {name}" if name and len(name) < 80 else "the chat template"


def render(tokenizer: Any, messages: list[Message], generation_prompt: bool = False, *,
           tools: list[dict[str, Any]] | None = None, where: str | None = None) -> str:
    """``apply_chat_template`` as text; a template that raises is one ``DataError`` line naming the record."""
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja2 TemplateError (raise_exception), TypeError, KeyError...
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        lowered = text.lower()
        hint = next((h for key, h in _HINTS.items() if key in lowered), None)
        raise DataError(f"{_template_name(tokenizer)} refused this conversation: {text}", source=where,
                        hint=hint) from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _markers(tokenizer: Any) -> tuple[str, ...]:
    eos = getattr(tokenizer, "eos_token", None)
    return tuple(dict.fromkeys(END_MARKERS + ((eos,) if eos else ())))


def _label_spans(tokenizer: Any, full: str, spans: list[tuple[int, int]], where: str | None) -> Tokenized:
    """Token ids of ``full`` and labels where a token overlaps a learned character span."""
    if not getattr(tokenizer, "is_fast", False):  # no offsets: tokenise the pieces and check they add up
        ids, labels, at = [], [], 0
        for start, end in spans:
            prompt, learned = _encode(tokenizer, full[at:start]), _encode(tokenizer, full[start:end])
            ids += prompt + learned
            labels += [IGNORE] * len(prompt) + learned
            at = end
        rest = _encode(tokenizer, full[at:])
        ids, labels = ids + rest, labels + [IGNORE] * len(rest)
        if ids != _encode(tokenizer, full):
            raise DataError("this (slow) tokenizer tokenises the assistant turns differently alone than in the "
                            "whole conversation; use its fast version", source=where)
        return Tokenized(ids, labels)
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, i = encoding["input_ids"], [], 0
    spans = [span for span in spans if span[1] > span[0]]
    for token, (s, e) in zip(ids, encoding["offset_mapping"]):
        while i < len(spans) and spans[i][1] <= s:
            i += 1
        inside = i < len(spans) and (e > spans[i][0] if e > s else s >= spans[i][0])
        labels.append(token if inside else IGNORE)
    return Tokenized(list(ids), labels)


def tokenize_conversation(tokenizer: Any, messages: list[Message], *, train_on: str = "assistant",
                          tools: list[dict[str, Any]] | None = None, where: str | None = None,
                          learn: list[bool] | None = None) -> Tokenized:
    """Token ids (``apply_chat_template`` of the whole conversation) and labels (``-100`` where nothing is learned).

    ``learn``: per assistant message, whether it is learned (all by default; a message-level
    ``train: false`` masks one, located by its span)."""
    full = render(tokenizer, messages, tools=tools, where=where)
    for message in messages:
        content = message.get("content")
        if message["role"] == "system" and isinstance(content, str) and content.strip() not in full:
            raise DataError(f"{_template_name(tokenizer)} drops the system message of this conversation", source=where,
                            hint="set data.system_prompt=fold to fold it into the first user turn")
    if train_on == "all":
        ids = _encode(tokenizer, full)
        return Tokenized(ids, list(ids))
    template = _template_text(tokenizer, tools)
    if template and _GENERATION.search(template) and (learn is None or all(learn)):
        try:
            out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        except Exception as err:  # noqa: BLE001 - e.g. a slow tokenizer (no offsets)
            raise DataError(f"{_template_name(tokenizer)}: its {{% generation %}} mask failed: {err}",
                            source=where) from None
        ids = list(out["input_ids"])
        mask = _through_end_marker(tokenizer, ids, list(out["assistant_masks"]))
        return Tokenized(ids, [t if m else IGNORE for t, m in zip(ids, mask)])
    try:
        spans = assistant_spans(lambda m, g: render(tokenizer, m, g, tools=tools, where=where), messages, full,
                                specials=added_tokens(tokenizer), markers=_markers(tokenizer))
    except SpanError as err:
        raise DataError(f"{_template_name(tokenizer)}: {err}; refusing rather than training tokens the template "
                        "does not render", source=where,
                        hint="choose a template that renders it, e.g. data.chat_template=chatml") from None
    if learn is not None:
        spans = [span for span, keep in zip(spans, learn, strict=True) if keep]
    return _label_spans(tokenizer, full, spans, where)


def _through_end_marker(tokenizer: Any, ids: list[int], mask: list[int]) -> list[int]:
    """A ``{% generation %}`` span that stops short of its end-of-turn marker learns the marker too.

    Some published templates close the block before ``<|im_end|>`` (LLaVA-OneVision's): trained so, a
    model never learns to end its turn. The marker right after a span is the turn's own, as the
    sentinel path learns it; a marker already inside the span is left as it is.
    """
    markers = {tokenizer.convert_tokens_to_ids(m) for m in _markers(tokenizer) if m in added_tokens(tokenizer)}
    markers.discard(getattr(tokenizer, "unk_token_id", None))
    out = list(mask)
    for i in range(1, len(ids)):
        if mask[i - 1] and not mask[i] and ids[i] in markers:
            out[i] = 1
    return out


def _template_text(tokenizer: Any, tools: Any) -> str | None:
    try:
        return tokenizer.get_chat_template(None, tools)
    except Exception:  # noqa: BLE001 - no template: render() has already said so
        return getattr(tokenizer, "chat_template", None)


def tokenize_prompt(tokenizer: Any, messages: list[Message], *, tools: list[dict[str, Any]] | None = None,
                    where: str | None = None) -> list[int]:
    """The prompt with the assistant header, ready for generation or a completion."""
    prompt = render(tokenizer, messages, True, tools=tools, where=where)
    _warn_if_prompted_otherwise(tokenizer, messages, prompt, tools)
    return _encode(tokenizer, prompt)


_CHECKED: set[str] = set()  # templates already checked (once per process: the answer is the template's)


def generation_prompt_divergence(tokenizer: Any, messages: list[Message], prompt: str,
                                 tools: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
    """``(prompted, trained)`` where the template's generation prompt differs from how it renders an answer's start.

    Answers are learned in the context the whole conversation renders; generation starts from
    ``add_generation_prompt=True``. Where the second is not a prefix of the first, a model learns one
    context and is asked in another (LLaVA-OneVision: ``assistant\n`` against ``assistant `` ;
    DeepSeek-R1: a ``<think>\n`` the trained answers never follow). ``None`` when they agree.
    """
    try:
        answered = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": S1}], tools=tools,
                                                 tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this probe says nothing either way
        return None
    if answered.startswith(prompt):
        return None
    at = common_prefix(prompt, answered)
    start = max(0, at - 24)
    return prompt[start:], answered[start:answered.find(S1) if S1 in answered[start:] else at + 24]


def _warn_if_prompted_otherwise(tokenizer: Any, messages: list[Message], prompt: str, tools: Any) -> None:
    """One warning per template whose generation prompt is not the start of its rendered answers."""
    template = str(_template_text(tokenizer, tools) or "")
    if template in _CHECKED or not messages or messages[-1].get("role") == "assistant":
        return
    _CHECKED.add(template)
    found = generation_prompt_divergence(tokenizer, messages, prompt, tools)
    if found is not None:
        prompted, trained = found
        log.warning("%s prompts generation with %r but renders an answer after %r: answers are learned in one "
                    "context and generated in the other (greedy val/acc and samples suffer); a template whose two "
                    "agree can be set with data.chat_template=", _template_name(tokenizer), prompted, trained)


def tokenize_completion(tokenizer: Any, prompt: list[Message], completion: list[Message], *,
                        tools: list[dict[str, Any]] | None = None, where: str | None = None) -> list[int]:
    """The completion's tokens as the template renders them after ``prompt`` (end-of-turn included).

    Only where the prompt with its generation prompt is a prefix of the whole rendering;
    otherwise the completion would start mid-token or mid-header, so it is refused."""
    before = render(tokenizer, prompt, True, tools=tools, where=where)
    after = render(tokenizer, prompt + completion, False, tools=tools, where=where)
    if not after.startswith(before):
        raise DataError(f"{_template_name(tokenizer)} does not render the prompt with its generation prompt as a "
                        "prefix of the prompt with its completion, so the completion cannot be cut out exactly",
                        source=where)
    return _encode(tokenizer, after[len(before):])
