"""audio_lm data: (audio, question, answer) and (audio, transcript) records -> chat tokens, log-Mel features.

Each record becomes a two-turn chat: the user turn holds an audio part and the question (a transcript
record asks ``data.transcribe_prompt``), the assistant turn the answer. The chat is rendered by the
processor's template (Qwen2-Audio's published one, which renders an audio part as
``Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>``) through the core chat API
(:func:`modalforge.text.tokenize.tokenize_conversation`), so only assistant tokens are learned. The
``Qwen2AudioProcessor`` then expands the one ``<|AUDIO|>`` into as many tokens as the encoder makes for
that clip and computes the features; the labels follow that expansion here (audio tokens never learned),
and any other difference between the two tokenisations is an error naming the record.

``audio`` is a wav/flac path (relative to the manifest) or a list of samples (``sample_rate``, default
16000). A bad record (missing or blank field, wrong type, empty sample list) is a ``DataError`` naming
the file and line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from modalforge.data.audio import AudioRef, load_audio
from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.errors import DataError
from modalforge.data.images import resolve_image_path
from modalforge.data.readers import Record, require_text
from modalforge.data.tokenizers import cached_bpe, load_tokenizer
from modalforge.plugins.multimodal.audio_lm.synthetic import write_audio_lm_sets
from modalforge.text.formats import Message
from modalforge.text.templates import SPECIAL_TOKENS
from modalforge.text.tokenize import IGNORE, render, tokenize_conversation

log = logging.getLogger(__name__)
SAMPLE_RATE = 16000
AUDIO_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def qwen2_audio_template() -> str:
    """Qwen2-Audio's published chat template, as transformers ships it (``Qwen2AudioProcessor``)."""
    from transformers import Qwen2AudioProcessor

    return Qwen2AudioProcessor.default_chat_template.fget(None)


@dataclass
class Clip:
    """One record: where its audio is (a file, or samples), the question and the reference answer."""

    question: str
    answer: str
    source: str
    location: str
    path: str | None = None
    samples: np.ndarray | None = None
    rate: int = SAMPLE_RATE

    @property
    def where(self) -> str:
        return f"{self.source}, {self.location}"

    def wave(self) -> np.ndarray:
        """Mono float32 at 16 kHz; an unreadable file is a ``DataError`` naming the record and the file."""
        if self.samples is not None:
            wave = torch.from_numpy(self.samples)
            if self.rate != SAMPLE_RATE:
                import torchaudio.functional as AF

                wave = AF.resample(wave, self.rate, SAMPLE_RATE)
            return wave.numpy()
        try:
            return load_audio(AudioRef(path=self.path, where=self.where), SAMPLE_RATE).numpy()
        except DataError as err:
            raise DataError(f"audio {self.path}: {err.detail}", source=self.source, location=self.location) from None

    def messages(self, with_answer: bool = True) -> list[Message]:
        user = {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": self.question}]}
        return [user, {"role": "assistant", "content": self.answer}] if with_answer else [user]


def parse_clip(record: Record, fields: dict[str, str], transcribe_prompt: str) -> Clip:
    """A record as a :class:`Clip`, or a ``DataError`` naming file and line."""
    data = record.data
    audio = data.get(fields["audio"])
    kwargs: dict[str, Any] = {}
    if isinstance(audio, str) and audio.strip():
        kwargs["path"] = resolve_image_path(audio, record.source)
    elif isinstance(audio, list) and audio and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    for x in audio):
        rate = data.get("sample_rate", SAMPLE_RATE)
        if not isinstance(rate, int) or rate <= 0:
            raise DataError(f"sample_rate must be a positive integer, got {rate!r}", source=record.source,
                            location=record.location)
        kwargs.update(samples=np.asarray(audio, dtype=np.float32), rate=rate)
    else:
        raise DataError(f"{fields['audio']!r} must be an audio path or a non-empty list of samples, got "
                        f"{type(audio).__name__ if audio is not None else 'nothing'}", source=record.source,
                        location=record.location, hint="e.g. {\"audio\": \"clips/1.wav\", \"question\": ..., "
                                                       "\"answer\": ...} or {\"audio\": ..., \"transcript\": ...}")
    if fields["transcript"] in data and fields["answer"] not in data:
        answer = require_text(record, fields["transcript"], "a transcript").strip()
        question = transcribe_prompt
    else:
        question = require_text(record, fields["question"], "a question").strip()
        answer = require_text(record, fields["answer"], "an answer").strip()
    if not question or not answer:
        raise DataError("blank question, answer or transcript: an empty target teaches nothing",
                        source=record.source, location=record.location)
    return Clip(question, answer, record.source, record.location, **kwargs)


