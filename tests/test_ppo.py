"""ppo: GAE, whitening, per-token rewards and the clipped losses by hand; conformance; exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from modalforge.config import compose
from modalforge.plugins.text.ppo import losses
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series

mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_token_rewards_put_the_score_on_the_last_token():
    logps, ref = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, 0.0]]), torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.4, 0.0]])
    rewards, kl = losses.token_rewards(torch.tensor([1.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    expected = [[-0.1 * 0.5, -0.1 * -1.0, 0.0 + 1.0], [-0.1 * -0.1, 0.0 - 1.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected))


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.5, 1.0], [0.2, -1.0, 0.0]])
    values = torch.tensor([[0.3, 0.1, 0.4], [0.5, 0.2, 9.0]])  # 9.0 lies past the second completion: ignored
    gamma, lam = 0.9, 0.8
    adv, ret = losses.gae(rewards, values, mask, gamma, lam)

    def by_hand(r, v):
        v = v + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(len(r))]
        return [sum((gamma * lam) ** k * deltas[t + k] for k in range(len(r) - t)) for t in range(len(r))]

    a0, a1 = by_hand([0.0, 0.5, 1.0], [0.3, 0.1, 0.4]), by_hand([0.2, -1.0], [0.5, 0.2])
    torch.testing.assert_close(adv, torch.tensor([a0, a1 + [0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a + v for a, v in zip(a0, [0.3, 0.1, 0.4])],
                                                  [a1[0] + 0.5, a1[1] + 0.2, 0.0]]))


def test_whiten_and_clipped_losses_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(values) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    torch.testing.assert_close(losses.whiten(x, mask)[0], torch.tensor([(v - mean) / std for v in values[:3]]))

    logps, old = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]), torch.tensor([[-1.2, -0.4, -1.5], [-0.6, -1.0, 0.0]])
    adv = torch.tensor([[0.5, -1.0, 2.0], [1.0, -0.5, 0.0]])
    tokens = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    c = 0.2

    def pg(i, t):
        r, a = math.exp(logps[i, t] - old[i, t]), adv[i, t].item()
        return max(-a * r, -a * min(max(r, 1 - c), 1 + c))

    loss, _ = losses.policy_loss(logps, old, adv, mask, c)
    assert loss.item() == pytest.approx(sum(pg(i, t) for i, t in tokens) / 5, abs=1e-6)

    v, v_old, ret = logps.neg(), old.neg(), torch.tensor([[1.0, 0.0, 2.5], [0.0, 2.0, 0.0]])

    def vf(i, t):
        clipped = v_old[i, t] + min(max(v[i, t] - v_old[i, t], -c), c)
        return 0.5 * max((v[i, t] - ret[i, t]).item() ** 2, (clipped - ret[i, t]).item() ** 2)

    loss, _ = losses.value_loss(v, v_old, ret, mask, c)
    assert loss.item() == pytest.approx(sum(vf(i, t) for i, t in tokens) / 5, abs=1e-6)


SMOKE = ["model=ppo/tiny_llama", "objective.rewards=[digits]", "data.batch_size=8", "objective.max_completion_length=4"]


def test_conforms(tmp_path):
    # one rollout, 8 PPO epochs: the value loss (most of the loss at the start) falls; the value head trains
    report = assert_plugin_conforms("ppo", tmp_path, [*SMOKE, "objective.num_ppo_epochs=8", "optim.lr=3e-3"],
                                    steps=8, loss_window=3)
    assert any(name.startswith("objective.value_head") for name in report.changed)


def test_resume_mid_rollout_is_exact(tmp_path):
    common = ["plugin=ppo", *FAST, *SMOKE, "objective.num_ppo_epochs=2", "objective.num_mini_batches=2",
              "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=3",
              "checkpoint.export_on_end=false", "trainer.enable_progress_bar=false", "callbacks=none"]
    run(compose([*common, "trainer.max_steps=5"]), tmp_path / "a")
    run(compose([*common, "trainer.max_steps=3"]), tmp_path / "b")
    run(compose([*common, "trainer.max_steps=5", "ckpt_path=last"]), tmp_path / "b")
    a, b = series(tmp_path / "a", "train/loss"), series(tmp_path / "b", "train/loss")
    assert [a[s] for s in sorted(a)] == pytest.approx([b[s] for s in sorted(b)], abs=1e-6)


def test_default_config_binds():
    from modalforge.testing import check_config_binds

    assert not check_config_binds(compose(["plugin=ppo"]))
