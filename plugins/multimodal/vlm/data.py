"""vlm data: interleaved image-text records -> tokens with expanded image tokens, pixels, loss mask.

Records (see :mod:`.formats`) become chats or documents with one placeholder per image. Chats go
through the sft plugin's chat code (template, assistant-only mask); documents and captions learn all
their text. Each image placeholder then expands here, once, to the number of tokens the vision tower
produces for an image (the Objective never re-counts; it checks this number against the tower
once, at build time). Image tokens are never learned. With ``data.packing=true`` samples share rows,
kept apart by position ids that restart at each sample (or the chat code's block-diagonal mask with
``data.packing_attention=dense``); images follow their sample, in order.

The processor (tokenizer with the image token, CLIP-style image processor, patch size) is a
``transformers`` ``LlavaProcessor``, saved with the model, so ``AutoProcessor`` loads ``final/``. For any
other family (Qwen2-VL, Gemma 3, Idefics3...) the family's own processor counts and expands the image
tokens (:mod:`.expansion`) and this module never does.

Empty values / truncated media / duplicates / mixed types: as :mod:`.formats` says (blank captions
and answers, non-string texts and missing image files are errors naming the record); a cut or
unreadable image stops the run when opened, naming the record and the file (no header pass, no
``skip_bad`` here). Repeated records are kept.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.errors import ConfigError
from modalforge.data.images import ImageRef, open_image
from modalforge.data.readers import Record
from modalforge.data.datamodule import SourcedDataModule
from modalforge.progress import preparing
from modalforge.data.tokenizers import cached_bpe
from modalforge.plugins.multimodal.vlm.expansion import ProcessorImages
from modalforge.plugins.multimodal.vlm.families import family, family_of
from modalforge.plugins.multimodal.vlm.formats import VIDEO_PLACEHOLDER, Sample, final_answer, parse_record
from modalforge.plugins.multimodal.vlm.motion import write_motion_sets
from modalforge.plugins.multimodal.vlm.prefix_lm import prefix_and_suffix, prefix_lm_example
from modalforge.plugins.multimodal.vlm.synthetic import write_vlm_sets
from modalforge.plugins.multimodal.vlm.video import VideoRef, load_frames
from modalforge.text.formats import Message
from modalforge.text.packing import collate_rows, pack_first_fit
from modalforge.text.templates import TEMPLATES, apply_template
from modalforge.text.tokenize import IGNORE, Tokenized, tokenize_conversation, tokenize_prompt
from modalforge.text.tokenizer import build_tokenizer, conversation_texts

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# How a list content renders: image parts become the image token, text parts their text. Substituted into
# the chat plugin's templates so `AutoProcessor.apply_chat_template` takes HF-style image parts.
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] in ['image', 'image_url'] %}{{ '@IMAGE@' }}"
            "{% elif part['type'] == 'video' %}{{ '@VIDEO@' }}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}")


def multimodal_template(template: str, image_token: str, video_token: str | None = None) -> str:
    """A chat plugin template that also renders ``{"type": "image"}`` / ``"video"`` / ``"text"`` content parts."""
    needle = "{{ message['content'] }}"
    if needle not in template or "part['type']" in template:
        return template
    return template.replace(needle, _CONTENT.replace("@IMAGE@", image_token).replace("@VIDEO@", video_token or ""))


@dataclass
class Example(Tokenized):
    """Tokens (images expanded), labels, and the images in order of their tokens."""

    images: list[ImageRef] = field(default_factory=list)
    source: str = ""
    location: str = ""
    extra: dict[str, list[int]] = field(default_factory=dict)  # per-token arrays of the processor (mm types)
    videos: list[VideoRef] = field(default_factory=list)


@dataclass
class Question:
    """A held-out prompt (images expanded) and its reference: a chat's final answer, or an image's caption.

    A caption prompt is the beginning of a ``caption`` record: its image tokens; ``question`` is then
    :data:`CAPTION`.
    """

    input_ids: list[int]
    images: list[ImageRef]
    question: str
    answer: str
    where: str
    extra: dict[str, list[int]] = field(default_factory=dict)
    videos: list[VideoRef] = field(default_factory=list)

    def __str__(self) -> str:
        media = {"images": [r.describe() for r in self.images]}
        if self.videos:
            media["videos"] = [v.describe() for v in self.videos]
        return json.dumps({**media, "question": self.question, "answer": self.answer})


CAPTION = "(caption)"


class Rows(Dataset):
    """Rows of one (unpacked) or several (packed) examples, with their images opened and videos' frames read."""

    def __init__(self, rows: list[list[Example]], read_video: Any = None) -> None:
        self.rows, self.read_video = rows, read_video

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[Example], list[Any], list[list[Any]]]:
        row = self.rows[index]
        videos = [self.read_video(ref, e) for e in row for ref in e.videos]
        return row, [load_image(ref, e) for e in row for ref in e.images], videos


