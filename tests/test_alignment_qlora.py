"""QLoRA (4-bit NF4 base + LoRA) on the three alignment plugins, on this CPU."""

from __future__ import annotations

import pytest

from modalforge.testing import assert_plugin_conforms


@pytest.mark.parametrize("plugin, extra, steps", [
    ("sft", [], 10),
    ("dpo", ["data.batch_size=32"], 16),            # reference = the same 4-bit weights with the adapter disabled
    ("reward_model", ["data.batch_size=32"], 30),
])
def test_qlora(tmp_path, plugin, extra, steps):
    report = assert_plugin_conforms(plugin, tmp_path, ["adapter=qlora", "optim.lr=1e-2", "optim.warmup_steps=0",
                                                       *extra], steps=steps, loss_window=max(3, steps // 4))
    assert report.changed and all("lora_" in n or "score" in n for n in report.changed)
