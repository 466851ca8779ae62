"""Configuration: every shipped YAML parses and binds, Trainer flags come from Lightning, no shadowed options."""

from __future__ import annotations

import inspect
from collections import defaultdict
from importlib.resources import files
from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf

from modalforge import registry
from modalforge.config import compose, conf_root
from modalforge.testing import check_config_binds
from modalforge.trainer_schema import trainer_kwargs, trainer_schema


def _config_roots() -> dict[str, Path]:
    roots = {"modalforge.conf": conf_root()}
    for item in registry.discover().values():
        roots[item.plugin.conf_package] = Path(str(files(item.plugin.conf_package)))
    return roots


def test_every_shipped_yaml_parses():
    count = 0
    for root in _config_roots().values():
        for path in root.rglob("*.yaml"):
            OmegaConf.load(path)
            count += 1
    assert count > 15


def test_trainer_schema_is_lightnings_signature():
    params = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    fields = [f for f in trainer_schema().__dataclass_fields__]
    assert fields == params


def test_trainer_kwargs_keep_only_changed_values():
    assert trainer_kwargs({"max_steps": -1, "precision": None, "devices": 2}) == {"devices": 2}


def test_trainer_typo_is_rejected():
    with pytest.raises(Exception) as err:
        compose(["plugin=causal_lm", "trainer.max_step=3"])
    assert "max_step" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("adapter", ["full", "lora", "dora", "ia3", "qlora"])
@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp"])
def test_plugin_configs_bind_to_their_targets(adapter, strategy):
    for name in registry.available_names():
        cfg = compose([f"plugin={name}", f"adapter={adapter}", f"strategy={strategy}"])
        assert not check_config_binds(cfg), check_config_binds(cfg)


def test_experiments_compose():
    for path in (conf_root() / "experiment").glob("*.yaml"):
        cfg = compose(["plugin=causal_lm", f"experiment={path.stem}", "model.name_or_path=/some/dir"])
        assert not check_config_binds(cfg)


def test_binding_check_catches_a_wrong_key():
    cfg = compose(["plugin=causal_lm", "+data.block_sise=3"])
    problems = check_config_binds(cfg)
    assert any("block_sise" in p for p in problems)


def test_no_two_config_packages_offer_the_same_option():
    """Hydra silently lets one search-path entry shadow another; options must be namespaced per plugin."""
    owners = defaultdict(list)
    for package, root in _config_roots().items():
        for path in root.rglob("*.yaml"):
            owners[path.relative_to(root).as_posix()].append(package)
    shadowed = {option: pkgs for option, pkgs in owners.items() if len(pkgs) > 1}
    assert not shadowed, f"options offered by several config packages: {shadowed}"


def test_plugin_options_are_namespaced_by_plugin_name():
    for item in registry.discover().values():
        root = Path(str(files(item.plugin.conf_package)))
        for path in root.rglob("*.yaml"):
            rel = path.relative_to(root).parts
            if rel[0] == "plugin":
                assert rel[1] == f"{item.plugin.name}.yaml"
            else:
                assert len(rel) >= 3 and rel[1] == item.plugin.name, f"{item.plugin.conf_package}: {'/'.join(rel)}"


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "mlflow", "many", "none"])
def test_logger_options_bind(logger):
    cfg = compose(["plugin=causal_lm", f"logger={logger}"])
    assert not check_config_binds(cfg), check_config_binds(cfg)
