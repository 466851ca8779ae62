"""PaliGemma: ``PaliGemmaForConditionalGeneration`` (SigLIP tower, linear projector, Gemma text)
with ``PaliGemmaProcessor`` + ``SiglipImageProcessor``; no chat template.

PaliGemma is a prefix LM: the processor builds ``<image>`` x ``image_seq_length`` + ``<bos>`` +
prompt + ``\\n`` (+ suffix + ``<eos>`` when ``suffix`` is given), returns ``token_type_ids``
(0 on the prefix, 1 on the suffix: the model needs them in training, the prefix attends
bidirectionally) and ``labels`` (the suffix only). It adds 1024 ``<locNNNN>`` and 128 ``<segNNN>``
tokens to the tokenizer, so the vocabulary is read after ``build_processor``. The tiny twin sees a
2x2 patch grid: 4 image tokens per image.
"""

from __future__ import annotations

from typing import Any

MODEL_TYPES: tuple[str, ...] = ("paligemma",)
HUB_ID: str = "google/paligemma-3b-mix-224"
PACKING: bool = True
IMAGE_TEXT: str = "<image>"
SPECIAL_TOKENS: list[str] = ["<image>"]
CHAT_TEMPLATE: str | None = None
PATCHES_PER_SIDE = 2


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """``PaliGemmaProcessor``; the image processor carries ``image_seq_length`` (the processor reads it)."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    if image_size % PATCHES_PER_SIDE:
        raise ValueError(f"paligemma tiny twin: image_size {image_size} is odd")
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = PATCHES_PER_SIDE ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_config(processor: Any, sizes: dict) -> Any:
    """A 2-layer Gemma and a 1-layer SigLIP tower on a 2x2 patch grid."""
    from transformers import PaliGemmaConfig

    tok = processor.tokenizer
    image_size = processor.image_processor.size["height"]
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    text.update({k: v for k, v in sizes.items() if k in text})
    text.update(model_type="gemma", head_dim=text["hidden_size"] // text["num_attention_heads"],
                vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": image_size,
              "patch_size": image_size // PATCHES_PER_SIDE, "num_image_tokens": processor.image_seq_length,
              "projection_dim": text["hidden_size"]}
    return PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=processor.image_token_id,
                           projection_dim=text["hidden_size"], hidden_size=text["hidden_size"],
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
