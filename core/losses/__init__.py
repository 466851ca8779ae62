"""Token losses over a language-model head: chunked (no full logits), and the ``module.loss_impl`` switch."""

from modalforge.losses.chunked import chunked_cross_entropy, chunked_token_logprobs, default_chunk_size
from modalforge.losses.lm import (AUTO_MIN_VOCAB, LOSS_IMPLS, LMHead, TokenLoss, lm_head, resolve_loss_impl,
                                  token_logprobs, token_loss)

__all__ = ["AUTO_MIN_VOCAB", "LOSS_IMPLS", "LMHead", "TokenLoss", "chunked_cross_entropy", "chunked_token_logprobs",
           "default_chunk_size", "lm_head", "resolve_loss_impl", "token_logprobs", "token_loss"]
