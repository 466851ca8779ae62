"""dpo: every loss against its paper's formula by hand, reference modes, learning, sft -> dpo."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.plugins.text.dpo import losses
from modalforge.plugins.text.dpo.data import DPODataModule
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series

from dpo_cases import B, logsig, nc, nr, pc, pr, rc, rr, sig  # noqa: E402 - the shared hand-computed case


def by_hand(fn):
    return torch.tensor([fn(i) for i in range(2)])


def h(i):  # DPO's implicit reward margin, per example
    return (pc[i] - pr[i] - (rc[i] - rr[i])).item()


def test_dpo_sigmoid_and_cdpo():
    torch.testing.assert_close(losses.dpo_sigmoid(pc, pr, rc, rr, B), by_hand(lambda i: -logsig(B * h(i))))
    eps = 0.2
    torch.testing.assert_close(losses.dpo_sigmoid(pc, pr, rc, rr, B, eps),
                               by_hand(lambda i: -(1 - eps) * logsig(B * h(i)) - eps * logsig(-B * h(i))))


def test_robust_dpo():
    eps = 0.2
    torch.testing.assert_close(losses.dpo_robust(pc, pr, rc, rr, B, eps),
                               by_hand(lambda i: (-(1 - eps) * logsig(B * h(i)) + eps * logsig(-B * h(i))) / (1 - 2 * eps)))


def test_ipo():
    def f(i):
        margin = (pc[i] / nc[i] - pr[i] / nr[i] - (rc[i] / nc[i] - rr[i] / nr[i])).item()
        return (margin - 1 / (2 * B)) ** 2

    torch.testing.assert_close(losses.ipo(pc, pr, rc, rr, nc, nr, B), by_hand(f))


def test_hinge():
    torch.testing.assert_close(losses.hinge(pc, pr, rc, rr, B), by_hand(lambda i: max(0.0, 1 - B * h(i))))


def test_simpo():
    gamma_ratio = 0.5
    torch.testing.assert_close(losses.simpo(pc, pr, nc, nr, B, gamma_ratio), by_hand(
        lambda i: -logsig(B * (pc[i] / nc[i] - pr[i] / nr[i]).item() - gamma_ratio * B)))


def test_orpo():
    lam = 0.1

    def f(i):
        avg_c, avg_r = (pc[i] / nc[i]).item(), (pr[i] / nr[i]).item()
        odds_c, odds_r = math.exp(avg_c) / (1 - math.exp(avg_c)), math.exp(avg_r) / (1 - math.exp(avg_r))
        return -avg_c - lam * logsig(math.log(odds_c / odds_r))

    loss, _ = losses.orpo(pc, pr, nc, nr, lam)
    torch.testing.assert_close(loss, by_hand(f))


def test_kto():
    policy, ref = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-3.5, -4.0, -2.5])
    kl_p, kl_r = torch.tensor([-6.0, -7.0, -5.0]), torch.tensor([-6.5, -7.2, -5.9])
    desirable = torch.tensor([True, False, True])
    z0 = max(0.0, ((kl_p - kl_r).mean()).item())
    expected = []
    for i in range(3):
        ratio = (policy[i] - ref[i]).item()
        expected.append(2.0 * (1 - sig(B * (ratio - z0))) if desirable[i] else 0.5 * (1 - sig(B * (z0 - ratio))))
    loss, got_z0 = losses.kto(policy, ref, kl_p, kl_r, desirable, B, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert got_z0.item() == pytest.approx(z0)


def test_bad_record_names_file_and_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl, line 2: missing field 'rejected'"):
        DPODataModule(train=str(path), val=str(path), vocab_size=300).setup()


@pytest.mark.parametrize("overrides", [
    [],
    ["adapter=lora"],                                                      # reference = adapter disabled
    ["objective.reference=precomputed"],
    ["objective.loss=ipo"], ["objective.loss=hinge"], ["objective.loss=simpo"], ["objective.loss=orpo"],
    ["objective.loss=kto", "data.kind=kto"],
], ids=["dpo-copy", "dpo-lora-adapter-ref", "dpo-precomputed", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_conforms(tmp_path, overrides):
    report = assert_plugin_conforms("dpo", tmp_path, ["optim.warmup_steps=0", "optim.lr=1e-2", "data.batch_size=32",
                                                      *overrides], steps=16, loss_window=4)
    assert report.losses


def test_reference_modes_agree_before_training():
    """At step 0 the policy equals its reference: every reference mode gives DPO loss log 2."""
    from modalforge.run import build_components, build_module

    values = {}
    for mode, extra in (("copy", []), ("adapter", ["adapter=lora"]), ("precomputed", [])):
        cfg = compose(["plugin=dpo", f"objective.reference={mode}", *extra])
        dm, objective, adapter = build_components(cfg)
        module = build_module(cfg, objective, adapter)
        dm.setup()
        objective.connect(dm)
        module.configure_model()
        batch = next(iter(dm.train_dataloader()))
        with torch.no_grad():
            values[mode] = objective.training_step(batch).loss.item()
    assert values == pytest.approx({m: math.log(2) for m in values}, abs=1e-5)


def test_offline_default_learns_preferences(tmp_path):
    cfg = compose(["plugin=dpo", *FAST, "trainer.max_steps=150", "trainer.val_check_interval=50", "callbacks=none"])
    run(cfg, tmp_path)
    accuracy, margin = series(tmp_path, "val/preference_accuracy"), series(tmp_path, "val/margin")
    assert accuracy[max(accuracy)] > 0.6, accuracy
    assert margin[max(margin)] > margin[min(margin)] > 0, margin


def test_sft_output_starts_a_dpo_run(tmp_path):
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    run(compose(["plugin=sft", *FAST, "trainer.max_steps=5", "trainer.limit_val_batches=0", "callbacks=none"]),
        sft_dir)
    cfg = compose(["plugin=dpo", *FAST, "model=dpo/pretrained", f"model.name_or_path={sft_dir / 'final'}",
                   "trainer.max_steps=5", "trainer.limit_val_batches=0", "callbacks=none"])
    trainer, module, dm = run(cfg, dpo_dir)
    assert "<|im_start|>" in dm.processor.chat_template  # the sft run's saved template is reused
    assert (dpo_dir / "final" / "model.safetensors").exists()


def test_after_sft_experiment_points_at_the_sft_output():
    from modalforge.testing import check_config_binds

    cfg = compose(["plugin=dpo", "experiment=dpo/after_sft", "sft_dir=runs/sft"])
    assert cfg.model.name_or_path == "runs/sft/final" and cfg.data.tokenizer == "runs/sft/final"
    assert not check_config_binds(cfg)


def test_too_long_pairs_truncate_as_trl_or_drop(tmp_path):
    from modalforge.plugins.text.dpo.data import DPODataModule
    from modalforge.text.preference_data import truncate_pair

    prompt, pair = [1, 2, 3, 4], {"chosen": [5, 6, 7], "rejected": [8, 9]}
    start = truncate_pair(prompt, pair, 5, "keep_start")
    assert start == ([1, 2, 3, 4], {"chosen": [5], "rejected": [8]})
    end = truncate_pair(prompt, pair, 5, "keep_end")
    assert end == ([3, 4], {"chosen": [5, 6, 7], "rejected": [8, 9]})
    assert truncate_pair(prompt, pair, 9, "keep_start") == (prompt, pair)  # fits: untouched
    long = "".join(["very long question "] * 30)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": long, "chosen": "yes", "rejected": "no"}) + "\n" +
                    "".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(8)))
    with pytest.raises(DataError, match=r"pairs.jsonl, line 1: prompt \+ \w+ is \d+ tokens"):
        DPODataModule(train=str(path), val=str(path), max_length=32, batch_size=2).setup()
    dropping = DPODataModule(train=str(path), val=str(path), max_length=32, too_long="drop", batch_size=2)
    dropping.setup()
    assert len(dropping.train_set) == 8
    cutting = DPODataModule(train=str(path), val=str(path), max_length=32, too_long="truncate",
                            truncation_mode="keep_end", batch_size=2)
    cutting.setup()
    first = cutting.train_set.items[0]
    assert len(first["prompt"]) + max(len(first["chosen"]), len(first["rejected"])) <= 32
