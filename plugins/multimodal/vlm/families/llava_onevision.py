"""LLaVA-OneVision: ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, MLP projector, Qwen2
text) with ``LlavaOnevisionProcessor`` + ``LlavaOnevisionImageProcessor``.

The template renders ``<image>\\n`` per image; the processor expands ``<image>`` into the anyres
feature count (base grid + unpadded high-res grid + one newline token per row, which depends on
the original image size) and returns ``pixel_values`` (images, patches, 3, H, W) and
``image_sizes``. The tiny twin has one grid pinpoint (``image_size`` square) and a 2x2 patch grid,
so each image is 2 crops of 4 patches.
"""

from __future__ import annotations

from typing import Any

from modalforge.plugins.multimodal.vlm.families import check_image_size, tiny_text

MODEL_TYPES: tuple[str, ...] = ("llava_onevision",)
HUB_ID: str = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
PACKING: bool = True
IMAGE_TEXT: str = "<image>"
VIDEO_TEXT: str | None = "<video>"  # what the template renders for a video part
SPECIAL_TOKENS: list[str] = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
PATCHES_PER_SIDE = 2

# The published template, plus a branch for plain-string contents (assistant strings in a generation
# block, as the published template does for assistant text parts: what is learned).
CHAT_TEMPLATE: str | None = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% if message['content'] is string %}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}"
    "{% else %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """``LlavaOnevisionProcessor`` with a single ``image_size`` pinpoint (the video processor is required)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    check_image_size("llava_onevision", image_size, PATCHES_PER_SIDE)
    square = {"height": image_size, "width": image_size}
    image_processor = LlavaOnevisionImageProcessor(size=square, crop_size=square,
                                                   image_grid_pinpoints=[[image_size, image_size]])
    video_processor = LlavaOnevisionVideoProcessor(size=square)
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                   num_image_tokens=PATCHES_PER_SIDE ** 2, vision_feature_select_strategy="full",
                                   chat_template=tokenizer.chat_template)


def tiny_config(processor: Any, sizes: dict) -> Any:
    """A 2-layer Qwen2 and a 1-layer SigLIP tower on a 2x2 patch grid."""
    from transformers import LlavaOnevisionConfig

    tok = processor.tokenizer
    image_size = processor.image_processor.size["height"]
    text = tiny_text(tok, sizes, model_type="qwen2")
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": image_size,
              "patch_size": image_size // PATCHES_PER_SIDE}
    return LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=processor.image_token_id,
                                video_token_index=processor.video_token_id, vision_feature_select_strategy="full",
                                vision_feature_layer=-1, image_grid_pinpoints=[[image_size, image_size]],
                                pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
