"""module.gradient_checkpointing=true on every model family: the same losses and gradients as without it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from modalforge.adapters import enable_gradient_checkpointing
from modalforge.errors import ConfigError
from modalforge.testing import FAST_OVERRIDES, build_configured, compose_plugin

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _engaged(model: nn.Module) -> list[str]:
    """Where checkpointing is switched on in ``model``, by each library's own flag."""
    found = []
    for name, m in model.named_modules():
        if getattr(type(m), "_modalforge_checkpointed", False):
            found.append(f"{name}: torch.utils.checkpoint")
        elif getattr(m, "grad_checkpointing", False) is True:  # open_clip transformers, timm models
            found.append(f"{name}: grad_checkpointing")
        elif getattr(m, "gradient_checkpointing", False) is True:  # diffusers / transformers blocks
            found.append(f"{name}: gradient_checkpointing")
    return found


def _train_two_steps(plugin: str, overrides: list[str], checkpointing: bool):
    cfg = compose_plugin(plugin, [*FAST_OVERRIDES, *overrides, f"module.gradient_checkpointing={checkpointing}"])
    datamodule, module = build_configured(cfg)
    module.train()
    torch.manual_seed(1)
    batches = list(itertools.islice(iter(datamodule.train_dataloader()), 2))
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in params], lr=0.05)
    losses, grads = [], []
    for step, batch in enumerate(batches):
        torch.manual_seed(100 + step)  # the same noise, timesteps and dropout in both runs
        loss = module.objective.training_step(batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in params if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return losses, grads, buffers, _engaged(module.objective.adapter_target())


CASES = [
    ("clip", ["data.batch_size=16"]),
    ("clip", ["data.batch_size=16", "adapter=lora"]),  # PEFT-wrapped open_clip model
    ("diffusion", ["data.batch_size=8"]),
    ("image_classification", ["data.batch_size=8"]),  # torchvision resnet18: per-block torch.utils.checkpoint
    ("image_classification", ["data.batch_size=8", "model=image_classification/vit_custom"]),
    # timm with BatchNorm (per block, so the running statistics move once) and without (timm's own switch)
    ("image_classification", ["data.batch_size=8", "model=image_classification/timm", "model.name=timm:resnet10t"]),
    ("image_classification", ["data.batch_size=8", "model=image_classification/timm",
                              "model.name=timm:vit_tiny_patch16_224", "+model.arch.img_size=32", "+model.arch.patch_size=8", "+model.arch.depth=2"]),
]


@pytest.mark.parametrize("plugin, overrides", CASES, ids=["clip", "clip-lora", "diffusion", "torchvision-resnet",
                                                          "torchvision-vit", "timm-resnet", "timm-vit"])
def test_same_losses_and_gradients_with_checkpointing(plugin, overrides):
    plain_losses, plain_grads, plain_buffers, plain_engaged = _train_two_steps(plugin, overrides, False)
    losses, grads, buffers, engaged = _train_two_steps(plugin, overrides, True)
    assert not plain_engaged and engaged, "checkpointing was not switched on"
    assert losses == pytest.approx(plain_losses, abs=1e-5)
    for step, (plain, got) in enumerate(zip(plain_grads, grads)):
        assert plain.keys() == got.keys() and plain, f"step {step}: different parameters got gradients"
        for name in plain:
            torch.testing.assert_close(got[name], plain[name], atol=1e-5, rtol=1e-4, msg=f"step {step}: {name}")
    for name in plain_buffers:  # BatchNorm statistics move once per step, not again in the recomputation
        torch.testing.assert_close(buffers[name], plain_buffers[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_model_without_blocks_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=r"module.gradient_checkpointing: Sequential has no switch .* no blocks"):
        enable_gradient_checkpointing(model)


def test_a_peft_wrapped_plain_module_is_unwrapped_first():
    from peft import LoraConfig, get_peft_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.proj(x)) + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.blocks(x))

    torch.manual_seed(0)
    net = Net()
    reference = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    reference.load_state_dict(get_peft_model(net, LoraConfig(r=2, target_modules=["proj"],
                                                             init_lora_weights=False)).state_dict())
    wrapped = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    wrapped.load_state_dict(reference.state_dict())
    assert "per block" in enable_gradient_checkpointing(wrapped)
    names = [n for n, _ in wrapped.named_parameters()]
    assert names == [n for n, _ in reference.named_parameters()]  # parameter names unchanged
    x = torch.randn(4, 8)
    for model in (reference, wrapped):
        model.train()
        model(x).sum().backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), wrapped.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, msg=name)
