"""Randomness that resumes exactly (augmentation on) and differs per rank; logged steps after a resume."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from cli_helpers import metric_rows
from modalforge.callbacks.rng_state import RNGState, seed_rank
from modalforge.config import compose
from modalforge.run import run

FAST = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "module.num_samples=0",
        "trainer.limit_val_batches=0", "checkpoint.export_on_end=false", "optim.warmup_steps=0",
        "optim.scheduler=constant"]


class StopAt(L.Callback):
    """Fails in the middle of a training step (after the forward), as Ctrl-C or a crash would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("stopped mid-step by the test")


def _train(overrides: list[str], run_dir: Path) -> None:
    os.environ["MODALFORGE_QUIET"] = "1"
    run(compose(overrides), run_dir)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _train_steps(run_dir: Path) -> list[int]:
    return [int(r["step"]) for r in metric_rows(run_dir) if r.get("train/loss")]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_augmentation_is_exact(tmp_path, workers):
    """image_classification's default augments (random resized crop + flip). Without workers from the
    checkpointed torch generator; in workers the resumed epoch skips the consumed indices unread, and each
    item's draws still repeat (a seed per item, not a stream per worker)."""
    common = ["plugin=image_classification", *FAST, "data.batch_size=8", "checkpoint.every_n_train_steps=2",
              f"data.num_workers={workers}"]
    assert compose(common).data.augment == "standard"
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train([*common, "trainer.max_steps=4", f"run_dir={straight}"], straight)
    _train([*common, "trainer.max_steps=2", f"run_dir={split}"], split)
    _train([*common, "trainer.max_steps=4", f"run_dir={split}", "ckpt_path=last"], split)
    a, b = _weights(straight), _weights(split)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-6, atol=1e-6), key
    rows_a = {int(r["step"]): float(r["train/loss"]) for r in metric_rows(straight) if r.get("train/loss")}
    rows_b = {int(r["step"]): float(r["train/loss"]) for r in metric_rows(split) if r.get("train/loss")}
    assert rows_a == pytest.approx(rows_b, rel=1e-6) and sorted(rows_b) == list(range(4))
    assert _train_steps(split) == list(range(4))  # no step logged twice or skipped across the resume


class _Draws(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[int, float, float, float]:
        import random

        import numpy as np

        return index, float(torch.rand(())), float(np.random.rand()), random.random()


def _draws_by_index(order: list[int], workers: int, seed: int) -> dict[int, tuple[float, float, float]]:
    from modalforge.data.item_seed import SeededItems

    loader = torch.utils.data.DataLoader(SeededItems(_Draws()), batch_size=None, sampler=order,
                                         num_workers=workers, generator=torch.Generator().manual_seed(seed))
    return {int(i): (a, b, c) for i, a, b, c in loader}


def test_an_item_read_in_a_worker_draws_the_same_whichever_worker_reads_it_and_whatever_came_before():
    whole = _draws_by_index(list(range(12)), workers=2, seed=5)
    later = _draws_by_index([9, 4, 7, 11], workers=3, seed=5)  # a resumed epoch: fewer items, other workers
    assert later == {i: whole[i] for i in later}
    assert len({v[0] for v in whole.values()}) == 12  # items differ from each other
    other_epoch = _draws_by_index(list(range(12)), workers=2, seed=6)
    assert all(other_epoch[i] != whole[i] for i in whole)  # and from one epoch to the next


def test_steps_logged_after_a_mid_step_checkpoint_continue_the_sequence(tmp_path):
    run_dir = tmp_path / "run"
    common = ["plugin=causal_lm", *FAST, "checkpoint.every_n_train_steps=100000", f"run_dir={run_dir}"]
    with pytest.raises(RuntimeError, match="stopped mid-step"):
        _train([*common, "trainer.max_steps=20", "+callbacks.stop._target_=test_rng_resume.StopAt",
                "+callbacks.stop.step=4"], run_dir)
    assert (run_dir / "checkpoints" / "last-interrupted.ckpt").exists()
    _train([*common, "trainer.max_steps=8", "ckpt_path=last"], run_dir)
    assert _train_steps(run_dir) == list(range(8))


def _fake_trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0, train_dataloader=None)


def _augmented(seed: int, rank: int) -> torch.Tensor:
    from PIL import Image

    from modalforge.plugins.vision.image_classification.transforms import build_transform

    seed_rank(seed, rank)
    image = Image.fromarray((torch.arange(64 * 64 * 3) % 251).reshape(64, 64, 3).to(torch.uint8).numpy())
    transform = build_transform(32, train=True)
    return torch.stack([transform(image) for _ in range(4)])


def test_each_rank_draws_its_own_augmentation_while_models_are_built_alike():
    assert torch.equal(_augmented(7, 0), _augmented(7, 0))
    assert not torch.equal(_augmented(7, 0), _augmented(7, 1))
    draws = []
    for rank in (0, 1):
        L.seed_everything(7, verbose=False)  # what run() does before building the model: the same on every rank
        weights = torch.nn.Linear(4, 4).weight.detach().clone()
        RNGState(seed=7).on_train_start(_fake_trainer(rank, 2), None)  # training starts: seed + rank
        draws.append((weights, torch.rand(8)))
    assert torch.equal(draws[0][0], draws[1][0])
    assert not torch.equal(draws[0][1], draws[1][1])


def test_each_rank_gets_its_own_state_back_and_a_new_rank_is_seeded_with_a_warning():
    states = []
    for rank in (0, 1):
        callback = RNGState(seed=3)
        callback.on_train_start(_fake_trainer(rank, 2), None)
        torch.rand(5)
        callback.on_train_batch_end(None, None, None, None, 0)
        states.append(callback.state_dict()["ranks"][0])
    expected = [torch.rand(3) for _ in range(1)]  # after rank 1's state: what rank 1 draws next
    saved = {"seed": 3, "world_size": 2, "ranks": states}
    callback = RNGState(seed=3)
    callback.load_state_dict(saved)
    callback.on_train_start(_fake_trainer(1, 2), None)
    assert torch.equal(torch.rand(3), expected[0])
    callback = RNGState(seed=3)
    callback.load_state_dict(saved)
    with pytest.warns(UserWarning, match="random states of 2 process"):
        callback.on_train_start(_fake_trainer(0, 3), None)
    callback = RNGState(seed=3)
    callback.load_state_dict(saved)
    callback.on_train_start(_fake_trainer(2, 3), None)
    seed_rank(3, 2)
    fresh = torch.rand(3)
    callback.load_state_dict(saved)
    callback.on_train_start(_fake_trainer(2, 3), None)
    assert torch.equal(torch.rand(3), fresh)
