"""LightningCLI-style arguments of `train` (core/cli/lightning_args.py): each form, its Hydra spelling, its errors."""

from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from cli_helpers import run_cli
from modalforge.cli.lightning_args import hydra_value, translate_argv
from modalforge.errors import ConfigError


def error_of(argv: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        translate_argv(argv)
    return info.value


def test_hydra_arguments_pass_through_unchanged():
    argv = ["-m", "plugin=causal_lm", "+callbacks.x._target_=a.B", "~logger", "optim.lr=1e-3,3e-4",
            "--cfg", "job", "--package", "trainer", "-c", "all", "--info", "defaults", "--resolve"]
    assert translate_argv(argv) == argv


def test_trainer_flags_with_equals_or_a_separate_value():
    assert translate_argv(["plugin=sft", "--trainer.max_steps=100", "--trainer.precision", "bf16-mixed",
                           "--trainer.max_epochs", "-1", "--trainer.val_check_interval", "0.5"]) == \
        ["plugin=sft", "trainer.max_steps=100", "trainer.precision=bf16-mixed", "trainer.max_epochs=-1",
         "trainer.val_check_interval=0.5"]


def test_other_keys_seed_fit_and_print_config():
    assert translate_argv(["fit", "--plugin=causal_lm", "--optim.lr", "1e-3", "--run_dir=runs/a",
                           "--seed_everything=7", "--print_config"]) == \
        ["plugin=causal_lm", "optim.lr=1e-3", "run_dir=runs/a", "seed=7", "--cfg", "job"]


def test_a_flag_without_value_says_the_hydra_spelling():
    err = error_of(["plugin=sft", "--trainer.fast_dev_run", "plugin=sft"])
    assert err.where == "--trainer.fast_dev_run" and err.hint.startswith("trainer.fast_dev_run=")
    assert error_of(["--trainer.fast_dev_run"]).what == "needs a value"


def test_callbacks_append_with_arguments():
    out = translate_argv(["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/loss",
                          "--trainer.callbacks.init_args.patience", "3",
                          "--trainer.callbacks+=my.pkg.Hook", "--trainer.callbacks+=EarlyStopping",
                          '--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.ModelSummary", '
                          '"init_args": {"max_depth": 2}}'])
    assert out == ["+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
                   "+callbacks.early_stopping.monitor=val/loss",
                   "+callbacks.early_stopping.patience=3",
                   "+callbacks.hook._target_=my.pkg.Hook",
                   "+callbacks.early_stopping_2._target_=lightning.pytorch.callbacks.EarlyStopping",
                   "+callbacks.model_summary._target_=lightning.pytorch.callbacks.ModelSummary",
                   "+callbacks.model_summary.max_depth=2"]


@pytest.mark.parametrize("argv, where, hint", [
    (["--trainer.callbacks=EarlyStopping"], "--trainer.callbacks=EarlyStopping", "+callbacks.<name>._target_="),
    (["--trainer.callbacks.patience=3"], "--trainer.callbacks.patience=3", "+callbacks.<name>.patience=3"),
    (["--trainer.callbacks+=NoSuchCallback"], "--trainer.callbacks+=NoSuchCallback", "+callbacks.<name>._target_="),
    (["--trainer.plugins+=x"], "--trainer.plugins+=x", "trainer.plugins=[a,b,c]"),
    (["--trainer.logger=TensorBoardLogger"], "--trainer.logger=TensorBoardLogger", "logger=csv|tensorboard"),
    (["--model.class_path=my.Module"], "--model.class_path=my.Module", "plugin=<name>"),
    (["--data=my.DataModule"], "--data=my.DataModule", "plugin=<name>"),
    (["--optimizer=Adafactor"], "--optimizer=Adafactor", "optim.name=adamw|sgd|adamw_8bit"),
    (["--lr_scheduler.class_path=CosineAnnealingLR"], "--lr_scheduler.class_path=CosineAnnealingLR",
     "optim.scheduler=cosine"),
    (["-c", "exp.yaml"], "-c exp.yaml", "--config exp.yaml"),
    (["test", "plugin=sft"], "test", "drop it"),
    (["--trainer..x=1"], "--trainer..x=1", "key=value"),
])
def test_forms_that_cannot_be_mapped_name_the_argument_and_the_hydra_spelling(argv, where, hint):
    err = error_of(argv)
    assert err.where == where and hint in err.hint


def test_logger_switch_and_optimizer_sections_map():
    assert translate_argv(["--trainer.logger=False", "--optimizer=torch.optim.SGD", "--optimizer.momentum=0.8",
                           "--optimizer.init_args.lr=0.1"]) == \
        ["trainer.logger=false", "optim.name=sgd", "optim.momentum=0.8", "optim.lr=0.1"]


def test_model_section_goes_to_model_or_objective_where_unambiguous():
    out = translate_argv(["plugin=causal_lm", "--model.sample_max_new_tokens=5",
                          "--model.init_args.config.hidden_size", "32", "--data.block_size=32"])
    assert out == ["plugin=causal_lm", "++objective.sample_max_new_tokens=5", "++model.config.hidden_size=32",
                   "++data.block_size=32"]
    err = error_of(["plugin=causal_lm", "--model.learning_rate=0.1"])
    assert err.hint == "optim.lr=0.1"
    err = error_of(["plugin=causal_lm", "--model.nope=1"])
    assert "neither model nor objective" in err.what and "sample_max_new_tokens" in err.hint
    assert "plugin=<name>" in error_of(["--model.x=1"]).hint


def test_config_file_in_lightning_cli_layout_is_flattened(tmp_path):
    file = tmp_path / "exp.yaml"
    file.write_text(
        "seed_everything: 3\n"
        "plugin: causal_lm\n"
        "trainer:\n  max_steps: 100\n  precision: bf16-mixed\n  logger: false\n"
        "  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
        "      init_args: {monitor: val/loss, patience: 3}\n"
        "model:\n  sample_max_new_tokens: 8\n  config: {hidden_size: 32, model_type: llama}\n"
        "data:\n  train: ['a b.jsonl', c.jsonl]\n  val: null\n"
        "optimizer:\n  class_path: torch.optim.AdamW\n  init_args: {lr: 0.001, betas: [0.9, 0.99]}\n")
    out = translate_argv(["--config", str(file), "--trainer.max_steps=5"])
    assert out == ["seed=3", "plugin=causal_lm", "trainer.max_steps=100", "trainer.precision=bf16-mixed",
                   "trainer.logger=false",
                   "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
                   "+callbacks.early_stopping.monitor=val/loss", "+callbacks.early_stopping.patience=3",
                   "++objective.sample_max_new_tokens=8", "++model.config.hidden_size=32",
                   "++model.config.model_type=llama", "++data.train=['a b.jsonl',c.jsonl]", "++data.val=null",
                   "optim.name=adamw", "optim.lr=0.001", "optim.betas=[0.9,0.99]",
                   "trainer.max_steps=5"]  # a later argument wins, as in LightningCLI (and Hydra)


def test_config_file_errors_name_the_file(tmp_path):
    assert error_of(["--config", str(tmp_path / "missing.yaml")]).what == "no such file"
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    assert error_of([f"--config={bad}"]).where.startswith(f"{bad}, line")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert "mapping" in error_of(["--config", str(listed)]).what
    scheduler = tmp_path / "sched.yaml"
    scheduler.write_text("lr_scheduler: {class_path: StepLR}\n")
    assert error_of(["--config", str(scheduler)]).where == f"{scheduler}: lr_scheduler.class_path"
    assert error_of(["--config"]).hint == "--config file.yaml"


@pytest.mark.parametrize("value", [None, True, 3, -1.5e-05, "abc", "a b", "it's", "1e-3", "true", "x=y",
                                   "${seed}", "C:\\dir\\", [1, "two", [3]], {"path": "a.jsonl", "weight": 3}])
def test_yaml_values_round_trip_through_hydras_override_grammar(value):
    parsed = OverridesParser.create().parse_override(f"key={hydra_value(value)}")
    assert parsed.value() == (list(value) if isinstance(value, tuple) else value)


def test_train_accepts_the_lightning_cli_forms_end_to_end(tmp_path):
    proc = run_cli("train", "plugin=causal_lm", "--trainer.max_steps", "2", "--trainer.accelerator=cpu",
                   f"--run_dir={tmp_path}", "--print_config")
    assert "max_steps: 2" in proc.stdout and "accelerator: cpu" in proc.stdout
    assert f"run_dir: {tmp_path}" in proc.stdout


def test_train_reports_an_ambiguous_form_in_one_line(capsys):
    from modalforge import cli

    with pytest.raises(SystemExit) as info:
        cli.train(["plugin=causal_lm", "--trainer.callbacks=EarlyStopping"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: --trainer.callbacks=EarlyStopping:") and lines[1].startswith("hint: +callbacks.")
