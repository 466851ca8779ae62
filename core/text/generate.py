"""Greedy answers to chat prompts, for the samples the alignment plugins log at validation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modalforge.text.formats import Message
from modalforge.text.stops import stop_token_ids
from modalforge.text.tokenize import tokenize_prompt

#: The built-in templates' end-of-turn markers (generation stops at the template's own: ``stops.py``).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>")


@torch.no_grad()
def answer(model: nn.Module, tokenizer: Any, prompts: list[list[Message]], max_new_tokens: int) -> list[str]:
    """``"<last user message> -> <greedy answer>"`` for each prompt; stops at EOS or the template's end of turn."""
    device = next(model.parameters()).device
    stop = stop_token_ids(tokenizer)
    texts = []
    for messages in prompts:
        ids = torch.tensor([tokenize_prompt(tokenizer, messages)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        texts.append(f"{messages[-1]['content']} -> {reply}")
    return texts
