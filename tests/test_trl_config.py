"""Bring your TRL config: `train plugin=dpo trl_config=dpo.yaml` maps TRL's arguments onto modalforge's."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from modalforge.config import compose
from modalforge.testing import check_config_binds
from modalforge import registry
from modalforge.plugin import Plugin
from modalforge.registry import InstalledPlugin
from modalforge.cli.trl_config import (TrlConfigError, expand_argv, format_value, resolve, snapshot, trl_config_mapping,
                                   trl_config_overrides, trl_plugins)

from cli_helpers import FAST, run_cli, series

DPO_YAML = """\
# as for `trl dpo --config dpo.yaml` (TRL's DPOConfig + ModelConfig + ScriptArguments)
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
dataset_name: trl-lib/ultrafeedback_binarized
learning_rate: 5.0e-7
lr_scheduler_type: cosine
warmup_steps: 0.1
num_train_epochs: 1
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
bf16: true
gradient_checkpointing: true
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
loss_type: [sigmoid, bco_pair, sft]
loss_weights: [0.8, 0.2, 1.0]
f_divergence_type: reverse_kl
ld_alpha: 0.5
use_weighting: true
beta: 0.1
max_length: 1024
eval_strategy: steps
eval_steps: 50
logging_steps: 25
output_dir: Qwen2-0.5B-DPO
push_to_hub: false
hub_model_id: me/qwen-dpo
env:
  MODALFORGE_TEST_TRL_ENV: "1"
