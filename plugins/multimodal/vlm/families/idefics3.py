"""Idefics3 / SmolVLM: ``Idefics3ForConditionalGeneration`` (SigLIP-like tower, pixel-shuffle
connector, Llama text) with ``Idefics3Processor`` + ``Idefics3ImageProcessor``.

The template renders ``<image>``; the processor expands it into
``<fake_token_around_image><global-img>`` + ``image_seq_len`` x ``<image>`` + ``<fake_token_around_image>``
(no row/col tiles: the tiny twin turns image splitting off and resizes every image to one
``image_size`` square) and returns ``pixel_values`` (batch, images, 3, H, W) with a
``pixel_attention_mask``. A 4x4 patch grid, pixel-shuffled by 2, gives 4 tokens per image.
"""

from __future__ import annotations

from typing import Any

from modalforge.plugins.multimodal.vlm.families import check_image_size, tiny_text

MODEL_TYPES: tuple[str, ...] = ("idefics3",)
HUB_ID: str = "HuggingFaceTB/SmolVLM-Instruct"
PACKING: bool = True
IMAGE_TEXT: str = "<image>"
VIDEO_TEXT: str | None = None  # takes no video
SPECIAL_TOKENS: list[str] = ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                             "<global-img>"]
PATCHES_PER_SIDE = 4
SCALE_FACTOR = 2

# SmolVLM-Instruct's template, plus a branch for plain-string contents (the published one
# only handles lists of parts).
CHAT_TEMPLATE: str | None = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """``Idefics3Processor`` without image splitting: one ``image_size`` square per image."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    check_image_size("idefics3", image_size, PATCHES_PER_SIDE)
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": image_size},
                                             max_image_size={"longest_edge": image_size})
    seq_len = (PATCHES_PER_SIDE // SCALE_FACTOR) ** 2
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                             chat_template=tokenizer.chat_template)


def tiny_config(processor: Any, sizes: dict) -> Any:
    """A 2-layer Llama and a 1-layer Idefics3 vision tower on a 4x4 patch grid."""
    from transformers import Idefics3Config

    tok = processor.tokenizer
    image_size = processor.image_processor.max_image_size["longest_edge"]
    text = tiny_text(tok, sizes, model_type="llama")
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": image_size // PATCHES_PER_SIDE}
    return Idefics3Config(text_config=text, vision_config=vision, scale_factor=SCALE_FACTOR,
                          image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
