"""Tokenizers: load a model's own, or train a byte-level BPE on the training data.

From-scratch models need a vocabulary that fits their data; training one with
Hugging Face ``tokenizers`` takes seconds on a small corpus and is saved with the
run (``PreTrainedTokenizerFast.save_pretrained``) so the output folder loads with
plain ``transformers``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

from modalforge.data.cache import cache_root, ensure_built
from modalforge.models import check_hub, offline_hint
from modalforge.progress import preparing

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}


def load_tokenizer(name_or_path: str, **kwargs):  # noqa: ANN201 - transformers type, imported lazily
    """``AutoTokenizer.from_pretrained`` with a clear error when the hub is unreachable.

    A tokenizer without a pad token gets its EOS token as pad (the usual causal-LM choice).
    """
    from transformers import AutoTokenizer

    check_hub(name_or_path, "tokenizer", where=None)  # no network: seconds, not a minute of retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - OSError, HTTP errors, ValueError all mean "cannot load"
        raise offline_hint(name_or_path, err, what="tokenizer") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, *, extra_special_tokens: Sequence[str] = (),
              chat_template: str | None = None):  # noqa: ANN201
    """Train a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(extra_special_tokens)
    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS,
                                        additional_special_tokens=list(extra_special_tokens) or None)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def cached_bpe(texts: Sequence[str], vocab_size: int, *, cache_dir: str | Path | None = None,
               extra_special_tokens: Sequence[str] = (), chat_template: str | None = None):  # noqa: ANN201
    """``train_bpe`` once per (corpus, settings), kept in the cache so every rank and rerun agrees."""
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "replace"))
        digest.update(b"\0")
    digest.update(f"{vocab_size}|{list(extra_special_tokens)}|{chat_template}".encode())
    folder = cache_root(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"

    def build(tmp: Path) -> None:
        with preparing(f"training a {vocab_size}-token BPE on {len(texts)} texts", cached_in=folder.parent):
            train_bpe(texts, vocab_size, extra_special_tokens=extra_special_tokens,
                      chat_template=chat_template).save_pretrained(str(tmp))

    return PreTrainedTokenizerFast.from_pretrained(str(ensure_built(folder, build)))