"""


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_dpo_config_maps_every_argument(tmp_path):
    mapping = trl_config_mapping(_write(tmp_path, DPO_YAML), "dpo")
    overrides = mapping.overrides
    assert not mapping.unmapped
    for expected in ["model=dpo/pretrained", "model.name_or_path='Qwen/Qwen2-0.5B-Instruct'",
                     "data.train='hf:trl-lib/ultrafeedback_binarized:train'",
                     "data.val='hf:trl-lib/ultrafeedback_binarized:test'",  # eval_strategy=steps: TRL evaluates
                     "optim.lr=5e-07", "optim.scheduler='cosine'", "optim.min_lr_ratio=0.0",
                     "optim.warmup_ratio=0.1", "trainer.max_epochs=1", "data.batch_size=2",
                     "trainer.accumulate_grad_batches=8", "trainer.precision='bf16-mixed'",
                     "module.gradient_checkpointing=true", "adapter=lora", "adapter.r=32", "adapter.alpha=16",
                     "adapter.target_modules=['q_proj','v_proj']",
                     "objective.loss=['sigmoid','bco_pair','sft']", "objective.loss_weights=[0.8,0.2,1.0]",
                     "objective.ld_alpha=0.5", "objective.use_weighting=true", "objective.beta=0.1",
                     "data.max_length=1024", "trainer.val_check_interval=50", "trainer.log_every_n_steps=25",
                     "run_dir='Qwen2-0.5B-DPO'",
                     # absent from the file, TRL's optimisation defaults still hold
                     "optim.betas=[0.9,0.999]", "optim.weight_decay=0.0", "trainer.gradient_clip_val=1.0"]:
        assert expected in overrides, (expected, overrides)
    status = {row.key: row.status for row in mapping.rows}
    assert status["hub_model_id"] == "ignored" and status["adam_beta1"] == "default"
    assert mapping.env == {"MODALFORGE_TEST_TRL_ENV": "1"}
    text = mapping.describe()
    assert "loss_type: [\"sigmoid\", \"bco_pair\", \"sft\"] -> objective.loss=['sigmoid','bco_pair','sft']" in text
    assert "lora_r: 32 -> (see use_peft)" in text
    # the overrides compose into a config that binds to the objective's and builders' signatures
    cfg = compose(["plugin=dpo", *overrides])
    assert cfg.objective.loss == ["sigmoid", "bco_pair", "sft"] and cfg.adapter.r == 32
    assert cfg.data.tokenizer == "Qwen/Qwen2-0.5B-Instruct"
    assert not check_config_binds(cfg)


def test_unmapped_arguments_are_named_together(tmp_path):
    path = _write(tmp_path, """\
        learning_rate: 1.0e-5
        neftune_noise_alpha: 5
        lr_scheduler_type: inverse_sqrt
        dataset_config: en
        padding_free: true
        """)
    overrides, unmapped = trl_config_overrides(path, "dpo")
    assert unmapped == ["neftune_noise_alpha", "lr_scheduler_type", "dataset_config"]
    assert "optim.lr=1e-05" in overrides
    with pytest.raises(TrlConfigError) as info:
        expand_argv(["plugin=dpo", f"trl_config={path}"])
    message = str(info.value)
    assert "\n" not in message
    assert "neftune_noise_alpha=5" in message and "lr_scheduler_type=\"inverse_sqrt\" (modalforge schedules are" in message
    assert "dataset_config" in message and "padding_free" not in message  # TRL 1.16 itself pads: ignored, listed


@pytest.mark.parametrize("text, message", [
    ("learning_rat: 1.0e-5\n", r"not DPOConfig / ModelConfig / ScriptArguments arguments in TRL 1.16: "
                               r"learning_rat \(did you mean learning_rate\?\)"),
    ("- a\n- b\n", r"must hold a mapping"),
    ("packing: true\n", r"packing"),  # an SFTConfig argument is unknown to DPOConfig
])
def test_unknown_arguments_are_errors(tmp_path, text, message):
    with pytest.raises(TrlConfigError, match=message):
        trl_config_mapping(_write(tmp_path, text), "dpo")


def test_sft_and_grpo_configs(tmp_path):
    sft = trl_config_mapping(_write(tmp_path, json.dumps({"max_length": 512, "packing": False,
                                                            "completion_only_loss": False,
                                                            "per_device_train_batch_size": 4}), "sft.json"), "sft")
    assert {"data.max_length=512", "data.too_long='truncate'", "data.packing=false", "data.train_on='all'",
            "data.batch_size=4", "optim.lr=2e-05"} <= set(sft.overrides)
    grpo = trl_config_mapping(_write(tmp_path, """\
        num_generations: 4
        beta: 0.04
        use_vllm: false
        temperature: 0.7
        learning_rate: 1.0e-6
        """), "grpo", objective_params=["num_generations", "beta"], has_pretrained_option=False)
    assert {"objective.num_generations=4", "objective.beta=0.04", "optim.lr=1e-06"} <= set(grpo.overrides)
    assert grpo.unmapped == ["temperature"]  # until the grpo objective takes it
    assert {r.key: r.status for r in grpo.rows}["use_vllm"] == "at_default"
    with pytest.raises(TrlConfigError, match="works with plugin=dpo, grpo or sft"):
        trl_config_mapping(_write(tmp_path, "beta: 0.1\n"), "clip")


def test_command_line_overrides_win(tmp_path, capsys):
    path = _write(tmp_path, "learning_rate: 1.0e-5\nbeta: 0.3\n")
    argv = expand_argv(["plugin=dpo", f"trl_config={path}", "optim.lr=0.1"])
    assert "objective.beta=0.3" in argv and "optim.lr=1e-05" not in argv and argv[-1] == "optim.lr=0.1"
    assert "(overridden on the command line: optim.lr=1e-05)" in capsys.readouterr().out


def test_backslashes_reach_the_config_unchanged(tmp_path):
    """A Windows output_dir and a regex lora_target_modules are Hydra-quoted, never doubled."""
    path = _write(tmp_path, r"""
        output_dir: 'C:\runs\dpo'
        use_peft: true
        lora_target_modules: '.*\.(q|v)_proj$'
        """)
    overrides = trl_config_mapping(path, "dpo").overrides
    cfg = compose(["plugin=dpo", *overrides])
    assert cfg.run_dir == r"C:\runs\dpo"
    assert cfg.adapter.target_modules == r".*\.(q|v)_proj$"
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in ["it's", "a\\", "\\'", "x y", "true", "1", "${x}", "a,b", "[q]"]:
        assert parser.parse_override(f"k={format_value(text)}").value() == text, text
        assert format_value(text).startswith("'")  # strings always quoted, as the printed mapping shows


@pytest.mark.parametrize("name, optim", [("paged_adamw_8bit", "paged_adamw_8bit"),
                                         ("paged_adamw_32bit", "paged_adamw_32bit"),
                                         ("adamw_bnb_8bit", "adamw_8bit"), ("adamw_torch_fused", "adamw")])
def test_optimizers_map_to_optim_name(tmp_path, name, optim):
    mapping = trl_config_mapping(_write(tmp_path, f"optim: {name}\n"), "sft")
    assert f"optim.name='{optim}'" in mapping.overrides and not mapping.unmapped
    assert compose(["plugin=sft", *mapping.overrides]).optim.name == optim


def test_builtin_plugins_declare_their_mapping_through_the_registry():
    plugins = trl_plugins()
    assert {name: hook.config_classes for name, hook in plugins.items()} == {
        "dpo": ("DPOConfig",), "grpo": ("GRPOConfig",), "sft": ("SFTConfig",)}
    for name, hook in plugins.items():
        assert resolve(hook.config_classes[0])[0] == name  # found by its TRL class too
        group, option = hook.pretrained_model.split("/")
        package = registry.get(name).plugin.conf_package
        assert (__import__("importlib").resources.files(package) / "model" / group / f"{option}.yaml").is_file()


def test_discovery_imports_no_trl_hook():
    import subprocess
    import sys

    code = ("import sys; import modalforge.registry as r; r.discover(); "
            "print(sorted(m for m in sys.modules if m.endswith('.trl') or m == 'modalforge.cli.trl_config'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


TOY_HOOK = """
from modalforge.cli.trl_config import TrlPlugin, must_be


