"""Qwen2-VL / Qwen2.5-VL: dynamic resolution, each image becomes ``(h/patch) * (w/patch) / merge**2`` tokens.

``Qwen2VLProcessor`` expands ``<|image_pad|>`` by the image's ``image_grid_thw`` and returns
``mm_token_type_ids``, from which the model builds its 3-D (temporal, height, width) RoPE positions.
Packed rows are exact only with 4-row position ids (text positions, then the three M-RoPE rows, each
restarting per sample), which the objective computes per packed sample (see :mod:`..mrope`).
"""

from __future__ import annotations

from typing import Any

from modalforge.plugins.multimodal.vlm.families import tiny_text

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
HUB_ID = "Qwen/Qwen2-VL-2B-Instruct"
PACKING = True  # with per-sample M-RoPE positions (the objective's mrope_positions)
IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_TEXT: str | None = "<|vision_start|><|video_pad|><|vision_end|>"  # what the template renders for a video part
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's published template (system prompt by default, images and videos as content parts).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_PATCH, _MERGE = 8, 2  # tiny twin: 8 px patches merged 2x2, so a 32 px image is 4 tokens


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """``Qwen2VLProcessor`` with small patches; images keep their aspect ratio between 1 and 4 times ``image_size``."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    geometry = {"patch_size": _PATCH, "merge_size": _MERGE, "temporal_patch_size": 2,
                "min_pixels": image_size * image_size, "max_pixels": 4 * image_size * image_size}
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**geometry), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**geometry, cap_pixels_per_frame=True),
                            chat_template=tokenizer.chat_template)  # cap: qwen-vl-utils' per-frame pixel budget


def tiny_config(processor: Any, sizes: dict[str, Any]) -> Any:
    """A shrunk ``Qwen2VLConfig`` (two-layer ViT and LM; widths >= 64, bitsandbytes' 4-bit block) on ``processor``'s vocabulary and token ids."""
    from transformers import Qwen2VLConfig

    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in
           (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = tiny_text(tok, sizes)
    half_head = text["hidden_size"] // text["num_attention_heads"] // 2
    section = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]  # temporal, height, width
    return Qwen2VLConfig(
        text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}},
        vision_config={"depth": 2, "embed_dim": 64, "hidden_size": text["hidden_size"], "num_heads": 2,
                       "mlp_ratio": 2, "patch_size": _PATCH, "spatial_merge_size": _MERGE, "temporal_patch_size": 2},
        tie_word_embeddings=True, **ids)
