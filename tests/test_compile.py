"""module.compile: regional torch.compile of each repeated block (or the whole model) trains as eager does.

Compiled in place, the parameter names (so checkpoints and exports) stay the eager ones. Losses are
compared over a few optimizer steps with the same data; image_classification's resnet (no declared
block: compiled whole) uses SGD, since Adam turns inductor's last-bit differences in near-zero
gradients into visible ones within steps, and no augmentation (each run would draw its own).
"""

from __future__ import annotations

import pytest
import torch

from modalforge.errors import ConfigError
from modalforge.testing import FAST_OVERRIDES, compose_plugin, run_steps

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CASES = {
    "causal_lm": ((), True),
    "clip": ((), True),
    # SD3 blocks (DiT draws its label dropout inside each block, from another RNG once compiled; the UNet has none)
    "diffusion": (("model=diffusion/sd3_tiny", "objective.conditioning.kind=text"), True),
    "image_classification": (("data.augment=none", "optim.name=sgd"), False),
}


def _compiled(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


@pytest.mark.parametrize("plugin", sorted(CASES))
def test_compiled_training_matches_eager_and_keeps_parameter_names(plugin, tmp_path):
    extra, has_blocks = CASES[plugin]
    runs = {}
    for mode in ("false", "true"):
        torch.manual_seed(0)
        cfg = compose_plugin(plugin, [*FAST_OVERRIDES, f"module.compile={mode}", *extra])
        _, module, report = run_steps(cfg, tmp_path / mode, 3)
        runs[mode] = (report.losses, module)
    (eager, eager_module), (compiled, compiled_module) = runs["false"], runs["true"]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)
    names = _compiled(compiled_module)
    assert names and not _compiled(eager_module)
    if has_blocks:  # each block, never the whole model: compile time is one block's graph
        blocks = tuple(compiled_module.objective.block_classes())
        assert compiled[-1] < compiled[0]  # (SGD on the resnet needs more than 3 steps to show it)
        assert len(names) > 1 and all(isinstance(compiled_module.get_submodule(n), blocks) for n in names)
    keys = list(compiled_module.state_dict())
    assert keys == list(eager_module.state_dict()) and not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize("value", ["fast", 2])
def test_an_unknown_compile_mode_is_a_config_error(value):
    from modalforge.compile import compile_mode

    with pytest.raises(ConfigError, match="module.compile"):
        compile_mode(value)
    assert compile_mode("model") == "model" and compile_mode(True) == "blocks" and compile_mode(False) is None
