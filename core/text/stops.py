"""Where generation stops: the tokenizer's end-of-sequence token and the template's end-of-turn markers.

A chat model ends its turn with the template's marker (``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``, ``<|end|>``, ``</s>``...), not always with the tokenizer's EOS. The marker
is read off the template itself: an assistant message is rendered with sentinel content and
the first special token after it is the turn's end (a tool-call message too, where the template
closes those otherwise). So every template stops right, with no list of families to keep.
"""

from __future__ import annotations

from typing import Any

from modalforge.text.spans import END_MARKERS, S1, added_tokens

_cache: dict[tuple, list[int]] = {}


def _special_after(text: str, specials: list[str], *, last: bool) -> str | None:
    """The first (or last) special token in ``text`` after its last sentinel (the longest, where two overlap)."""
    tail = text[text.rindex(S1) + len(S1):]
    found = [(i, len(t), t) for t in specials for i in ([tail.rfind(t)] if last else [tail.find(t)]) if i >= 0]
    if not found:
        return None
    return max(found)[2] if last else min(found, key=lambda f: (f[0], -f[1]))[2]


def _markers_rendered(tokenizer: Any, specials: list[str]) -> list[str | None] | None:
    """The marker after a plain answer (the first special token after it: Phi-3's ``<|end|>``, not the
    ``<|endoftext|>`` that closes the conversation) and after a tool call (the last one: ChatML's
    ``<|im_end|>``, not ``</tool_call>``); ``None`` when the template renders neither."""
    call = {"type": "function", "function": {"name": S1, "arguments": {"x": S1}}}
    cases = [([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": S1}], False),
             ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}], True)]
    markers, rendered = [], False
    for messages, last in cases:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this shape (no tool calls...) tells nothing
            continue
        if isinstance(text, str) and S1 in text:
            rendered = True
            markers.append(_special_after(text, specials, last=last))
    return markers if rendered else None


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """The special tokens that close an assistant turn in ``tokenizer``'s chat template.

    Read from the rendering; a template that renders no test conversation falls back to the
    known markers (``spans.END_MARKERS``) that its source names."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    specials = added_tokens(tokenizer)
    vocab = tokenizer.get_vocab()
    markers = _markers_rendered(tokenizer, specials)
    if markers is None:
        source = template if isinstance(template, str) else " ".join(map(str, template.values()))
        markers = [m for m in END_MARKERS if m in source]
    return [m for m in dict.fromkeys(markers) if m is not None and m in vocab]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS first, then the ids of the template's end-of-turn markers (no duplicates)."""
    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", None)), len(tokenizer), tokenizer.eos_token_id)
    if key not in _cache:
        vocab = tokenizer.get_vocab()
        ids = [tokenizer.eos_token_id] + [vocab[t] for t in end_of_turn_tokens(tokenizer)]
        _cache[key] = list(dict.fromkeys(i for i in ids if i is not None))
    return list(_cache[key])


def set_generation_stops(model: Any, tokenizer: Any) -> None:
    """Make plain ``model.generate`` stop at the end of the turn: ``generation_config.eos_token_id`` becomes
    EOS plus the end-of-turn ids (and any it listed already), as published instruct models ship it."""
    config = getattr(model, "generation_config", None)
    if config is None or tokenizer is None:
        return
    existing = config.eos_token_id
    existing = [] if existing is None else [existing] if isinstance(existing, int) else list(existing)
    ids = list(dict.fromkeys([*stop_token_ids(tokenizer), *existing]))
    if ids:
        config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