def load_image(ref: ImageRef, example: Example | Sample | Question):  # noqa: ANN201 - PIL image
    """The image, or a ``DataError`` naming the record and the file."""
    try:
        return open_image(ref)
    except DataError as err:
        source, location = _where(example)
        raise DataError(f"image {ref.describe()}: {err.detail}", source=source, location=location) from None


def _where(example: Example | Sample | Question) -> tuple[str | None, str | None]:
    if isinstance(example, Question):
        return example.where, None
    return example.source, example.location


class VLMDataModule(SourcedDataModule):
    """Interleaved image-text data for a LLaVA-style model.

    Args:
        train / val: manifests (jsonl/json/parquet/csv), webdataset shards or ``hf:`` datasets; ``None``
            generates the shapes demo (``demo``: ``questions`` or ``captions``), or moving-shape clips
            (``demo=motion``: "which way does the square move?", for families that take video).
        format: force a record format (``messages``, ``llava``, ``document``, ``caption``); ``None`` detects.
        chat_template: ``auto`` (the tokenizer's own, else chatml), ``tokenizer``, ``chatml`` or ``llama3``.
        train_on: ``assistant`` (chats: completion-only loss) or ``all``; documents and captions learn all text.
        max_length: tokens per example once images expand (and per packed row).
        too_long: ``error`` (names the record) or ``drop`` (counted and reported).
        packing: pack examples into rows of ``max_length`` tokens.
        packing_attention: how packed examples are kept apart (the chat plugin's ``collate_rows``):
            ``position_ids`` (no mask: the position ids restart at each example and transformers derives
            the boundaries from them; no L*L tensor, varlen kernels with flash-attention) or ``dense``
            (a block-diagonal ``(B, 1, L, L)`` mask).
        processor: a folder whose processor to use: a LLaVA folder (a previous run's ``final/``) or any
            ``AutoProcessor`` of an image-text-to-text model (Qwen2-VL, Gemma 3, Idefics3...), whose image
            tokens are then the processor's own (:mod:`.expansion`).
        family: a :mod:`.families` name (``model=vlm/<family>``); with no ``processor`` it assembles the
            family's tiny twin processor here (its image processor, template and a BPE trained on the data).
        image_processor: image settings passed to every call of a loaded processor, e.g. Qwen2-VL's
            ``min_pixels`` / ``max_pixels`` (a ``model=vlm/<family>`` preset's resolution limits; a tiny
            twin keeps its own).
        tokenizer: a language model folder whose tokenizer to use; ``None`` trains a BPE on the data.
        vision_tower: the tower folder (clip run ``final/`` or HF CLIP/SigLIP), for its image size, patch
            size and normalisation.
        image_size: tower input size (images of other sizes are resized); ``None``: the tower's, else 32.
        patch_size: patch size of a tower built from config.
        vision_feature_select_strategy: LLaVA's ``default`` (drop the CLS token) or ``full``; ``None``: ``full``
            for SigLIP towers (no CLS), ``default`` otherwise. Must match the model's.
        image_token: the placeholder token added to the tokenizer.
        vocab_size: size of the BPE trained when no tokenizer is given.
        num_eval_questions: held-out questions answered greedily at each validation (``val/acc``).
        num_eval_captions: held-out ``caption`` records of the validation set captioned greedily at each
            validation (``val/caption_bleu``, ``val/caption_rougeL``).
        video_frames: frames sampled evenly from each video (file or frame list); ``None`` with
            ``video_fps`` samples by time instead.
        video_fps: frames per second sampled from video files (``video_frames`` must then be ``None``).
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    def __init__(self, train: Any = None, val: Any = None,
                 format: Literal["messages", "llava", "document", "caption"] | None = None,
                 demo: Literal["questions", "captions", "motion"] = "questions",
                 chat_template: Literal["auto", "tokenizer", "chatml", "llama3"] = "auto",
                 train_on: Literal["assistant", "all"] = "assistant", max_length: int = 320,
                 too_long: Literal["error", "drop"] = "error", packing: bool = True,
                 packing_attention: Literal["position_ids", "dense"] = "position_ids", processor: str | None = None,
                 family: str | None = None, image_processor: dict[str, Any] | None = None,
                 tokenizer: str | None = None, vision_tower: str | None = None, image_size: int | None = None,
                 patch_size: int = 4, vision_feature_select_strategy: Literal["default", "full"] | None = None,
                 image_token: str = "<image>", vocab_size: int = 512,
                 num_eval_questions: int = 64, num_eval_captions: int = 32, video_frames: int | None = 8,
                 video_fps: float | None = None, batch_size: int = 8, num_workers: int = 0,
                 val_fraction: float = 0.05, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        self.format, self.demo = format, demo
        self.chat_template, self.train_on, self.max_length = chat_template, train_on, max_length
        self.too_long, self.packing, self.packing_attention = too_long, packing, packing_attention
        self.processor_path, self.tokenizer_name, self.vision_tower = processor, tokenizer, vision_tower
        self.family, self.image_processor_settings = family, dict(image_processor or {})
        self.images: ProcessorImages | None = None  # set for non-LLaVA families: the processor counts tokens
        self.prefix_lm = False  # PaliGemma: (prefix, suffix) examples built by the processor (:mod:`.prefix_lm`)
        self.image_size, self.patch_size, self.image_token = image_size, patch_size, image_token
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vocab_size, self.num_eval_questions = vocab_size, num_eval_questions
        self.num_eval_captions = num_eval_captions
        if video_frames is not None and video_fps is not None:
            raise ConfigError("sample videos by count or by time, not both", where="data.video_frames / data.video_fps",
                              hint="set data.video_frames=null to sample data.video_fps frames per second")
        if (video_frames is None and video_fps is None) or (video_frames is not None and video_frames < 1) or (
                video_fps is not None and video_fps <= 0):
            raise ConfigError(f"video_frames={video_frames}, video_fps={video_fps}: give one, positive",
                              where="data.video_frames / data.video_fps")
        self.video_frames, self.video_fps = video_frames, video_fps
        self.tokenizer: Any = None
        self.image_tokens = 0
        self.questions: list[Question] = []
        self.captions: list[Question] = []
        self.stats: dict[str, float] = {}

    # ---- sources ------------------------------------------------------------------------
    def synthetic_data(self) -> tuple[str, str]:
        if self.demo == "motion":
            folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "vlm-motion-v2", write_motion_sets)
            return str(folder / "motion_train.jsonl"), str(folder / "motion_val.jsonl")
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "vlm-shapes-v4", write_vlm_sets)
        return str(folder / f"{self.demo}_train.jsonl"), str(folder / f"{self.demo}_val.jsonl")

    def _synthetic(self) -> Path:
        return Path(self.synthetic_data()[0]).parent

    def parse(self, record: Record) -> Sample:
        return parse_record(record, self.format, self.image_token)

    # ---- processor ----------------------------------------------------------------------
    def _tower_settings(self) -> dict[str, Any]:
        """Image size, patch size, CLS token and normalisation of the vision tower named by the config."""
        from modalforge.plugins.multimodal.vlm.model import vision_geometry

        settings = {"image_size": 32, "patch_size": self.patch_size, "strategy": "default", "cls": True,
                    "mean": CLIP_MEAN, "std": CLIP_STD}
        if self.vision_tower:
            settings.update(vision_geometry(self.vision_tower))
            folder = Path(self.vision_tower).expanduser()
            if (folder / "preprocess_config.json").exists():  # a clip run's final/
                pre = json.loads((folder / "preprocess_config.json").read_text())
                settings.update(mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)))
            elif (folder / "preprocessor_config.json").exists():
                pre = json.loads((folder / "preprocessor_config.json").read_text())
                settings.update(mean=tuple(pre.get("image_mean", CLIP_MEAN)), std=tuple(pre.get("image_std", CLIP_STD)))
        if self.image_size:
            settings["image_size"] = self.image_size
        if self.vision_feature_select_strategy:
            settings["strategy"] = self.vision_feature_select_strategy
        return settings

    def _build_processor(self, texts: list[list[Message]]) -> Any:
        from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

        if self.processor_path:
            try:
                processor = AutoProcessor.from_pretrained(str(Path(self.processor_path).expanduser()))
            except Exception as err:  # noqa: BLE001
                from modalforge.models import offline_hint

                raise offline_hint(self.processor_path, err, what="processor") from err
            if self.image_size and type(processor) is LlavaProcessor:
                size = self.image_size
                processor.image_processor.size = {"shortest_edge": size}
                processor.image_processor.crop_size = {"height": size, "width": size}
            return processor
        if self.family:
            return self._twin_processor(texts)
        settings = self._tower_settings()
        tokenizer = build_tokenizer(self.tokenizer_name, self.chat_template, texts, self.vocab_size, self.cache_dir)
        if self.image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([self.image_token], special_tokens=True)
        if tokenizer.chat_template in TEMPLATES.values():
            tokenizer.chat_template = multimodal_template(tokenizer.chat_template, self.image_token)
        size = int(settings["image_size"])
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                             image_mean=list(settings["mean"]), image_std=list(settings["std"]))
        strategy = settings["strategy"]
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              patch_size=int(settings["patch_size"]), vision_feature_select_strategy=strategy,
                              num_additional_image_tokens=1 if settings["cls"] else 0,
                              image_token=self.image_token, chat_template=tokenizer.chat_template)

    def _twin_processor(self, texts: list[list[Message]]) -> Any:
        """The family's processor around a BPE trained on the data, with the family's template (offline twin)."""
        spec = family(self.family)
        tokenizer = cached_bpe(conversation_texts(texts), self.vocab_size, cache_dir=self.cache_dir,
                               extra_special_tokens=spec.SPECIAL_TOKENS)
        tokenizer.chat_template = spec.CHAT_TEMPLATE
        return spec.build_processor(tokenizer, int(self.image_size or 32))

    def _family_spec(self) -> Any:
        if self.family:
            return family(self.family)
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(str(Path(self.processor_path).expanduser())).model_type
        except Exception:  # noqa: BLE001 - a processor-only folder: no family table entry then
            return None
        return family_of(model_type)

    def _processor_images(self) -> ProcessorImages | None:
        """``None`` for LLaVA (image tokens counted here); the processor's own expansion otherwise."""
        from transformers import LlavaProcessor

        if type(self.processor) is LlavaProcessor:
            return None

        spec = self._family_spec()
        name = spec.__name__.rsplit(".", 1)[-1] if spec else type(self.processor).__name__
        if self.packing and not (spec and spec.PACKING):
            raise DataError(f"data.packing=true is not exact for {name}: packed samples would see each other "
                            "(or get wrong multimodal positions); set data.packing=false")
        image_text = spec.IMAGE_TEXT if spec else (getattr(self.processor, "boi_token", None)
                                                   or self.processor.image_token)
        video_text = getattr(spec, "VIDEO_TEXT", None) if spec else (
            getattr(self.processor, "video_token", None) if getattr(self.processor, "video_processor", None) else None)
        self.prefix_lm = bool(getattr(spec, "PREFIX_LM", False))
        if self.chat_template not in ("auto", "tokenizer") and not self.prefix_lm:  # a built-in or a .jinja file replaces the family's
            apply_template(self.tokenizer, self.chat_template)
            if self.tokenizer.chat_template in TEMPLATES.values():
                self.tokenizer.chat_template = multimodal_template(self.tokenizer.chat_template, image_text, video_text)
            self.processor.chat_template = self.tokenizer.chat_template
        settings = self.image_processor_settings if self.processor_path else {}  # a twin keeps its own sizes
        return ProcessorImages(self.processor, image_text, settings, video_text=video_text)

    def tokens_per_image(self) -> int:
        """Image tokens per image, as ``LlavaProcessor`` counts them for its image size and patch size."""
        p = self.processor
        crop = p.image_processor.crop_size
        count = (crop["height"] // p.patch_size) * (crop["width"] // p.patch_size) + p.num_additional_image_tokens
        return count - (1 if p.vision_feature_select_strategy == "default" else 0)

    # ---- tokenisation -------------------------------------------------------------------
    def _placeholders(self, text: str) -> str:
        """The record's image (and video) placeholders as the family's template renders an image part."""
        if self.images is None:
            return text
        text = text.replace(self.image_token, self.images.image_text)
        return text.replace(VIDEO_PLACEHOLDER, self.images.video_text) if self.images.video_text else text

    def read_video(self, ref: VideoRef, example: Example | Sample | Question) -> list[Any]:
        """The video's sampled frames, or a ``DataError`` naming the record and the video."""
        try:
            return load_frames(ref, self.video_frames, self.video_fps)
        except DataError as err:
            source, location = _where(example)
            raise DataError(f"video {ref.describe()}: {err.detail}", source=source, location=location) from None

    def _splice(self, ids: list[int], labels: list[int],
                sample: Sample) -> tuple[list[int], list[int], dict[str, list[int]]]:
        if self.images is None:
            if sample.videos:
                raise sample.error("a video record, but LLaVA takes images only: train a family that takes video "
                                   "(model=vlm/qwen2_vl or model=vlm/llava_onevision)")
            return (*self._expand(ids, labels, sample), {})
        return self.images.splice(ids, labels, [load_image(ref, sample) for ref in sample.images], sample,
                                  videos=[self.read_video(ref, sample) for ref in sample.videos])

    def _messages(self, messages: list[Message]) -> list[Message]:
        """Contents with images as ``{"type": "image"}`` parts, as the family's published template expects."""
        if self.images is None:
            return messages
        media = re.compile(f"({re.escape(self.image_token)}|{re.escape(VIDEO_PLACEHOLDER)})")
        return [{**m, "content": self._parts(media.split(m["content"]))}
                if isinstance(m.get("content"), str) and media.search(m["content"]) else m for m in messages]

    def _parts(self, pieces: list[str]) -> list[dict[str, str]]:
        """Placeholders and texts (``re.split`` with the placeholders kept) as content parts."""
        kinds = {self.image_token: "image", VIDEO_PLACEHOLDER: "video"}
        return [{"type": kinds[p]} if p in kinds else {"type": "text", "text": p} for p in pieces if p]

    def _expand(self, ids: list[int], labels: list[int], sample: Sample) -> tuple[list[int], list[int]]:
        image_id = self.processor.image_token_id
        found = ids.count(image_id)
        if found != len(sample.images):
            raise sample.error(f"{found} image token(s) after tokenisation but {len(sample.images)} image(s): "
                               f"the chat template or tokenizer changed the placeholder {self.image_token!r}")
        out_ids, out_labels = [], []
        for token, label in zip(ids, labels):
            if token == image_id:
                out_ids += [image_id] * self.image_tokens
                out_labels += [IGNORE] * self.image_tokens
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels

    def _prefix_lm(self, sample: Sample, answer: bool = True) -> tuple[list[int], list[int], dict[str, list[int]]]:
        """A prefix-LM family's example (``answer=False``: its prompt), as the processor writes it."""
        prefix, suffix = prefix_and_suffix(sample, self.image_token)
        images = [load_image(ref, sample) for ref in sample.images]
        return prefix_lm_example(self.processor, images, prefix, suffix if answer else None, self.images.image_text)

    def tokenize(self, sample: Sample) -> Example:
        """Token ids and labels of one sample, images expanded; image tokens are never learned."""
        tok = self.tokenizer
        if self.prefix_lm:
            ids, labels, extra = self._prefix_lm(sample)
            return Example(ids, labels, images=list(sample.images), source=sample.source, location=sample.location,
                           extra=extra)
        if sample.is_chat:
            chat = tokenize_conversation(tok, self._messages(sample.messages), train_on=self.train_on)
            ids, labels = chat.input_ids, chat.labels
        else:
            ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + \
                tok(self._placeholders(sample.text), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            labels = list(ids)
        ids, labels, extra = self._splice(ids, labels, sample)
        return Example(ids, labels, images=list(sample.images), source=sample.source, location=sample.location,
                       extra=extra, videos=list(sample.videos))

    def _examples(self, samples: Iterable[Sample], what: str) -> list[Example]:
        examples, dropped = [], []
        for sample in samples:
            example = self.tokenize(sample)
            if len(example) > self.max_length:
                if self.too_long == "error":
                    each = f"to {self.image_tokens} tokens each" if self.images is None else \
                        "to their image tokens"
                    raise sample.error(f"{len(example)} tokens once its {len(sample.images)} image(s) expand "
                                       f"{each}, longer than data.max_length="
                                       f"{self.max_length}; raise it, or set data.too_long=drop")
                dropped.append(sample.where)
                continue
            if all(label == IGNORE for label in example.labels[1:]):
                dropped.append(sample.where)
                continue
            examples.append(example)
        if dropped:
            log.warning("%s: %d example(s) dropped (too long, or nothing to learn), first: %s", what, len(dropped),
                        dropped[0])
        if not examples:
            raise DataError(f"{what}: no example left to train on")
        return examples

    def _questions(self, samples: list[Sample]) -> list[Question]:
        questions = []
        for sample in samples:
            pair = final_answer(sample)
            if pair is None or len(questions) >= self.num_eval_questions:
                continue
            prompt, answer = pair
            if self.prefix_lm:
                ids, _, extra = self._prefix_lm(sample, answer=False)
            else:
                ids = tokenize_prompt(self.tokenizer, self._messages(prompt))
                ids, _, extra = self._splice(ids, list(ids), sample)
            text = str(prompt[-1].get("content") or "").replace(self.image_token, "").replace(VIDEO_PLACEHOLDER, "")
            questions.append(Question(ids, list(sample.images), text.strip(), answer, sample.where, extra,
                                      videos=list(sample.videos)))
        return questions

    def _captions(self, samples: list[Sample]) -> list[Question]:
        """Caption prompts (BOS and the image's tokens, as the caption record trains them) of held-out captions."""
        captions = []
        tok = self.tokenizer
        for sample in samples:
            if sample.caption is None or len(captions) >= self.num_eval_captions:
                continue
            if self.prefix_lm:
                ids, _, extra = self._prefix_lm(sample, answer=False)
                captions.append(Question(ids, list(sample.images), CAPTION, sample.caption, sample.where, extra))
                continue
            ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + \
                tok(self._placeholders(self.image_token), add_special_tokens=False)["input_ids"]
            ids, _, extra = self._splice(ids, list(ids), sample)
            captions.append(Question(ids, list(sample.images), CAPTION, sample.caption, sample.where, extra))
        return captions

    def fit(self, train: list[Sample]) -> None:
        texts = [s.messages if s.is_chat else [{"role": "user", "content": s.text}] for s in train]
        texts = [[{**m, "content": str(m.get("content") or "").replace(self.image_token, " ").replace(
            VIDEO_PLACEHOLDER, " ")} for m in t] for t in texts]
        self.processor = self._build_processor(texts)
        self.tokenizer = self.processor.tokenizer
        self.images = self._processor_images()
        self.image_tokens = self.tokens_per_image() if self.images is None else 0
        held_out = self.first_val_items()
        self.questions, self.captions = self._questions(held_out), self._captions(held_out)

    def build(self, items: list[Sample], what: str) -> Rows:
        with preparing(f"vlm {what}: tokenising", total=len(items), unit="sample") as progress:
            examples = self._examples(progress.track(items), what)
            rows = pack_first_fit(examples, self.max_length) if self.packing else [[e] for e in examples]
            per_image = f"{self.image_tokens} image tokens per image" if self.images is None else \
                "image tokens as the processor counts them"
            progress.summary = f"{len(examples)} examples in {len(rows)} rows, {per_image}"
        return Rows(rows, self.read_video)

    # ---- batches ------------------------------------------------------------------------
    def pixel_values(self, images: list[Any]) -> torch.Tensor | None:
        """The image processor's ``pixel_values`` for PIL images (``None`` for none)."""
        if not images:
            return None
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def image_inputs(self, groups: list[list[Any]]) -> dict[str, torch.Tensor]:
        """The model's image inputs for each sample's PIL images: ``pixel_values`` and whatever else the processor gives."""
        if self.images is not None and not self.prefix_lm:
            return self.images.image_tensors(groups)
        pixels = self.pixel_values([image for images in groups for image in images])
        return {} if pixels is None else {"pixel_values": pixels}

    def video_inputs(self, videos: list[list[Any]]) -> dict[str, torch.Tensor]:
        """The model's video inputs (``pixel_values_videos``, ``video_grid_thw``...) for videos' frames."""
        return self.images.video_tensors(videos) if videos and self.images is not None else {}

    def collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        """A batch of ``(row, images[, videos])`` items, as :class:`Rows` gives them (videos: frame lists)."""
        rows = [item[0] for item in items]
        batch = collate_rows(rows, self.tokenizer.pad_token_id, self.packing, attention=self.packing_attention)
        for key in dict.fromkeys(k for row in rows for e in row for k in e.extra):
            values = torch.zeros_like(batch["input_ids"])
            for r, row in enumerate(rows):
                start = 0
                for e in row:
                    if key in e.extra:
                        values[r, start:start + len(e)] = torch.tensor(e.extra[key])
                    start += len(e)
            batch[key] = values
        groups = []  # each example's images: a family's processor expands one sample's images together
        for item in items:
            images = iter(item[1])
            groups += [[next(images) for _ in e.images] for e in item[0]]
        batch.update(self.image_inputs(groups))
        batch.update(self.video_inputs([video for item in items for video in (item[2] if len(item) > 2 else [])]))
        return batch

    def generation_inputs(self, question: Question) -> dict[str, torch.Tensor]:
        """One held-out prompt as model inputs (batch of one), images and per-token arrays included."""
        ids = torch.tensor([question.input_ids])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs.update({k: torch.tensor([v]) for k, v in question.extra.items()})
        inputs.update(self.image_inputs([[load_image(ref, question) for ref in question.images]]))
        inputs.update(self.video_inputs([self.read_video(ref, question) for ref in question.videos]))
        return inputs

    def model_hints(self) -> dict[str, Any]:
        t = self.tokenizer
        hints = {"vocab_size": len(t), "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                 "eos_token_id": t.eos_token_id, "image_token_id": self.processor.image_token_id}
        if self.images is not None:
            return {**hints, "processor": self.processor}
        return {**hints, "image_size": self.processor.image_processor.crop_size["height"]}

    def sample_inputs(self, n: int) -> list[Question]:
        """Spread over the held-out questions, and a caption or two when there are captions."""
        n_captions = min(len(self.captions), n if not self.questions else max(1, n // 3))
        n_questions = n - n_captions
        step = max(1, len(self.questions) // max(n_questions, 1))
        return self.questions[::step][:n_questions] + self.captions[:n_captions]