class ToyObjective:
    def __init__(self, model, completion_only_loss: bool = False):
        pass


mapping = TrlPlugin(config_classes=("SFTConfig",), objective="toy_trl_hook.ToyObjective",
                    handlers={"packing": must_be(False, "toy never packs")})
"""


def test_a_third_party_plugin_gets_trl_config(tmp_path, monkeypatch):
    """Nothing in the core names the plugins that read TRL files: a new one is found by its hook."""
    (tmp_path / "toy_trl_hook.py").write_text(TOY_HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    toy = Plugin(name="toy", modality="text", description="toy", conf_package="toy.conf", datamodule="toy.D",
                 objective="toy.O", trl="toy_trl_hook:mapping")
    found = {**registry.discover(), "toy": InstalledPlugin(toy, "toy-dist", "1.0", "toy:plugin")}
    monkeypatch.setattr(registry, "discover", lambda: found)
    path = _write(tmp_path, "completion_only_loss: true\npacking: true\nmodel_name_or_path: me/model\n")
    mapping = trl_config_mapping(path, "toy")
    assert mapping.config_class == "SFTConfig"
    assert mapping.overrides[:2] == ["objective.completion_only_loss=true", "model.name_or_path='me/model'"]
    assert mapping.unmapped == ["packing"] and "toy never packs" in mapping.describe()
    with pytest.raises(TrlConfigError, match="SFTConfig is read by plugins sft, toy: choose one with plugin="):
        trl_config_mapping(path, "SFTConfig")
    with pytest.raises(TrlConfigError, match=r"plugin=dpo, grpo, sft or toy \(TRL's DPOConfig, GRPOConfig, "
                                             r"SFTConfig, SFTConfig\)"):
        expand_argv([f"trl_config={path}"])


def test_snapshot_matches_installed_trl():
    pytest.importorskip("trl")
    stored = json.loads((Path(__import__("modalforge.cli.trl_config").cli.trl_config.__file__).with_name("trl_fields.json")).read_text())
    live = snapshot()
    if live["trl_version"] != stored["trl_version"]:
        pytest.skip(f"trl {live['trl_version']} installed; the snapshot is of {stored['trl_version']}")
    assert {k: sorted(v) for k, v in live["configs"].items()} == {k: sorted(v) for k, v in stored["configs"].items()}


def _pairs_dataset(folder: Path) -> None:
    """A local dataset folder `datasets.load_dataset` reads offline: train.jsonl = the train split."""
    from modalforge.text.synthetic import write_alignment_sets

    source = folder.parent / "synthetic"
    source.mkdir()
    write_alignment_sets(source)
    folder.mkdir()
    lines = (source / "pairs_train.jsonl").read_text().splitlines()[:480]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_trl_dpo_config_runs_end_to_end(tmp_path):
    dataset, run_dir = tmp_path / "prefs", tmp_path / "run"
    _pairs_dataset(dataset)
    path = _write(tmp_path, f"""\
        dataset_name: {dataset}
        dataset_train_split: train
        loss_type: [sigmoid, bco_pair, sft]
        loss_weights: [0.8, 0.2, 1.0]
        ld_alpha: 0.5
        beta: 0.1
        learning_rate: 1.0e-2
        lr_scheduler_type: constant
        max_steps: 16
        per_device_train_batch_size: 16
        logging_steps: 1
        save_strategy: "no"
        max_length: 128
        seed: 0
        output_dir: {run_dir}
        """, "dpo.yaml")
    proc = run_cli("train", "plugin=dpo", f"trl_config={path}", *FAST, "trainer.limit_val_batches=0",
                   "checkpoint.export_on_end=false", "trainer.enable_progress_bar=false")
    assert f"trl_config={path} read as TRL DPOConfig" in proc.stdout
    assert "loss_type: [\"sigmoid\", \"bco_pair\", \"sft\"] -> objective.loss=['sigmoid','bco_pair','sft']" in proc.stdout
    loss = series(run_dir, "train/loss")
    assert len(loss) == 16, loss
    first, last = [loss[s] for s in sorted(loss)[:4]], [loss[s] for s in sorted(loss)[-4:]]
    assert sum(last) < sum(first), loss
    assert series(run_dir, "train/loss/bco_pair")  # each MPO term is logged


def test_train_cli_names_unmapped_arguments(tmp_path):
    path = _write(tmp_path, "neftune_noise_alpha: 5\n")
    proc = run_cli("train", "plugin=dpo", f"trl_config={path}", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: trl_config={path}: no modalforge counterpart "
                                                           "for neftune_noise_alpha=5")
