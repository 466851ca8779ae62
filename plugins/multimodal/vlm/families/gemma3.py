"""Gemma 3: ``Gemma3ForConditionalGeneration`` (SigLIP tower + Gemma 3 text), ``Gemma3Processor``.

The template renders ``<start_of_image>`` per image; the processor expands it into
``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``
and returns ``token_type_ids`` (1 on image tokens), which the model needs in training: image
tokens attend to each other bidirectionally there. The tiny twin pools a 4x4 patch grid to 2x2 = 4
tokens per image (``mm_tokens_per_image`` must be a square dividing the patch grid).
"""

from __future__ import annotations

from typing import Any

from modalforge.plugins.multimodal.vlm.families import check_image_size, tiny_text

MODEL_TYPES: tuple[str, ...] = ("gemma3",)
HUB_ID: str = "google/gemma-3-4b-it"
PACKING: bool = True
IMAGE_TEXT: str = "<start_of_image>"
VIDEO_TEXT: str | None = None  # takes no video
SPECIAL_TOKENS: list[str] = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                             "<image_soft_token>"]
PATCHES_PER_SIDE = 4
TOKENS_PER_IMAGE = 4

CHAT_TEMPLATE: str | None = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """``Gemma3Processor``; the tokenizer gets the named boi/eoi/image tokens the processor reads."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    check_image_size("gemma3", image_size, PATCHES_PER_SIDE)
    # Gemma3Processor reads tokenizer.boi_token / eoi_token / image_token (+ _id): named
    # model-specific special tokens, saved in tokenizer_config.json and restored on load.
    tokenizer._set_model_specific_special_tokens({
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=tokenizer.chat_template, image_seq_length=TOKENS_PER_IMAGE)


def tiny_config(processor: Any, sizes: dict) -> Any:
    """A 2-layer Gemma 3 text model and a 1-layer SigLIP tower on a 4x4 patch grid."""
    from transformers import Gemma3Config

    tok = processor.tokenizer
    image_size = processor.image_processor.size["height"]
    text = tiny_text(tok, sizes, sliding_window=64)
    text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": image_size // PATCHES_PER_SIDE}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=processor.image_seq_length,
                        boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                        image_token_index=tok.image_token_id, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
