"""The next-token loss of a Hugging Face causal LM, by the implementation ``module.loss_impl`` names.

``dense`` asks the model for its logits (``[batch, length, vocab]``); the others call the model's
body for its last hidden states and apply the LM head's weight themselves, so the full logits are
never held: ``chunked`` (:mod:`modalforge.losses.chunked`, exact, any device), ``liger`` (Liger
Kernel's fused linear cross-entropy) and ``cce`` (Apple's Cut Cross-Entropy), both GPU kernels.
``auto`` is ``chunked`` at a vocabulary of :data:`AUTO_MIN_VOCAB` tokens or more and ``dense``
below: a 32k-vocabulary fp32 logits tensor is already 128 KiB per token, while under it the logits
are small next to the activations and one dense matmul is the fastest path.

Where the body cannot be called alone exactly (a compiled or FSDP-sharded model, PEFT prompt
learning, a LoRA'd or wrapped LM head, logit scaling other than Gemma's soft-capping), ``auto``
falls back to ``dense`` and an explicit choice fails with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modalforge.errors import ConfigError
from modalforge.losses.chunked import chunked_cross_entropy, chunked_token_logprobs

__all__ = ["AUTO_MIN_VOCAB", "LOSS_IMPLS", "LMHead", "TokenLoss", "lm_head", "resolve_loss_impl", "token_logprobs",
           "token_loss"]

log = logging.getLogger(__name__)

LOSS_IMPLS: tuple[str, ...] = ("auto", "chunked", "dense", "liger", "cce")
#: ``auto`` chunks from this vocabulary size on.
AUTO_MIN_VOCAB = 32_000
IGNORE_INDEX = -100
_PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}


@dataclass
class LMHead:
    """What turns a causal LM's last hidden states into logits."""

    body: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None


@dataclass
class TokenLoss:
    """Mean next-token CE over the learned tokens, their count and (dense/chunked) their accuracy."""

    loss: torch.Tensor
    count: int
    accuracy: torch.Tensor | None


