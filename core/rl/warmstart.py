"""The offline default policy: a tiny Llama taught the arithmetic task by a short SFT, built once and cached.

RL can only improve what a policy already does sometimes: a random tiny model never
answers "What is 3 plus 4?" with "7", so every reward would be 0 and every advantage too.
This builder trains one (a plain supervised loop on the demo conversations, answer tokens
only), saves it with its tokenizer under the modalforge cache
(``rl/arithmetic-policy-<settings hash>``) and loads it from there on later runs.

The demonstrations are imperfect on purpose: a share ``label_noise`` of the SFT answers is
off by one (answer + 1), a systematic error such as a policy distilled from a weaker teacher
carries. The warm-started policy then samples the right answer often but does not prefer it,
which is what RL with a verifier (the exact-match reward) fixes within minutes. On clean
demonstrations the tiny policy's errors are facts it has not memorised, and RL on so small a
model moves greedy accuracy too slowly to show in a demo (measured: see the README).
A plain loop rather than ``train plugin=sft``: it runs inside another run's model building,
without a second Trainer, loggers or run directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from modalforge.data.cache import cache_root, ensure_built
from modalforge.progress import Preparation, preparing
from modalforge.torch_modes import plain_torch
from modalforge.text.tokenize import IGNORE, tokenize_conversation

log = logging.getLogger(__name__)


def _batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            length = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), length), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for r, (x, y) in enumerate(chunk):
                ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            yield ids, mask, labels


def noisy_answers(conversations: list[list[dict[str, Any]]], share: float, seed: int) -> list[list[dict[str, Any]]]:
    """The conversations with the assistant's answer replaced by answer + 1 in a ``share`` of them (seeded)."""
    rng = random.Random(seed)
    out = []
    for messages in conversations:
        *head, last = messages
        if rng.random() < share:
            last = {**last, "content": str(int(last["content"]) + 1)}
        out.append([*head, last])
    return out


def train_arithmetic_policy(folder: Path, *, config: dict[str, Any], steps: int, lr: float, batch_size: int,
                            vocab_size: int, cache_dir: str | None, seed: int, label_noise: float = 0.0) -> None:
    """SFT a tiny model on the demo conversations (a ``label_noise`` share answered off by one) and
    ``save_pretrained`` it (and its tokenizer, built on the clean conversations) to ``folder``."""
    from modalforge.rl.prompts import arithmetic_conversations

    sft_policy(folder, "the arithmetic policy", noisy_answers(arithmetic_conversations(cache_dir), label_noise, seed),
               config=config, steps=steps, lr=lr, batch_size=batch_size, vocab_size=vocab_size, cache_dir=cache_dir,
               seed=seed, meta={"label_noise": label_noise})


def sft_policy(folder: Path, what: str, conversations: list[list[dict[str, Any]]], *, config: dict[str, Any],
               steps: int, lr: float, batch_size: int, vocab_size: int, cache_dir: str | None, seed: int,
               meta: dict[str, Any] | None = None) -> None:
    """SFT a tiny model built from ``config`` on ``conversations`` (assistant tokens only) and save it with the
    arithmetic tokenizer to ``folder``: every offline warm-start policy (this module's, the calculator's)."""
    with preparing(f"rl: warm-starting {what} by SFT", total=steps, unit="step", cached_in=folder.parent) as progress:
        _sft(folder, progress, conversations, config=config, steps=steps, lr=lr, batch_size=batch_size,
             vocab_size=vocab_size, cache_dir=cache_dir, seed=seed, meta=meta or {})


def _sft(folder: Path, progress: Preparation, conversations: list[list[dict[str, Any]]], *, config: dict[str, Any],
         steps: int, lr: float, batch_size: int, vocab_size: int, cache_dir: str | None, seed: int,
         meta: dict[str, Any]) -> None:
    from modalforge.text.models import build_causal_lm
    from modalforge.rl.prompts import arithmetic_tokenizer

    start = time.perf_counter()
    tokenizer = arithmetic_tokenizer(cache_dir, vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_causal_lm(config=dict(config), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        examples = []
        for messages in conversations:
            tok = tokenize_conversation(tokenizer, messages)
            examples.append((tok.input_ids, tok.labels))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
        batches = _batches(examples, batch_size, tokenizer.pad_token_id, random.Random(seed))
        model.train()
        for _ in progress.track(range(steps)):
            ids, mask, labels = next(batches)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
            loss = loss.detach()
            progress.show(loss=f"{float(loss):.3f}")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    # Whichever rank builds the cache writes it: transformers' save_pretrained writes nothing on a rank
    # other than zero once torch.distributed is initialised (a first multi-process run), which left a
    # cached folder without weights.
    model.save_pretrained(str(folder), is_main_process=True)
    if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
        from safetensors.torch import save_model

        model.config.save_pretrained(str(folder))
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    seconds = time.perf_counter() - start
    (folder / "warmstart.json").write_text(json.dumps({"steps": steps, **meta, "final_loss": float(loss),
                                                       "seconds": seconds}))
    progress.summary = f"{steps} steps, final loss {float(loss):.3f}"


def arithmetic_policy_dir(config: dict[str, Any], steps: int = 300, lr: float = 3e-3, batch_size: int = 64,
                          vocab_size: int = 512, cache_dir: str | None = None, seed: int = 0,
                          label_noise: float = 0.6) -> Path:
    """The cached folder of the SFT'd arithmetic policy (model + tokenizer), built on first use."""
    settings = json.dumps({"config": config, "steps": steps, "lr": lr, "batch_size": batch_size,
                           "vocab_size": vocab_size, "seed": seed, "label_noise": label_noise, "v": 2}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / "rl" / f"arithmetic-policy-{digest}"
    if folder.exists():
        return folder
    with plain_torch():
        return ensure_built(folder, lambda tmp: train_arithmetic_policy(
            tmp, config=config, steps=steps, lr=lr, batch_size=batch_size, vocab_size=vocab_size,
            cache_dir=cache_dir, seed=seed, label_noise=label_noise))


def build_arithmetic_policy(config: dict[str, Any], sft_steps: int = 300, sft_lr: float = 3e-3,
                            sft_batch_size: int = 64, vocab_size: int = 512, cache_dir: str | None = None,
                            seed: int = 0, sft_label_noise: float = 0.6):  # noqa: ANN201 - a transformers model
    """Model builder (``model._target_``) of the offline default: the cached SFT'd arithmetic policy.

    Args:
        config: the tiny model's ``transformers`` config (``model_type`` and sizes).
        sft_steps / sft_lr / sft_batch_size: the supervised warm start (changing them builds another policy).
        vocab_size: size of its BPE tokenizer (must match ``data.vocab_size``).
        cache_dir: the modalforge cache.
        seed: initialisation and data order of the warm start.
        sft_label_noise: share of the SFT answers that are off by one (the error RL then corrects; 0: clean).
    """
    from transformers import AutoModelForCausalLM

    folder = arithmetic_policy_dir(dict(config), sft_steps, sft_lr, sft_batch_size, vocab_size, cache_dir, seed,
                                   sft_label_noise)
    return AutoModelForCausalLM.from_pretrained(str(folder))
