"""The tokenizer of an alignment run: the model's own, or a BPE trained on the conversations."""

from __future__ import annotations

from typing import Any

from modalforge.data.tokenizers import cached_bpe, load_tokenizer
from modalforge.text.formats import Message
from modalforge.text.templates import SPECIAL_TOKENS, apply_template


def conversation_texts(conversations: list[list[Message]]) -> list[str]:
    texts = []
    for messages in conversations:
        for m in messages:
            texts.append(str(m.get("content") or ""))
            for call in m.get("tool_calls") or []:
                texts.append(str(call.get("function")))
    return texts


def build_tokenizer(name_or_path: str | None, chat_template: str, conversations: list[list[Message]],
                    vocab_size: int, cache_dir: str | None) -> Any:
    """``chat_template``: ``auto`` (the tokenizer's own if it has one, else chatml), ``tokenizer``, a built-in,
    or a ``.jinja`` file."""
    if name_or_path:
        tokenizer = load_tokenizer(name_or_path)
        choice = "tokenizer" if chat_template == "auto" and tokenizer.chat_template else chat_template
        if choice == "auto":
            choice = "chatml"
        if choice != "tokenizer":
            missing = [t for t in SPECIAL_TOKENS.get(choice, []) if t not in tokenizer.get_vocab()]
            if missing:
                tokenizer.add_special_tokens({"additional_special_tokens": missing})
        apply_template(tokenizer, choice)
        return tokenizer
    choice = "chatml" if chat_template in ("auto", "tokenizer") else chat_template
    tokenizer = cached_bpe(conversation_texts(conversations), vocab_size, cache_dir=cache_dir,
                           extra_special_tokens=SPECIAL_TOKENS.get(choice, []))
    apply_template(tokenizer, choice)
    return tokenizer
