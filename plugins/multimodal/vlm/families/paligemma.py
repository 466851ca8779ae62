"""PaliGemma / PaliGemma 2: a SigLIP tower, a linear projector and Gemma, trained as a prefix LM.

Not a chat model: ``PaliGemmaProcessor`` writes ``<image>`` x ``image_seq_length`` per image, BOS, the
prompt (the prefix) and ``\\n``, then the answer (the suffix) and EOS, with ``token_type_ids`` marking
the prefix (attended bidirectionally) and labels on the suffix only. The data builds each example
with the processor itself (:mod:`..prefix_lm`); packing is refused (each row's prefix block would
attend across samples).
"""

from __future__ import annotations

from typing import Any

from modalforge.plugins.multimodal.vlm.families import check_image_size, tiny_text

MODEL_TYPES: tuple[str, ...] = ("paligemma",)
HUB_ID: str = "google/paligemma2-3b-pt-224"
PACKING: bool = False
PREFIX_LM: bool = True  # examples are (prefix, suffix) pairs built by the processor, not chats
IMAGE_TEXT: str = "<image>"
VIDEO_TEXT: str | None = None  # takes no video
SPECIAL_TOKENS: list[str] = ["<image>"]
CHAT_TEMPLATE: str | None = None  # PaliGemma has none: prompts are task prefixes ("caption en", "answer en ...")
PATCHES_PER_SIDE = 2


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """``PaliGemmaProcessor`` with a SigLIP image processor at ``image_size``: 4 image tokens per image."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    check_image_size("paligemma", image_size, PATCHES_PER_SIDE)
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = PATCHES_PER_SIDE ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_config(processor: Any, sizes: dict[str, Any]) -> Any:
    """A 1-layer SigLIP tower on a 2x2 patch grid and a 2-layer Gemma on ``processor``'s vocabulary."""
    from transformers import PaliGemmaConfig

    tok = processor.tokenizer
    image_size = processor.image_processor.size["height"]
    text = tiny_text(tok, sizes, model_type="gemma", head_dim=16)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,  # bnb 4-bit CPU: >= 64
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": image_size,
              "patch_size": image_size // PATCHES_PER_SIDE, "projection_dim": text["hidden_size"],
              "vision_use_head": False}  # as PaliGemma's own: no pooling head
    return PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=processor.image_token_id,
                           projection_dim=text["hidden_size"], hidden_size=text["hidden_size"],
                           pad_token_id=tok.pad_token_id)
