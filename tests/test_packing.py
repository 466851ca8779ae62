"""Packing without a dense mask: position ids alone give the loss of the dense block-diagonal mask."""

from __future__ import annotations

import pytest
import torch

from modalforge.text.packing import collate_rows, input_token_count
from modalforge.text.tokenize import IGNORE, Tokenized


def _summed_loss(model, batch, **kwargs):
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flex_attention"])
def test_position_ids_packing_has_no_mask_and_the_loss_of_unpacked_examples(implementation):
    """sdpa and eager get transformers' packed mask, flex_attention its block mask (forward only on CPU:
    FlexAttention has no CPU backward), flash_attention_2 (GPU) its varlen kernel, all from the position ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(0)
    examples = [Tokenized(torch.randint(1, 90, (n,), generator=g).tolist(),
                          [IGNORE] * 2 + torch.randint(1, 90, (n - 2,), generator=g).tolist()) for n in (7, 5, 9, 4, 6)]
    rows = [examples[:3], examples[3:]]  # 21 and 10 tokens: the second row is padded
    free = collate_rows(rows, pad_id=0, packed=True, attention="position_ids")
    dense = collate_rows(rows, pad_id=0, packed=True)
    padded = collate_rows([[e] for e in examples], pad_id=0, packed=False)
    assert "attention_mask" not in free and dense["attention_mask"].shape == (2, 1, 21, 21)
    assert int(input_token_count(free)) == int(input_token_count(padded)) == sum(len(e) for e in examples)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation=implementation)).eval()
    with torch.no_grad():
        unpacked = _summed_loss(model, padded, attention_mask=padded["attention_mask"])
        packed = _summed_loss(model, free, position_ids=free["position_ids"])
        torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
        if implementation == "sdpa":  # the dense mask is exact with sdpa (eager reads a boolean 4-D mask otherwise)
            with_mask = _summed_loss(model, dense, attention_mask=dense["attention_mask"],
                                     position_ids=dense["position_ids"])
            torch.testing.assert_close(packed, with_mask, rtol=1e-5, atol=1e-5)