class Clips(Dataset):
    """Model inputs (expanded ids, labels, features, feature mask) per clip."""

    def __init__(self, items: list[Clip], module: "AudioLMDataModule") -> None:
        self.items, self.module = items, module

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.module.encode(self.items[index])


def follow_expansion(ids: list[int], labels: list[int], expanded: list[int], audio_id: int,
                     where: str) -> list[int]:
    """``labels`` aligned with ``expanded`` (each audio token a run of them, never learned)."""
    out, j = [], 0
    for token, label in zip(ids, labels):
        if token == audio_id:
            start = j
            while j < len(expanded) and expanded[j] == audio_id:
                j += 1
            if j == start:
                raise DataError("the processor dropped an audio placeholder", source=where)
            out += [IGNORE] * (j - start)
        elif j < len(expanded) and expanded[j] == token:
            out.append(label)
            j += 1
        else:
            raise DataError("the processor tokenises this chat differently from its chat template's rendering",
                            source=where)
    if j != len(expanded):
        raise DataError("the processor added tokens the chat template does not render", source=where)
    return out


class AudioLMDataModule(SourcedDataModule):
    """Audio question answering and transcription data for a Qwen2-Audio model.

    Args:
        train / val: jsonl/json/parquet/csv manifests (``audio`` path or samples, ``question`` + ``answer`` or
            ``transcript``); ``None`` generates the beeps demo (``demo``: ``mixed`` or ``beeps``).
        processor: a Qwen2-Audio folder whose processor to use (a previous run's ``final/``).
        tokenizer: a language model folder whose tokenizer to use; ``None`` trains a BPE on the data.
        audio_encoder: a Whisper folder whose feature extractor to use (a whisper_asr run's ``final/``).
        audio_field / question_field / answer_field / transcript_field: record fields.
        transcribe_prompt: the question a transcript record asks.
        num_mel_bins / chunk_seconds: feature extractor of a from-scratch encoder (window in seconds).
        vocab_size: size of the trained BPE. max_length: tokens per example once audio expands.
        num_eval_questions: held-out records answered greedily at each validation (``val/acc``).
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    decodes_per_item = True

    def __init__(self, train: Any = None, val: Any = None, demo: Literal["mixed", "beeps"] = "mixed",
                 processor: str | None = None, tokenizer: str | None = None, audio_encoder: str | None = None,
                 audio_field: str = "audio", question_field: str = "question", answer_field: str = "answer",
                 transcript_field: str = "transcript", transcribe_prompt: str = "Transcribe the audio.",
                 num_mel_bins: int = 80, chunk_seconds: int = 1, vocab_size: int = 320, max_length: int = 128,
                 num_eval_questions: int = 32, batch_size: int = 16, num_workers: Any = 0,
                 val_fraction: float = 0.05, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        self.demo, self.processor_path, self.tokenizer_name = demo, processor, tokenizer
        self.audio_encoder = audio_encoder
        self.fields = {"audio": audio_field, "question": question_field, "answer": answer_field,
                       "transcript": transcript_field}
        self.transcribe_prompt = transcribe_prompt
        self.num_mel_bins, self.chunk_seconds, self.vocab_size = num_mel_bins, chunk_seconds, vocab_size
        self.max_length, self.num_eval_questions = max_length, num_eval_questions
        self.processor: Any = None
        self.tokenizer: Any = None
        self.questions: list[Clip] = []

    # ---- sources ------------------------------------------------------------------------
    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "audio-lm-beeps-v2", write_audio_lm_sets)
        return str(folder / f"{self.demo}_train.jsonl"), str(folder / f"{self.demo}_val.jsonl")

    def parse(self, record: Record) -> Clip:
        return parse_clip(record, self.fields, self.transcribe_prompt)

    # ---- processor ----------------------------------------------------------------------
    def _build_processor(self, train: list[Clip]) -> Any:
        from transformers import AutoProcessor, Qwen2AudioProcessor, WhisperFeatureExtractor

        if self.processor_path:
            try:
                return AutoProcessor.from_pretrained(str(Path(self.processor_path).expanduser()))
            except Exception as err:  # noqa: BLE001
                from modalforge.models import offline_hint

                raise offline_hint(self.processor_path, err, what="processor") from err
        specials = SPECIAL_TOKENS["chatml"] + AUDIO_TOKENS
        if self.tokenizer_name:
            tokenizer = load_tokenizer(self.tokenizer_name)
            missing = [t for t in specials if t not in tokenizer.get_vocab()]
            if missing:
                tokenizer.add_special_tokens({"additional_special_tokens": missing})
        else:
            texts = [c.question for c in train] + [c.answer for c in train] + ["You are a helpful assistant. Audio"]
            tokenizer = cached_bpe(texts, self.vocab_size, cache_dir=self.cache_dir, extra_special_tokens=specials)
        template = qwen2_audio_template()
        tokenizer.chat_template = template
        if self.audio_encoder:
            extractor = WhisperFeatureExtractor.from_pretrained(str(Path(self.audio_encoder).expanduser()))
        else:
            extractor = WhisperFeatureExtractor(feature_size=self.num_mel_bins, sampling_rate=SAMPLE_RATE,
                                                chunk_length=self.chunk_seconds)
        return Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=template)

    def fit(self, train: list[Clip]) -> None:
        self.processor = self._build_processor(train)
        self.tokenizer = self.processor.tokenizer
        self.questions = self.first_val_items()[: self.num_eval_questions]

    def build(self, items: list[Clip], what: str) -> Clips:
        return Clips(items, self)

    # ---- examples -----------------------------------------------------------------------
    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.processor.audio_token)

    def _process(self, clip: Clip, messages: list[Message], prompt: bool) -> dict[str, torch.Tensor]:
        text = render(self.tokenizer, messages, prompt, where=clip.where)
        return self.processor(text=[text], audio=[clip.wave()], sampling_rate=SAMPLE_RATE, return_tensors="pt",
                              add_special_tokens=False)

    def encode(self, clip: Clip) -> dict[str, torch.Tensor]:
        """One training example: the processor's expanded ids and features, assistant-only labels."""
        messages = clip.messages()
        chat = tokenize_conversation(self.tokenizer, messages, where=clip.where)
        out = self._process(clip, messages, False)
        expanded = out["input_ids"][0].tolist()
        labels = follow_expansion(chat.input_ids, chat.labels, expanded, self.audio_token_id, clip.where)
        if len(expanded) > self.max_length:
            raise DataError(f"{len(expanded)} tokens once the audio expands, longer than data.max_length="
                            f"{self.max_length}", source=clip.source, location=clip.location)
        return {"input_ids": out["input_ids"][0], "labels": torch.tensor(labels),
                "input_features": out["input_features"][0], "feature_attention_mask": out["feature_attention_mask"][0]}

    def generation_inputs(self, clip: Clip) -> dict[str, torch.Tensor]:
        """A held-out prompt (user turn + generation prompt) as model inputs, batch of one."""
        out = self._process(clip, clip.messages(with_answer=False), True)
        return {k: out[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(x["input_ids"]) for x in items)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(items), length), pad, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "input_features": torch.stack([x["input_features"] for x in items]),
                "feature_attention_mask": torch.stack([x["feature_attention_mask"] for x in items])}

    # ---- what the objective and the run read ----------------------------------------------
    def model_hints(self) -> dict[str, Any]:
        t, fe = self.tokenizer, self.processor.feature_extractor
        return {"vocab_size": len(t), "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id, "audio_token_id": self.audio_token_id,
                "num_mel_bins": fe.feature_size, "max_source_positions": fe.nb_max_frames // 2}

    def save_processor(self, directory: str | Path) -> None:
        self.processor.save_pretrained(str(directory))

    def sample_inputs(self, n: int) -> list[Clip]:
        return self.questions[:n]
