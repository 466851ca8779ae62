"""BatchNorm under several processes: per-rank statistics are said, and SyncBatchNorm on CPU is a config error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalforge.errors import ConfigError
from modalforge.scale.batchnorm import check_sync_batchnorm, count_batchnorm, per_rank_note

from cli_helpers import FAST, run_cli


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2),
                         nn.BatchNorm1d(2))


def test_batchnorm_layers_are_counted_sync_ones_too():
    net = _net()
    assert count_batchnorm(net) == 2
    assert count_batchnorm(nn.SyncBatchNorm.convert_sync_batchnorm(net)) == 2
    assert count_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.GroupNorm(1, 2))) == 0


def test_the_note_names_the_layers_and_the_choices_only_where_statistics_are_per_rank():
    note = per_rank_note(_net(), world_size=2)
    assert note is not None and "2 BatchNorm layer(s)" in note and "2 ranks" in note
    assert "trainer.sync_batchnorm=true" in note and "GroupNorm" in note
    assert per_rank_note(_net(), world_size=1) is None
    assert per_rank_note(nn.SyncBatchNorm.convert_sync_batchnorm(_net()), world_size=2) is None
    assert per_rank_note(nn.Linear(2, 2), world_size=2) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
def test_sync_batchnorm_without_gpus_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="SyncBatchNorm runs only on GPUs") as err:
        check_sync_batchnorm({"sync_batchnorm": True}, "cpu")
    assert err.value.where == "trainer.sync_batchnorm=true" and "per rank" in err.value.hint
    check_sync_batchnorm({"sync_batchnorm": False}, "cpu")
    check_sync_batchnorm({}, "auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
def test_the_cli_refuses_sync_batchnorm_on_cpu_before_building_anything(tmp_path):
    proc = run_cli("train", "plugin=image_classification", *FAST, "trainer.sync_batchnorm=true",
                   f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.sync_batchnorm=true: torch's SyncBatchNorm runs only on GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
