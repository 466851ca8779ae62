"""Built-in chat templates for tokenizers that have none (trained BPEs, base models).

Written as Jinja like every Hugging Face chat template; the one used is saved with
the tokenizer (``tokenizer.chat_template`` then ``save_pretrained``), so the trained
model and its template travel together. Tool calls and tool results are rendered
as JSON inside the turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalforge.errors import ModalforgeError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{{ call['function'] | tojson }}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
SPECIAL_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"],
                  "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def template_named(name: str) -> str:
    """A built-in template by name, or the text of a ``.jinja`` file (a published template saved as-is)."""
    if name.endswith((".jinja", ".jinja2", ".j2")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModalforgeError(f"data.chat_template={name!r}: no such file")
        return path.read_text(encoding="utf-8")
    if name not in TEMPLATES:
        raise ModalforgeError(f"data.chat_template={name!r} is not one of: {', '.join(TEMPLATES)}, 'tokenizer' "
                              "(use the tokenizer's own), or a .jinja file")
    return TEMPLATES[name]


def apply_template(tokenizer: Any, choice: str) -> None:
    """Give ``tokenizer`` the chosen template: ``tokenizer`` keeps its own (error if it has none)."""
    if choice == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ModalforgeError("data.chat_template=tokenizer but this tokenizer has no chat template; "
                                  f"choose a built-in one: {', '.join(TEMPLATES)}")
        return
    tokenizer.chat_template = template_named(choice)
