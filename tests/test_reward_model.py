"""reward_model: the Bradley-Terry loss by hand, adapters, learning, and a loadable HF export."""

from __future__ import annotations

import math

import torch

from modalforge.config import compose
from modalforge.plugins.text.reward_model.objective import bradley_terry
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series


# pairwise losses start at ln 2 and move slowly: larger batches and more steps to see them fall
RM_FIT = ["optim.warmup_steps=0", "optim.lr=3e-3", "data.batch_size=32"]


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    expected = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    torch.testing.assert_close(bradley_terry(chosen, rejected), torch.tensor(expected))
    with_margin = sum(math.log1p(math.exp(-(c - r - 1))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    torch.testing.assert_close(bradley_terry(chosen, rejected, margin=1.0), torch.tensor(with_margin))


def test_conforms(tmp_path):
    assert_plugin_conforms("reward_model", tmp_path, RM_FIT, steps=30, loss_window=8)


def test_conforms_with_lora_training_the_scalar_head(tmp_path):
    report = assert_plugin_conforms("reward_model", tmp_path, [*RM_FIT, "adapter=lora", "optim.lr=1e-2"],
                                    steps=30, loss_window=8)
    assert any("score" in n for n in report.changed) and any("lora_" in n for n in report.changed)


def test_learns_and_exports_a_hf_sequence_classifier(tmp_path):
    cfg = compose(["plugin=reward_model", *FAST, "trainer.max_steps=150", "trainer.val_check_interval=150",
                   "callbacks=none"])
    trainer, module, dm = run(cfg, tmp_path)
    accuracy = series(tmp_path, "val/preference_accuracy")
    assert accuracy[max(accuracy)] > 0.6, accuracy
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = scores.chunk(2)
    assert (chosen > rejected).float().mean() > 0.55
    assert tokenizer.chat_template and model.config.num_labels == 1
