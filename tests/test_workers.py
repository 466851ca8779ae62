"""data.num_workers=auto: workers only where items are decoded per item and the cores allow it."""

from __future__ import annotations

import logging

import pytest

from modalforge.data import workers
from modalforge.data.datamodule import SourcedDataModule
from modalforge.errors import ConfigError


@pytest.mark.parametrize("cores, processes, decodes, expected", [
    (2, 1, True, 0),     # a 2-core machine: a worker would take the step's cores
    (16, 1, False, 0),   # tokens in memory: a worker's IPC costs more than the collate it moves
    (16, 1, True, 8),    # capped at 8
    (6, 1, True, 5),     # one core kept for the main process
    (16, 4, True, 3),    # DDP: 4 processes share 16 cores
    (8, 4, True, 0),     # 2 cores per process
])
def test_auto_follows_cores_processes_and_what_an_item_costs(monkeypatch, cores, processes, decodes, expected):
    monkeypatch.setattr(workers, "usable_cores", lambda: cores)
    n, why = workers.resolve_workers("auto", decodes_per_item=decodes, processes=processes)
    assert n == expected and why.startswith(f"data.num_workers=auto: {expected} (")


def test_a_number_is_kept_and_a_bad_one_is_a_config_error():
    assert workers.resolve_workers(3, decodes_per_item=False) == (3, "data.num_workers=3")
    with pytest.raises(ConfigError, match="data.num_workers must be a number >= 0 or auto"):
        workers.resolve_workers(-1, decodes_per_item=True)


def test_the_datamodule_resolves_once_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(workers, "usable_cores", lambda: 12)

    class Decoding(SourcedDataModule):
        decodes_per_item = True

    module = Decoding(train=[], num_workers="auto")
    with caplog.at_level(logging.INFO, logger="modalforge.data.datamodule"):
        assert module.num_workers == 8 and module.num_workers == 8
    assert [r.getMessage() for r in caplog.records] == [
        "data loader: data.num_workers=auto: 8 (files decoded per item; 12 cores)"]
