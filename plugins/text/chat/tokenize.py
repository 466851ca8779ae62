"""Tokenise a conversation with its chat template and a mask of the tokens to learn.

Each turn is rendered as the template renders the conversation up to it, and only
the new text is tokenised, so the mask knows which tokens belong to which turn.
Assistant turns are learned from their first content token to the end of turn
marker (the header "<|im_start|>assistant" is prompt); with ``train_on="all"``
every token is learned. Written by hand because ``return_assistant_tokens_mask``
only works with templates that carry ``{% generation %}`` markers, which most
tokenizers' own templates lack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modalforge.plugins.text.chat.formats import Message

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_conversation(tokenizer: Any, messages: list[Message], *, train_on: str = "assistant") -> Tokenized:
    """Token ids and labels (``-100`` where nothing is learned) of a whole conversation."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for k, message in enumerate(messages):
        full = _render(tokenizer, messages[: k + 1], False)
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:k], True)  # history + the assistant header
            header, body = prompt[len(rendered):], full[len(prompt):]
        else:
            header, body = full[len(rendered):], ""
        header_ids, body_ids = _encode(tokenizer, header), _encode(tokenizer, body)
        ids += header_ids + body_ids
        learn_header = train_on == "all"
        labels += (header_ids if learn_header else [IGNORE] * len(header_ids)) + body_ids
        rendered = full
    return Tokenized(ids, labels)


def tokenize_prompt(tokenizer: Any, messages: list[Message]) -> list[int]:
    """The prompt with the assistant header, ready for generation or a completion."""
    return _encode(tokenizer, _render(tokenizer, messages, True))


def tokenize_completion(tokenizer: Any, prompt: list[Message], completion: list[Message]) -> list[int]:
    """The completion's tokens as the template renders them after ``prompt`` (end-of-turn included)."""
    before = _render(tokenizer, prompt, True)
    after = _render(tokenizer, prompt + completion, False)
    return _encode(tokenizer, after[len(before):])
