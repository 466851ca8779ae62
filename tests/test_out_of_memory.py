"""Out of memory in a step: one line (step, batch shape, the switches that fit), after the state is saved."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from modalforge.callbacks.out_of_memory import (OutOfMemory, describe_batch, explain_out_of_memory,
                                                out_of_memory_cause, switches)
from modalforge.config import compose
from modalforge.errors import USER_ERROR_EXIT, user_error
from modalforge.plugins.text.causal_lm.objective import CausalLMObjective
from modalforge.run import run

from cli_helpers import FAST

QUICK = [*FAST, "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
         "checkpoint.export_on_end=false", "callbacks=none", "optim.warmup_steps=0", "data.batch_size=8",
         "data.block_size=64"]

# Step 3's forward asks for far more than a memory limit on the process (RLIMIT_AS) leaves:
# the CPU allocator's own error, as a too-large batch or model gives it.
LIMITED = textwrap.dedent("""
    import resource, sys
    import torch
    from modalforge.plugins.text.causal_lm.objective import CausalLMObjective

    original, calls = CausalLMObjective.training_step, [0]

    def heavy(self, batch):
        calls[0] += 1
        if calls[0] == 3:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            with open("/proc/self/statm") as handle:
                used = int(handle.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), hard))
            try:
                torch.empty(batch["input_ids"].numel() << 24, dtype=torch.float32)  # 2 GiB per token
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return original(self, batch)

    CausalLMObjective.training_step = heavy
    from modalforge.cli import train
    sys.argv = ["train", *sys.argv[1:]]
    train()
""")


def test_a_real_cpu_out_of_memory_saves_the_state_and_ends_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LIMITED, "plugin=causal_lm", *QUICK, "trainer.max_steps=6",
                           "checkpoint.every_n_train_steps=100", f"run_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                           "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-3000:]
    error, hint = proc.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: step 3 (batch 2 of epoch 0): the host (CPU) ran out of memory, allocating "), error
    assert "on a batch of 8 items × 64 tokens = 512 tokens (input_ids 8×64)" in error
    assert f"the state at step 2 is saved in {tmp_path / 'checkpoints' / 'last-interrupted.ckpt'}" in error
    assert hint == ("hint: use less memory per step: data.batch_size=4 trainer.accumulate_grad_batches=2 (the same "
                    "step in two halves; data.batch_size=auto: the largest batch that fits), or "
                    "module.gradient_checkpointing=true, or adapter=lora")
    assert "Traceback" not in proc.stderr
    saved = torch.load(tmp_path / "checkpoints" / "last-interrupted.ckpt", weights_only=False)
    assert saved["global_step"] == 2


def test_a_cuda_out_of_memory_is_named_with_its_allocation(tmp_path, monkeypatch):
    original, calls = CausalLMObjective.training_step, {"n": 0}

    def oom(self, batch):  # noqa: ANN001, ANN202 - the message torch's CUDA caching allocator gives
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.10 GiB of which 1.06 GiB is free.")
        return original(self, batch)

    monkeypatch.setattr(CausalLMObjective, "training_step", oom)
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=4", "adapter=lora",
                   "module.gradient_checkpointing=true", "data.batch_size=1"])
    with pytest.raises(OutOfMemory) as caught:
        run(cfg, tmp_path)
    err = caught.value
    assert user_error(err) is err  # one line and exit 2 through the CLI
    assert err.where == "step 2 (batch 1 of epoch 0)"
    assert err.what.startswith("the GPU ran out of memory, allocating 2.00 GiB on a batch of 1 items × 64 tokens")
    assert err.hint == "use less memory per step: adapter=qlora, or optim.name=adamw_8bit"


def test_batch_shapes_causes_and_switches():
    assert describe_batch({"images": torch.zeros(4, 3, 8, 8), "labels": torch.zeros(4, dtype=torch.long)}) == \
        "4 items (images 4×3×8×8)"
    assert describe_batch({"chosen": {"input_ids": torch.zeros(2, 9, dtype=torch.long)}}) == \
        "2 items × 9 tokens = 18 tokens (chosen.input_ids 2×9)"
    assert describe_batch(["text"]) is None
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 4398046511104 bytes.")
    wrapped = ValueError("in a worker")
    wrapped.__cause__ = cpu
    assert out_of_memory_cause(wrapped) is cpu and out_of_memory_cause(MemoryError()) is not None
    assert out_of_memory_cause(RuntimeError("shapes do not match")) is None
    assert explain_out_of_memory(RuntimeError("shapes do not match"), None, {}) is None
    early = explain_out_of_memory(cpu, None, {"data": {"batch_size": 1}})
    assert early.where == "before the first batch" and "allocating 4.00 TiB" in early.what
    ddp = type("T", (), {"num_devices": 8, "num_nodes": 1, "accumulate_grad_batches": 4})()
    cfg = {"data": {"batch_size": 16}, "module": {"gradient_checkpointing": True}, "strategy": {"name": "ddp"},
           "adapter": {"_target_": "modalforge.adapters.FullAdapter"}, "optim": {"name": "adamw"}}
    assert switches(cfg, ddp) == ["data.batch_size=8 trainer.accumulate_grad_batches=8 (the same step in two halves; "
                                  "data.batch_size=auto: the largest batch that fits)",
                                  "strategy=fsdp (shards weights, gradients and optimizer state over the devices)",
                                  "adapter=lora"]
    found = type("T", (), {"num_devices": 1, "num_nodes": 1, "accumulate_grad_batches": 1,
                           "datamodule": type("D", (), {"batch_size": 16})()})()
    assert switches({"data": {"batch_size": "auto"}}, found) == [
        "data.batch_size=8 trainer.accumulate_grad_batches=2 (the same step in two halves)"]