def _hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head(model: nn.Module) -> LMHead | str:
    """The body, head weight/bias and soft-cap of a (PEFT-wrapped) HF causal LM, or why it cannot be had."""
    if hasattr(model, "_orig_mod"):
        return "the model is compiled (module.compile=true)"
    config = getattr(model, "peft_config", None)
    if config and any(getattr(c, "is_prompt_learning", False) for c in config.values()):
        return "a prompt-learning adapter (prefix/prompt tuning) adds its tokens in the PEFT forward"
    hf = _hf_model(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    body = getattr(hf, getattr(hf, "base_model_prefix", ""), None) if getattr(hf, "base_model_prefix", "") else None
    if head is None or body is None or body is hf:
        return f"{type(hf).__name__} has no separate body and LM head"
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__} (an adapter on lm_head), not a plain Linear"
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor) or any(isinstance(p, DTensor) for p in body.parameters()):
        return "the model is sharded (FSDP): its body cannot be called apart from the root module"
    config = getattr(hf, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("logit_scale", "logits_scaling"):
        if getattr(text, name, None) not in (None, 1, 1.0):
            return f"its config scales logits ({name}={getattr(text, name)})"
    softcap = getattr(text, "final_logit_softcapping", None)
    return LMHead(body, head.weight, head.bias, float(softcap) if softcap else None)


def resolve_loss_impl(impl: str, model: nn.Module) -> tuple[str, LMHead | None]:
    """The implementation ``impl`` means for ``model``, with its head (``None`` for dense)."""
    if impl not in LOSS_IMPLS:
        raise ConfigError(f"{impl!r} is not one of: {', '.join(LOSS_IMPLS)}", where="module.loss_impl")
    if impl == "dense":
        return "dense", None
    head = lm_head(model)
    if impl == "auto":
        if isinstance(head, str) or head.weight.shape[0] < AUTO_MIN_VOCAB:
            return "dense", None
        return "chunked", head
    if isinstance(head, str):
        raise ConfigError(f"{impl} cannot compute this model's loss: {head}", where="module.loss_impl",
                          hint="use module.loss_impl=dense (or auto, which falls back to dense here)")
    if impl in _PACKAGES:
        module, package = _PACKAGES[impl]
        try:
            __import__(module)
        except ImportError as err:
            raise ConfigError(f"{impl} needs the package {package}, which is not importable ({err})",
                              where="module.loss_impl",
                              hint=f"pip install {package} (a GPU kernel), or use module.loss_impl=chunked") from err
    return impl, head


def _fused_loss(impl: str, head: LMHead, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Liger's or Cut Cross-Entropy's mean CE over non-ignored rows (GPU kernels)."""
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, softcap=head.softcap, reduction="mean")
        return loss_fn(head.weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), head.bias)
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, head.weight, labels, bias=head.bias, ignore_index=IGNORE_INDEX,
                                softcap=head.softcap, reduction="mean")


def token_loss(model: nn.Module, labels: torch.Tensor, *, impl: str = "auto", accuracy: bool = True,
               **inputs: Any) -> TokenLoss:
    """Mean next-token CE of ``model(**inputs)`` over ``labels[:, 1:] != -100``, shifted here.

    The same number in every implementation: ``dense`` is ``cross_entropy`` of the fp32 logits over
    the learned tokens, as transformers computes it; the others equal it (``chunked`` to rounding).
    ``accuracy``: also the argmax accuracy on those tokens (dense and chunked; ``None`` otherwise)."""
    name, head = resolve_loss_impl(impl, model)
    # Shifted by padding the labels (as transformers does), not by slicing the logits, which would copy them.
    targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    if name == "dense":
        logits = model(**inputs, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=IGNORE_INDEX)
        return TokenLoss(loss, count, (logits.argmax(-1)[mask] == targets[mask]).float().mean() if accuracy else None)
    hidden = head.body(**inputs, use_cache=False)[0]
    if name == "chunked":
        loss, predictions = chunked_cross_entropy(hidden, head.weight, targets, bias=head.bias,
                                                  softcap=head.softcap, return_predictions=True)
        return TokenLoss(loss, count, (predictions[mask] == targets[mask]).float().mean() if accuracy else None)
    return TokenLoss(_fused_loss(name, head, hidden, targets), count, None)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, *, keep: int | None = None, impl: str = "auto",
                   temperature: float = 1.0, entropy: bool = False, entropy_grad: bool = True,
                   **inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log p(input_ids[:, t] | input_ids[:, :t])`` for the last ``keep`` positions (all but the first by
    default), fp32 ``[batch, keep]``, and with ``entropy`` each of those rows' entropy.

    What DPO, GRPO and PPO sum over completions. ``dense`` takes the model's logits (only the
    ``keep + 1`` last, ``logits_to_keep``); ``chunked`` applies the LM head per chunk of rows
    (:func:`~modalforge.losses.chunked_token_logprobs`) and never holds ``[batch, keep, vocab]``
    logits, which at a 128k vocabulary are most of the step's memory. ``auto`` picks chunked from
    a 32k vocabulary where the model allows it (see :func:`resolve_loss_impl`); fused GPU kernels
    (liger, cce) give only a loss, so they mean chunked here. ``entropy_grad=False``: the entropy
    is a metric only, and keeps no ``[batch, keep, vocab]`` tensors for the backward pass.
    """
    keep = input_ids.shape[1] - 1 if keep is None else keep
    name, head = resolve_loss_impl(impl, model)
    targets = input_ids[:, -keep:]
    if name == "dense":
        extra = {"logits_to_keep": keep + 1} if keep + 1 < input_ids.shape[1] else {}
        logits = model(input_ids=input_ids, **inputs, **extra, use_cache=False).logits[:, -keep - 1:-1].float()
        log_probs = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
        logps = log_probs.gather(-1, targets[..., None]).squeeze(-1)
        if not entropy:
            return logps, None
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            return logps, -(log_probs.exp() * log_probs).sum(-1)
    hidden = head.body(input_ids=input_ids, **inputs, use_cache=False)[0][:, -keep - 1:-1]
    out = chunked_token_logprobs(hidden, head.weight, targets, bias=head.bias, temperature=temperature,
                                 softcap=head.softcap, return_entropy=entropy)
    if not entropy:
        return out, None
    return out[0], (out[1] if entropy_grad else out[1].detach())
