"""grpo: advantages and every loss against its paper's formula by hand (and trl's code where installed),
rewards as plain Python with clear errors, conformance, a run whose reward rises, exact resume."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from modalforge.config import compose
from modalforge.errors import ModalforgeError
from modalforge.plugins.text.grpo import losses
from modalforge.rl.rewards import combine, exact_match, load_rewards, score
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series

# two completions of up to three tokens; the second has two tokens
logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]])
old = torch.tensor([[-1.2, -0.4, -1.5], [-0.6, -1.0, 0.0]])
ref = torch.tensor([[-1.1, -0.7, -1.9], [-0.2, -1.3, 0.0]])
mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
adv = torch.tensor([0.8, -0.5])
EPS = 0.2


def clipped(r: float, a: float, lo: float = EPS, hi: float = EPS) -> float:
    return -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)


def per_token_by_hand(fn) -> list[list[float]]:
    return [[fn(i, t) for t in range(3)] for i in range(2)]


def ratio(i: int, t: int) -> float:
    return math.exp(logps[i, t] - old[i, t])


# ---- advantages -----------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # G = 3: groups [1,0,0] and [1,1,1]
    mean1, std1 = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # Bessel-corrected
    got, _ = losses.group_advantages(rewards, 3, "group")
    expected = [(1 - mean1) / (std1 + 1e-4), -mean1 / (std1 + 1e-4), -mean1 / (std1 + 1e-4), 0, 0, 0]
    torch.testing.assert_close(got, torch.tensor(expected))
    none, _ = losses.group_advantages(rewards, 3, "none")
    torch.testing.assert_close(none, torch.tensor([1 - mean1, -mean1, -mean1, 0, 0, 0]))
    batch_std = torch.tensor(rewards.tolist()).std().item()
    batch, _ = losses.group_advantages(rewards, 3, "batch")
    torch.testing.assert_close(batch, torch.tensor([1 - mean1, -mean1, -mean1, 0, 0, 0]) / (batch_std + 1e-4))


def test_rloo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0])  # G = 2... as G = 4, one group
    got = losses.rloo_advantages(rewards, 4)
    expected = [r - (sum(rewards.tolist()) - r) / 3 for r in rewards.tolist()]
    torch.testing.assert_close(got, torch.tensor(expected))


# ---- losses -------------------------------------------------------------------------------
def test_kl_k3_by_hand():
    kl = losses.per_token_kl(logps, ref)
    expected = per_token_by_hand(lambda i, t: math.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]).item() - 1)
    torch.testing.assert_close(kl, torch.tensor(expected))


def _clipped_tokens(lo=EPS, hi=EPS):
    return per_token_by_hand(lambda i, t: clipped(ratio(i, t), adv[i].item(), lo, hi))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_clipped_losses_aggregate_as_each_paper(loss_type):
    per = _clipped_tokens()
    seq_sum = [per[0][0] + per[0][1] + per[0][2], per[1][0] + per[1][1]]
    expected = {
        "grpo": (seq_sum[0] / 3 + seq_sum[1] / 2) / 2,     # DeepSeekMath: 1/G sum_i 1/|o_i| sum_t
        "bnpo": sum(seq_sum) / 5,                          # tokens of the batch
        "dr_grpo": sum(seq_sum) / (2 * 4),                 # Dr. GRPO: B x max_completion_length (4)
        "dapo": sum(seq_sum) / 10,                         # DAPO: tokens of the whole generation batch (10 here)
        "luspo": (seq_sum[0] + seq_sum[1]) / 2,            # sum per sequence, mean over sequences
    }[loss_type]
    got, stats = losses.grpo_loss(loss_type, logps, old, adv, mask, max_completion_length=4, num_items=10.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert 0 <= stats["clip_ratio/region"].item() <= 1


def test_clip_higher_two_sided_and_kl_penalty():
    lo, hi, delta, beta = 0.1, 0.3, 1.15, 0.05

    def token(i, t):
        r, a = ratio(i, t), adv[i].item()
        capped = min(r, delta)
        policy = -min(capped * a, min(max(r, 1 - lo), 1 + hi) * a)
        d = (ref[i, t] - logps[i, t]).item()
        return policy + beta * (math.exp(d) - d - 1)

    per = per_token_by_hand(token)
    expected = ((per[0][0] + per[0][1] + per[0][2]) / 3 + (per[1][0] + per[1][1]) / 2) / 2
    got, stats = losses.grpo_loss("grpo", logps, old, adv, mask, ref_logps=ref, beta=beta, epsilon_low=lo,
                                  epsilon_high=hi, delta=delta)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert "kl" in stats


def test_gspo_sequence_level_ratio():
    s = [math.exp(((logps[i] - old[i]) * mask[i]).sum().item() / mask[i].sum().item()) for i in range(2)]
    seq_loss = [clipped(s[i], adv[i].item()) for i in range(2)]  # constant over the sequence's tokens
    got, _ = losses.grpo_loss("grpo", logps, old, adv, mask, level="sequence")
    assert got.item() == pytest.approx(sum(seq_loss) / 2, abs=1e-6)


def test_cispo_sapo_vespo_by_hand():
    hi = 4.0
    per = per_token_by_hand(lambda i, t: -min(ratio(i, t), hi) * adv[i].item() * logps[i, t].item())
    got, _ = losses.grpo_loss("cispo", logps, old, adv, mask, epsilon_high=hi, num_items=5.0)
    assert got.item() == pytest.approx(sum(per[0]) / 5 + sum(per[1][:2]) / 5, abs=1e-6)

    def sapo(i, t):
        tau = 1.0 if adv[i] > 0 else 1.05
        return -4 / tau * (1 / (1 + math.exp(-tau * (ratio(i, t) - 1)))) * adv[i].item()

    per = per_token_by_hand(sapo)
    got, _ = losses.grpo_loss("sapo", logps, old, adv, mask)
    assert got.item() == pytest.approx((sum(per[0]) / 3 + sum(per[1][:2]) / 2) / 2, abs=1e-6)

    def phi(i):
        w = math.exp(((logps[i] - old[i]) * mask[i]).sum().item())
        k, lam = (2.0, 3.0) if adv[i] >= 0 else (3.0, 2.0)
        return math.exp(lam) * w ** k * math.exp(-lam * w)

    per = per_token_by_hand(lambda i, t: -phi(i) * adv[i].item() * logps[i, t].item())
    got, _ = losses.grpo_loss("vespo", logps, old, adv, mask, num_items=5.0)
    assert got.item() == pytest.approx((sum(per[0]) + sum(per[1][:2])) / 5, abs=1e-6)


def test_rloo_sequence_ratio_and_entropy_bonus():
    seq = [clipped(math.exp(((logps[i] - old[i]) * mask[i]).sum().item()), adv[i].item()) for i in range(2)]
    ent = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])
    got, stats = losses.grpo_loss("rloo", logps, old, adv, mask, entropies=ent, entropy_coef=0.1)
    assert got.item() == pytest.approx(sum(seq) / 2 - 0.1 * 7.0 / 5, abs=1e-6)
    assert stats["entropy"].item() == pytest.approx(7.0 / 5)


def test_on_policy_ratio_is_one_with_the_policy_gradient():
    x = logps.clone().requires_grad_(True)
    loss, _ = losses.grpo_loss("grpo", x, None, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-(adv * 1).mean().item(), abs=1e-6)
    expected = -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 2  # d/dlogp of -A * exp(logp - sg(logp))
    torch.testing.assert_close(x.grad, expected)


# ---- trl parity ---------------------------------------------------------------------------
def _trl_loss(loss_type, beta=0.0, epsilon_low=EPS, epsilon_high=EPS, delta=None, level="token", entropy_coef=0.0):
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    torch.manual_seed(0)
    B, T = 6, 5
    lp = -torch.rand(B, T) * 2
    old_lp = lp + 0.3 * torch.randn(B, T)
    ref_lp = lp + 0.2 * torch.randn(B, T)
    ent = torch.rand(B, T) * 3
    m = torch.ones(B, T)
    m[1, 3:] = 0
    m[4, 1:] = 0
    a = torch.randn(B)
    num_items = m.sum() * 1.5
    accel = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                            gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (lp, ent, None), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta, loss_type=loss_type,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=T,
        accelerator=accel, _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=False, sapo_temperature_pos=1.0,
                             sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                             vespo_lambda_neg=2.0, steps_per_generation=1),
        get_gamma_weights=trl_grpo.GRPOTrainer.get_gamma_weights)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m, "advantages": a,
              "old_per_token_logps": old_lp, "ref_per_token_logps": ref_lp, "num_items_in_batch": num_items}
    theirs = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    ours, _ = losses.grpo_loss(loss_type, lp, old_lp, a, m, ref_logps=ref_lp, beta=beta, entropies=ent,
                               entropy_coef=entropy_coef, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                               delta=delta, level=level, max_completion_length=T, num_items=num_items)
    return float(ours), float(theirs)


@pytest.mark.parametrize("loss_type,kwargs", [
    ("grpo", {}), ("grpo", {"beta": 0.04, "entropy_coef": 0.01}), ("dapo", {"epsilon_high": 0.28}),
    ("dr_grpo", {"beta": 0.1}), ("bnpo", {"delta": 1.2}), ("grpo", {"level": "sequence"}),
    ("cispo", {"epsilon_high": 5.0}), ("sapo", {}), ("luspo", {"level": "sequence"}), ("vespo", {}),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()) or "plain")
def test_matches_trl_compute_loss(loss_type, kwargs):
    ours, theirs = _trl_loss(loss_type, **kwargs)
    assert ours == pytest.approx(theirs, abs=1e-6)


# ---- rewards --------------------------------------------------------------------------------
def test_rewards_from_import_path_and_file_with_weights(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def short(prompts, completions, **kw):\n    return [1.0 if len(c) < 3 else None for c in completions]\n")
    rewards = load_rewards(["exact_match", {"reward": f"{path}:short", "weight": 0.5}])
    assert [r.name for r in rewards] == ["exact_match", "short"]
    per = score(rewards, ["q", "q"], ["7", "it is 12"], {"answer": ["7", "11"]}, ["f, line 1", "f, line 1"])
    torch.testing.assert_close(per, torch.tensor([[1.0, 1.0], [0.0, math.nan]]), equal_nan=True)
    torch.testing.assert_close(combine(per, rewards), torch.tensor([1.5, 0.0]))
    assert exact_match([], ["-3", "3.0", "x"], answer=["-3", "3", "1"]) == [1.0, 1.0, 0.0]


def test_reward_errors_are_one_line():
    with pytest.raises(ModalforgeError, match=r"objective.rewards\[0\]='nowhere.mod:fn' does not import"):
        load_rewards(["nowhere.mod:fn"])
    with pytest.raises(ModalforgeError, match="does not import.*no file"):
        load_rewards(["/no/such/file.py:fn"])
    few = load_rewards([{"reward": "json:dumps", "name": "few"}])
    few[0].fn = lambda prompts, completions, **kw: [1.0]
    with pytest.raises(ModalforgeError, match="reward 'few' returned 1 value.*for 2 completions"):
        score(few, ["a", "b"], ["x", "y"], {}, ["f, line 1", "f, line 2"])
    few[0].fn = lambda prompts, completions, **kw: [1.0, "high"]
    with pytest.raises(ModalforgeError, match=r"returned 'high' \(str\) for the completion of f, line 2"):
        score(few, ["a", "b"], ["x", "y"], {}, ["f, line 1", "f, line 2"])
    few[0].fn = lambda prompts, completions, **kw: 1 / 0
    with pytest.raises(ModalforgeError, match="reward 'few' raised ZeroDivisionError"):
        score(few, ["a", "b"], ["x", "y"], {}, ["f, line 1", "f, line 2"])


# ---- bad input ------------------------------------------------------------------------------
def _setup(overrides, tmp_path=None):
    from modalforge.run import build_components

    cfg = compose(["plugin=grpo", "model=grpo/tiny_llama", "objective.rewards=[digits]", *overrides])
    dm, objective, adapter = build_components(cfg)
    dm.setup()
    objective.connect(dm)
    return dm, objective


def test_bad_prompt_sets_name_file_and_line(tmp_path):
    from modalforge.data.errors import DataError

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "hi"}) + "\n"
                    + json.dumps({"prompt": "one two three " * 40}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl, line 2: prompt of \d+ tokens is longer than "
                                        r"data.max_prompt_length=40"):
        _setup([f"data.train={long}", f"data.val={long}", "data.max_prompt_length=40", "data.batch_size=1"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="data.train: no prompts in"):
        _setup([f"data.train={empty}"])
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(DataError, match=r"blank.jsonl, line 1: empty 'prompt'"):
        _setup([f"data.train={blank}"])


def test_generation_settings_that_do_not_divide():
    with pytest.raises(ModalforgeError, match=r"steps_per_generation=3 does not divide a rollout of data.batch_size=2 "
                                              r"prompts x objective.num_generations=4 = 8"):
        _setup(["data.batch_size=2", "objective.num_generations=4", "objective.steps_per_generation=3"])
    with pytest.raises(ModalforgeError, match="generation_batch_size=6 is not a multiple of objective.num_generations=4"):
        _setup(["objective.num_generations=4", "objective.generation_batch_size=6"])


# ---- training -------------------------------------------------------------------------------
SMOKE = ["model=grpo/tiny_llama", "objective.rewards=[digits]", "data.batch_size=4", "objective.num_generations=4",
         "objective.max_completion_length=4"]


def test_conforms(tmp_path):
    # one rollout optimised for 8 steps: the clipped surrogate (0 at the start) falls; the reference stays frozen
    report = assert_plugin_conforms("grpo", tmp_path, [*SMOKE, "objective.num_iterations=8", "optim.lr=1e-2",
                                                       "optim.warmup_steps=0"], steps=8, loss_window=3)
    assert report.losses[0] == pytest.approx(0.0, abs=1e-5)


def test_reward_rises_on_a_tiny_run(tmp_path):
    cfg = compose(["plugin=grpo", *FAST, *SMOKE, "data.batch_size=8", "trainer.max_steps=24",
                   "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "optim.lr=1e-2",
                   "optim.warmup_steps=0", "callbacks=none", "checkpoint.export_on_end=false",
                   "trainer.enable_progress_bar=false"])
    run(cfg, tmp_path)
    reward = series(tmp_path, "train/reward")
    steps = sorted(reward)
    first, last = sum(reward[s] for s in steps[:4]) / 4, sum(reward[s] for s in steps[-4:]) / 4
    assert last > first + 0.15, reward


def test_resume_mid_rollout_is_exact(tmp_path):
    common = ["plugin=grpo", *FAST, *SMOKE, "objective.num_iterations=2", "objective.steps_per_generation=2",
              "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=3",
              "checkpoint.export_on_end=false", "trainer.enable_progress_bar=false", "callbacks=none"]
    _, straight, _ = run(compose([*common, "trainer.max_steps=6"]), tmp_path / "a")
    run(compose([*common, "trainer.max_steps=3"]), tmp_path / "b")   # stops at step 3 of 4 of the first rollout
    _, resumed, _ = run(compose([*common, "trainer.max_steps=6", "ckpt_path=last"]), tmp_path / "b")
    a, b = series(tmp_path / "a", "train/loss"), series(tmp_path / "b", "train/loss")
    assert [a[s] for s in sorted(a)] == pytest.approx([b[s] for s in sorted(b)], abs=1e-6)
    for (name, x), (_, y) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, msg=name)


def test_default_config_binds_and_names_the_warm_start():
    from modalforge.testing import check_config_binds

    cfg = compose(["plugin=grpo"])
    assert not check_config_binds(cfg)
    assert cfg.model._target_.endswith("build_arithmetic_policy") and cfg.model.vocab_size == cfg.data.vocab_size


# ---- Online DPO on the rollout machinery (TRL's OnlineDPOTrainer losses) -----------------------------
def test_online_dpo_and_ipo_match_the_formula_by_hand():
    # two prompts, a pair each; sequence log-probs are the masked sums of the token log-probs
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [-3.0, 0.0, 0.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.5, 0.0], [-1.0, -0.2, -0.3], [-2.0, 0.0, 0.0], [-1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    rewards = torch.tensor([0.2, 0.9, 1.0, 1.0])  # pair 1: the second wins; pair 2: a tie, left out
    beta = 0.1
    pc, pr, rc, rr = -1.5, -3.0, -1.5, -3.0  # pair 1: chosen = completion 2, rejected = completion 1
    h = (pc - pr) - (rc - rr)
    loss, stats = losses.online_dpo_loss("online_dpo", logps, ref, mask, rewards, beta)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-beta * h))), abs=1e-6)
    assert float(stats["online_dpo/decided"]) == 0.5
    ipo, _ = losses.online_dpo_loss("online_ipo", logps, ref, mask, rewards, beta)
    assert float(ipo) == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-5)


def test_online_dpo_needs_one_pair_per_prompt():
    from modalforge.plugins.text.grpo.objective import GRPOObjective

    with pytest.raises(ModalforgeError, match="num_generations=2"):
        GRPOObjective(loss="online_dpo", num_generations=4, beta=0.1)
    with pytest.raises(ModalforgeError, match="beta > 0"):
        GRPOObjective(loss="online_dpo", num_generations=2, beta=0.0, reference="none")


def test_online_dpo_trains_on_judged_policy_pairs(tmp_path):
    cfg = compose(["plugin=grpo", *FAST, *SMOKE, "objective.loss=online_dpo", "objective.num_generations=2",
                   "objective.beta=0.1", "data.batch_size=8", "trainer.max_steps=24", "trainer.val_check_interval=null",
                   "trainer.limit_val_batches=0", "optim.lr=1e-2", "optim.warmup_steps=0", "callbacks=none",
                   "checkpoint.export_on_end=false", "trainer.enable_progress_bar=false"])
    run(cfg, tmp_path)
    reward = series(tmp_path, "train/reward")
    steps = sorted(reward)
    first, last = sum(reward[s] for s in steps[:4]) / 4, sum(reward[s] for s in steps[-4:]) / 4
    assert all(math.isfinite(v) for v in series(tmp_path, "train/loss").values())
    assert series(tmp_path, "train/online_dpo/decided")
    assert last > first + 0.1, reward


def _global_stats_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rewards = torch.tensor([[0.0, 1.0, 1.0, 2.0, 2.0, 5.0], [1.0, 1.0, 1.0, 0.0, 3.0, 0.5]])[rank]
        advantages, std = losses.group_advantages(rewards, 3, "batch")
        share = losses.per_rank_share(torch.tensor([5.0, 9.0])[rank])
        torch.save({"advantages": advantages, "std": std, "share": share}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batch_std_and_dapo_num_items_are_global_across_ranks(tmp_path):
    """scale_rewards=batch and dapo's num_items over every rank's batch, as trl computes them (2 gloo processes)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_global_stats_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    both = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 5.0, 1.0, 1.0, 1.0, 0.0, 3.0, 0.5])
    expected, expected_std = losses.group_advantages(both, 3, "batch")  # one process, the whole batch
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(got["advantages"], expected[6 * rank: 6 * rank + 6], atol=1e-6)
        assert torch.allclose(got["std"], expected_std[:6], atol=1e-6)
        assert got["share"] == 7.0  # (5 + 9) tokens / 2 ranks: each rank's sum / 7 averages to the global mean
    assert losses.per_rank_share(torch.tensor(5.0)) == 5.0  # one process: unchanged
