"""The optimizer step is the unit: batch size, accumulation and rank count never change the gradient."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run_cli, series
from modalforge.config import compose
from modalforge.run import run
from modalforge.scale.step_loss import StepLoss

# Completions of 1 to 60 words: micro-batches of very unequal learned-token counts.
LENGTHS = [1, 40, 3, 25, 2, 60, 5, 12]


def test_token_mean_over_the_step_equals_the_full_batch_by_hand():
    """Two micro-batches of 1 and 5 items give the gradient of the mean over all 6 items."""
    torch.manual_seed(0)
    weight = torch.randn(3, requires_grad=True)
    items = torch.randn(6, 3)

    def item_losses(x: torch.Tensor) -> torch.Tensor:
        return (x @ weight - 1.0) ** 2

    item_losses(items).mean().backward()
    expected = weight.grad.clone()
    weight.grad = None

    step = StepLoss()
    for chunk in (items[:1], items[1:]):
        loss = step.micro_batch(item_losses(chunk).mean(), len(chunk), rescale=True)
        (loss / 2).backward()  # Lightning divides each micro-batch's loss by accumulate_grad_batches
    logged = step.finish([weight], world_size=1, accumulate=2, all_reduce=None)
    assert torch.allclose(weight.grad, expected, atol=1e-6)
    assert torch.isclose(logged, item_losses(items).mean().detach())
    # Lightning's own averaging (mean of the two micro-batch means) is a different gradient here.
    naive = torch.autograd.grad((item_losses(items[:1]).mean() + item_losses(items[1:]).mean()) / 2, weight)[0]
    assert not torch.allclose(naive, expected, atol=1e-3)


def test_a_micro_batch_without_items_adds_nothing():
    weight = torch.ones(2, requires_grad=True)
    step = StepLoss()
    items = torch.ones(4, 2)
    empty = step.micro_batch((items[:0] @ weight).mean(), 0, rescale=True)  # a mean of nothing: NaN
    step.micro_batch((items @ weight).mean(), 4, rescale=True).backward()
    empty.backward()
    logged = step.finish([weight], world_size=1, accumulate=1, all_reduce=None)
    assert torch.isfinite(weight.grad).all() and torch.isclose(logged, torch.tensor(2.0))
    assert torch.allclose(weight.grad, torch.ones(2))


def _records(path: Path) -> Path:
    lines = [json.dumps({"prompt": f"q{i} say {n}", "completion": " ".join(f"w{j % 7}" for j in range(n))})
             for i, n in enumerate(LENGTHS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _one_sgd_step(data: Path, batch_size: int, accumulate: int) -> list[str]:
    # SGD with lr 1 and no momentum: the weight change is the gradient itself.
    return ["plugin=sft", f"data.train={data}", f"data.val={data}", "data.packing=false",
            f"data.batch_size={batch_size}", f"trainer.accumulate_grad_batches={accumulate}", "trainer.max_steps=1",
            "trainer.limit_val_batches=0", "trainer.val_check_interval=null", "optim.name=sgd", "optim.lr=1.0",
            "optim.momentum=0", "optim.weight_decay=0", "optim.scheduler=constant", "optim.warmup_steps=0",
            "trainer.accelerator=cpu", "trainer.devices=1", "module.num_samples=0", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


class _Initial(L.Callback):
    def on_train_start(self, trainer, pl_module):  # noqa: ANN001
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _update(data: Path, tmp: Path, batch_size: int, accumulate: int) -> tuple[dict, dict, float]:
    initial = _Initial()
    cfg = compose([*_one_sgd_step(data, batch_size, accumulate), "logger=none", "checkpoint.export_on_end=false",
                   "trainer.enable_checkpointing=false"])
    _, module, _ = run(cfg, tmp, callbacks=[initial])
    return initial.weights, {k: v.detach() for k, v in module.state_dict().items()}, float(module.step_loss.last)


def test_accumulation_leaves_the_sft_gradient_unchanged(tmp_path):
    data = _records(tmp_path / "chats.jsonl")
    start, whole, loss_whole = _update(data, tmp_path / "b8", 8, 1)
    start_split, split, loss_split = _update(data, tmp_path / "b2x4", 2, 4)
    assert all(torch.equal(start[k], start_split[k]) for k in start)
    update = sum(float((whole[k] - start[k]).norm() ** 2) for k in start) ** 0.5
    diff = sum(float((whole[k] - split[k]).norm() ** 2) for k in start) ** 0.5
    assert update > 1e-2, "the SGD step moved nothing: the comparison would be empty"
    assert diff / update < 1e-5, f"batch 2 x accumulation 4 changed {diff / update:.2e} of the update"
    assert abs(loss_whole - loss_split) < 1e-5


@pytest.mark.slow
def test_two_ranks_leave_the_sft_gradient_and_logged_loss_unchanged(tmp_path):
    data = _records(tmp_path / "chats.jsonl")
    run_cli("train", *_one_sgd_step(data, 8, 1), f"run_dir={tmp_path / 'one'}")
    run_cli("train", *_one_sgd_step(data, 4, 1), "strategy=ddp", "trainer.devices=2", f"run_dir={tmp_path / 'ddp'}")
    one, ddp = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("one", "ddp"))
    worst = max(float((one[k] - ddp[k]).abs().max()) for k in one)
    assert worst < 1e-6, f"2 ranks x batch 4 differ from 1 x batch 8 by {worst:.2e}"
    loss_one, loss_ddp = series(tmp_path / "one", "train/loss"), series(tmp_path / "ddp", "train/loss")
    assert loss_one and abs(loss_one[0] - loss_ddp[0]) < 1e-5, (loss_one, loss_ddp)


@pytest.mark.slow
def test_fsdp2_trains_samples_and_exports_on_two_cpu_processes(tmp_path):
    """strategy=fsdp is FSDP2: it trains on 2 gloo processes, samples at validation without a hang,
    and exports a gathered final/ that plain transformers loads."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "fsdp"
    run_cli("train", "plugin=sft", "strategy=fsdp", "strategy.timeout=300", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "module.num_samples=1", "trainer.log_every_n_steps=1", f"run_dir={run_dir}", timeout=400)
    assert len(series(run_dir, "train/loss")) >= 3
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "final"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (run_dir / "csv" / "samples.jsonl").exists()
