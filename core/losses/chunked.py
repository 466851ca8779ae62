"""Token losses over a language-model head that never hold the full ``[tokens, vocab]`` logits.

At a 128k vocabulary the fp32 logits of one 4k-token row are 2 GB, before their gradient: the
largest allocation of a step. Here hidden states become logits, then a loss, one chunk of rows at
a time, and only one chunk's logits (and their gradient) exist at any moment.

How: a custom ``torch.autograd.Function`` rather than ``torch.utils.checkpoint`` per chunk. The
Function knows the gradient in closed form (``softmax - onehot``, chained through soft-capping and
temperature), so it needs one ``[chunk, vocab]`` buffer at a time and keeps only the fp32
log-sum-exp per row between forward and backward. A checkpointed chunk would instead replay
PyTorch's dense ``log_softmax`` backward, which saves its own ``[chunk, vocab]`` intermediates and
computes the log-sum-exp twice. Two modes:

* a scalar loss (``reduction="sum"|"mean"``) computes the gradients while it computes the loss
  (as Liger does): 3 matmuls, the same work as the dense path, and backward only scales them;
* per-token outputs (``reduction="none"``, :func:`chunked_token_logprobs`) recompute each chunk's
  logits in backward, because the weight of each row's gradient is known only then (4 matmuls).

The log-sum-exp, the softmax and the weight gradient accumulate in float32 whatever the
parameters' dtype, so the result equals the dense fp32 path to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["chunked_cross_entropy", "chunked_token_logprobs", "default_chunk_size"]

#: One chunk's fp32 logits stay near this many bytes (its softmax and gradient are the same size).
CHUNK_BYTES = 128 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk: a power of two whose fp32 logits fit :data:`CHUNK_BYTES` (64 to 4096 rows).

    128 MiB keeps the matmuls and the per-chunk weight-gradient sums large (256 rows at a 128k vocabulary) while
    the loss's peak stays far below a dense step's; a small vocabulary gets a single chunk in practice."""
    rows = max(1, CHUNK_BYTES // (4 * max(int(vocab_size), 1)))
    return int(min(4096, max(64, 1 << (rows.bit_length() - 1))))


@dataclass(frozen=True)
class _Head:
    """How logits are made from a chunk's matmul output and which gradients are wanted."""

    chunk_size: int
    ignore_index: int
    softcap: float | None
    temperature: float
    entropy: bool
    predictions: bool = False


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            head: _Head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk after soft-capping and temperature, and ``tanh`` for the capping's gradient."""
    z = F.linear(hidden, weight, bias).float()
    tanh = None
    if head.softcap is not None:
        tanh = torch.tanh(z.div_(head.softcap))
        z = tanh * (head.softcap / head.temperature)
    elif head.temperature != 1.0:
        z.div_(head.temperature)
    return z, tanh


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           head: _Head, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
    """Log-prob of each target, entropy, argmax, and (given output gradients) ``d loss / d linear output``."""
    z, tanh = _logits(hidden, weight, bias, head)
    valid = targets != head.ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(1)
    # torch's fused log_softmax: one pass for the max, the log-sum-exp (fp32) and the result
    log_probs = torch.log_softmax(z, dim=-1)
    del z
    zero = torch.zeros((), device=log_probs.device)
    logp = torch.where(valid, log_probs.gather(1, safe).squeeze(1), zero)
    predictions = log_probs.argmax(-1) if head.predictions else None
    entropy = None
    if head.entropy:  # -sum p log p, as written: lse - E_p[z] would cancel digits away
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(-1)
    elif grad_logp is not None:
        probs = log_probs.exp_()
    if grad_logp is None and grad_entropy is None:
        return logp, entropy, predictions, None
    # d logp / dz = onehot - p;  d entropy / dz = -p (log p + entropy); in place where probs is free
    g = torch.where(valid, grad_logp.float(), zero) if grad_logp is not None else None
    if grad_entropy is not None:
        grad = probs * (log_probs + entropy.unsqueeze(1)) * (-grad_entropy.float()).unsqueeze(1)
        if g is not None:
            grad.addcmul_(probs, (-g).unsqueeze(1))
    else:
        grad = probs.mul_((-g).unsqueeze(1))
    if g is not None:
        grad.scatter_add_(1, safe, g.unsqueeze(1))
    del probs
    if head.temperature != 1.0:
        grad.div_(head.temperature)  # z = s / T
    if tanh is not None:  # s = c * tanh(l / c): ds/dl = 1 - tanh^2
        grad.mul_(1 - tanh * tanh)
    return logp, entropy, predictions, grad


def _accumulate(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, grads: list) -> torch.Tensor:
    """Add one chunk's weight and bias gradients (fp32) and return its hidden-state gradient."""
    if grads[1] is not None:
        grads[1] += grad.sum(0)
    if weight.dtype == torch.float32:
        if grads[0] is not None:
            grads[0].addmm_(grad.t(), hidden)
        return grad @ weight
    grad = grad.to(weight.dtype)  # half-precision matmuls, as the dense backward runs them; fp32 sum over chunks
    if grads[0] is not None:
        grads[0] += grad.t() @ hidden
    return grad @ weight


def _grad_buffers(weight: torch.Tensor, bias: torch.Tensor | None, wanted: tuple[bool, bool]) -> list:
    return [torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wanted[0] else None,
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and wanted[1] else None]


class _FusedSum(torch.autograd.Function):
    """Sum of ``-logp`` over rows, gradients computed in forward (no recomputation); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: _Head, wanted: tuple[bool, bool, bool]):  # noqa: ANN001
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        predictions = torch.empty(n if head.predictions else 0, dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wanted[0] else None
        grads = _grad_buffers(weight, bias, wanted[1:])
        ones = torch.full((min(head.chunk_size, n),), -1.0, device=hidden.device)
        for start in range(0, n, head.chunk_size):
            rows = slice(start, start + head.chunk_size)
            h = hidden[rows]
            logp, _, preds, grad = _chunk(h, weight, bias, targets[rows], head, ones[: h.shape[0]], None)
            if preds is not None:
                predictions[rows] = preds
            total -= logp.sum()
            g_h = _accumulate(grad, h, weight, grads)
            if grad_hidden is not None:
                grad_hidden[rows] = g_h
        ctx.mark_non_differentiable(predictions)
        # own buffers, used once: scaled in place in backward, so no second [vocab, hidden] copy
        ctx.grads = (grad_hidden,
                     None if grads[0] is None else grads[0].to(weight.dtype),
                     None if grads[1] is None else grads[1].to(bias.dtype))
        return total, predictions

    @staticmethod
    def backward(ctx, grad_total, _grad_predictions):  # noqa: ANN001
        grads = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None)


class _Recompute(torch.autograd.Function):
    """Per-row log-probs (and entropy); backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: _Head):  # noqa: ANN001
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if head.entropy else 0, dtype=torch.float32, device=hidden.device)
        predictions = torch.empty(n if head.predictions else 0, dtype=torch.long, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n, head.chunk_size):
                rows = slice(start, start + head.chunk_size)
                lp, ent, preds, _ = _chunk(hidden[rows], weight, bias, targets[rows], head, None, None)
                if preds is not None:
                    predictions[rows] = preds
                logp[rows] = lp
                if ent is not None:
                    entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.head = head
        ctx.mark_non_differentiable(predictions)
        return logp, entropy, predictions

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_predictions):  # noqa: ANN001
        hidden, weight, bias, targets = ctx.saved_tensors
        head = ctx.head
        wanted = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if wanted[0] else None
        grads = _grad_buffers(weight, bias, (wanted[1], wanted[2]))
        with torch.no_grad():
            for start in range(0, hidden.shape[0], head.chunk_size):
                rows = slice(start, start + head.chunk_size)
                g_ent = grad_entropy[rows] if head.entropy else None
                h = hidden[rows]
                *_, grad = _chunk(h, weight, bias, targets[rows], head, grad_logp[rows], g_ent)
                g_h = _accumulate(grad, h, weight, grads)
                if grad_hidden is not None:
                    grad_hidden[rows] = g_h
        return (grad_hidden, None if grads[0] is None else grads[0].to(weight.dtype),
                None if grads[1] is None else grads[1].to(bias.dtype), None, None)


