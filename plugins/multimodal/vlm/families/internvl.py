"""InternVL 2.5 / 3 (``-hf`` checkpoints): ``InternVLForConditionalGeneration`` (InternViT tower, pixel-shuffle
MLP projector, Qwen2 text) with ``InternVLProcessor`` + ``GotOcr2ImageProcessor`` + ``InternVLVideoProcessor``.

The template renders ``<IMG_CONTEXT>\\n`` per image; the processor expands ``<IMG_CONTEXT>`` into
``<img>`` + ``image_seq_length`` x tiles x ``<IMG_CONTEXT>`` + ``</img>``, where an image is cut into
tiles by its aspect ratio (plus a thumbnail tile when there is more than one), and returns
``pixel_values`` (tiles, 3, H, W) with every image's tiles in order. The text model is a plain 1-D RoPE
Qwen2 and each tile is encoded on its own, so packed rows (position ids restarting per sample) are exact.
The tiny twin: 32 px tiles of 4x4 patches, pixel-shuffled by 0.5 to 4 tokens per tile, at most 2 tiles
per image (a 32x32 square is one tile, 4 tokens; a 48x32 one is 2 tiles + thumbnail, 12 tokens).
"""

from __future__ import annotations

from typing import Any

from modalforge.plugins.multimodal.vlm.families import check_image_size, tiny_text

MODEL_TYPES: tuple[str, ...] = ("internvl",)
HUB_ID: str = "OpenGVLab/InternVL3-1B-hf"
PACKING: bool = True  # 1-D RoPE text, tiles encoded independently: tested in tests/test_vlm_internvl.py
IMAGE_TEXT: str = "<IMG_CONTEXT>"
# No video here: InternVLProcessor returns a video's frames in the same ``pixel_values`` as the image tiles
# (in placeholder order), while the collator keeps image and video tensors apart by key, so a batch with
# both would lose one. The template still renders a video part as ``<video>\n`` (the hub's behaviour).
VIDEO_TEXT: str | None = None
SPECIAL_TOKENS: list[str] = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# The named tokens InternVLProcessor reads from its tokenizer (saved in tokenizer_config.json, as on the hub).
_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
PATCHES_PER_SIDE = 4
DOWNSAMPLE_RATIO = 0.5
MAX_TILES = 2

# InternVL3-hf's published template: the `chat_template` of transformers'
# models/internvl/convert_internvl_weights_to_hf.py, which wrote the OpenGVLab/*-hf checkpoints' template
# (chatml; an image part renders as `<IMG_CONTEXT>\n`, a video part as `<video>\n`; no default system prompt).
CHAT_TEMPLATE: str | None = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def tokens_per_tile() -> int:
    """Image tokens per tile: the patch grid after pixel shuffle (``image_seq_length``)."""
    return int((PATCHES_PER_SIDE * DOWNSAMPLE_RATIO) ** 2)


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """``InternVLProcessor`` with ``image_size`` tiles, at most :data:`MAX_TILES` per image (plus a thumbnail)."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    check_image_size("internvl", image_size, PATCHES_PER_SIDE)
    # InternVLProcessor reads tokenizer.start_image_token / end_image_token / context_image_token /
    # video_token (+ _id): named model-specific special tokens, saved with the tokenizer and restored on load.
    tokenizer._set_model_specific_special_tokens(dict(_NAMED_TOKENS))
    square = {"height": image_size, "width": image_size}
    # InternVL's normalisation (ImageNet mean/std), as the hub checkpoints' preprocessor_config.json
    norm = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    image_processor = GotOcr2ImageProcessor(size=square, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES,
                                            **norm)
    video_processor = InternVLVideoProcessor(size=square, **norm)
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                             image_seq_length=tokens_per_tile(), chat_template=tokenizer.chat_template)


def tiny_config(processor: Any, sizes: dict) -> Any:
    """A 2-layer Qwen2 and a 1-layer InternViT on a 4x4 patch grid per tile.

    Every width is a multiple of 64: bitsandbytes' CPU 4-bit kernels (``adapter=qlora`` quantises the
    tower too) cut each row into 64-wide blocks, and a 32-wide layer has none."""
    from transformers import InternVLConfig

    tok = processor.tokenizer
    image_size = processor.image_processor.size["height"]
    text = tiny_text(tok, sizes, model_type="qwen2")
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": image_size // PATCHES_PER_SIDE}
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
                          image_seq_length=processor.image_seq_length, downsample_ratio=DOWNSAMPLE_RATIO,
                          vision_feature_layer=-1, vision_feature_select_strategy="default",
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
