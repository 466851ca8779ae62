"""grpo with a reward model as the reward: an HF sequence classifier saved with save_pretrained (as a
`reward_model` run's final/ is) scores the policy's completions, re-tokenised with its own tokenizer."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from modalforge.config import compose
from modalforge.rl.prompts import arithmetic_tokenizer
from modalforge.rl.rewards import RewardModel, load_rewards
from modalforge.run import run

from cli_helpers import FAST, series

SMOKE = ["model=grpo/tiny_llama", "data.batch_size=4", "objective.num_generations=4",
         "objective.max_completion_length=4"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny Llama sequence classifier (one logit) with a tokenizer other than the policy's (one token more)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("rm") / "final"
    tokenizer = arithmetic_tokenizer(None)
    tokenizer.add_tokens(["<|score|>"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a score head large enough that completions get visibly different scores
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_reward_model_scores_the_re_tokenised_text_by_hand(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    (reward,) = load_rewards([f"reward_model:{classifier_dir}"])
    assert reward.name == "reward_model:final" and isinstance(reward.fn, RewardModel)
    prompts = [[{"role": "user", "content": "What is 2 plus 3?"}]] * 2
    got = reward.fn(prompts=prompts, completions=["5", "7 7"])
    model = AutoModelForSequenceClassification.from_pretrained(str(classifier_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(classifier_dir))
    for completion, value in zip(["5", "7 7"], got):
        text = tokenizer.apply_chat_template(prompts[0] + [{"role": "assistant", "content": completion}],
                                             tokenize=False)
        with torch.no_grad():
            expected = model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
        assert value == pytest.approx(expected, abs=1e-4)  # padding in the batch changes nothing
    assert got[0] != pytest.approx(got[1])


def test_grpo_steps_with_a_reward_model_reward(tmp_path, classifier_dir, caplog):
    cfg = compose(["plugin=grpo", *FAST, *SMOKE, f"objective.rewards=['reward_model:{classifier_dir}']",
                   "trainer.max_steps=4", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
                   "optim.lr=1e-2", "optim.warmup_steps=0", "callbacks=none", "checkpoint.export_on_end=false",
                   "trainer.enable_progress_bar=false"])
    with caplog.at_level(logging.WARNING):
        _, module, _ = run(cfg, tmp_path)
    # the policy's tokenizer is not the reward model's: said once
    assert sum("another tokenizer than the policy" in r.getMessage() for r in caplog.records) == 1
    mean, std = series(tmp_path, "train/rewards/reward_model:final/mean"), series(tmp_path, "train/reward_std")
    assert len(mean) == 4 and all(math.isfinite(v) for v in mean.values())
    assert max(std.values()) > 0  # completions are told apart, so there are advantages to learn from
    assert all(math.isfinite(v) for v in series(tmp_path, "train/loss").values())
    # the reward model is a frozen helper: never trained
    from transformers import AutoModelForSequenceClassification

    on_disk = AutoModelForSequenceClassification.from_pretrained(str(classifier_dir)).state_dict()
    (reward_model,) = module.objective.reward_models
    for name, value in reward_model.model.state_dict().items():
        torch.testing.assert_close(value.cpu(), on_disk[name], msg=name)