def _flat(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} differ before the last dim")
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def _apply(function: type[torch.autograd.Function], hidden: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None, *args):  # noqa: ANN002, ANN202
    """Run ``function`` with autocast's dtype applied once, here, and autocast off inside.

    Under autocast the forward's matmuls would run in half precision and the recomputation in
    backward (which autocast does not reach) in fp32; casting the inputs first keeps both alike,
    and the casts are differentiable, so fp32 master weights still get their gradients."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False):
            return function.apply(hidden, weight, bias, *args)
    return function.apply(hidden, weight, bias, *args)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, chunk_size: int | None = None, ignore_index: int = -100,
                          softcap: float | None = None, reduction: Literal["sum", "mean", "none"] = "mean",
                          return_predictions: bool = False):  # noqa: ANN201
    """Cross-entropy of ``labels`` under ``softcap(hidden @ weight.T + bias)``, one chunk of rows at a time.

    Equals ``F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=...)``
    without holding ``logits``. Labels are not shifted here: pass ``hidden[:, :-1]`` and ``labels[:, 1:]``.

    Args:
        hidden: ``[..., H]`` last hidden states (after the final norm).
        weight: ``[V, H]`` the LM head's weight (tied or not); ``bias``: ``[V]`` or ``None``.
        labels: ``[...]`` target ids; ``ignore_index`` rows add nothing.
        chunk_size: rows per chunk; ``None``: :func:`default_chunk_size` of the vocabulary.
        softcap: Gemma's ``final_logit_softcapping``: logits become ``c * tanh(logits / c)``.
        reduction: ``mean`` over non-ignored rows (NaN when there are none, as torch's), ``sum``, or
            ``none`` (per-row ``[...]``, 0 at ignored rows).
        return_predictions: also return the argmax id of each row (for token accuracy), not differentiable.
    """
    flat_hidden, flat_labels = _flat(hidden, labels)
    head = _Head(chunk_size or default_chunk_size(weight.shape[0]), ignore_index, softcap, 1.0, False,
                 return_predictions)
    if reduction == "none":
        logp, _, predictions = _apply(_Recompute, flat_hidden, weight, bias, flat_labels, head)
        loss = (-logp).reshape(labels.shape)
    elif reduction in ("sum", "mean"):
        wanted = (flat_hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and any(wanted):
            loss, predictions = _apply(_FusedSum, flat_hidden, weight, bias, flat_labels, head, wanted)
        else:
            logp, _, predictions = _apply(_Recompute, flat_hidden, weight, bias, flat_labels, head)
            loss = -logp.sum()
        if reduction == "mean":
            loss = loss / (flat_labels != ignore_index).sum()
    else:
        raise ValueError(f"reduction must be sum, mean or none, not {reduction!r}")
    return (loss, predictions.reshape(labels.shape)) if return_predictions else loss


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                           chunk_size: int | None = None, ignore_index: int = -100, return_entropy: bool = False):  # noqa: ANN201
    """Log-probability of each target token (and the entropy of each row), without the full logits.

    Equals ``log_softmax(softcap(hidden @ weight.T) / temperature).gather(-1, targets)`` (what DPO, GRPO
    and PPO sum over completions); ``ignore_index`` rows give 0 and no gradient. With
    ``return_entropy`` it returns ``(logprobs, entropy)``, both ``[...]`` fp32 and differentiable.
    """
    flat_hidden, flat_targets = _flat(hidden, targets)
    head = _Head(chunk_size or default_chunk_size(weight.shape[0]), ignore_index, softcap, float(temperature),
                 return_entropy)
    logp, entropy, _ = _apply(_Recompute, flat_hidden, weight, bias, flat_targets, head)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp
