"""A hub id with no network and no HF_HUB_OFFLINE fails in seconds, naming `hf download` and HF_HUB_OFFLINE.

The Hub is made unreachable everywhere (a closed local port as HF_ENDPOINT), so the test means the same on
a machine with network.
"""

from __future__ import annotations

import time

import pytest

from modalforge import models
from modalforge.config import compose
from modalforge.errors import ModelLoadError
from modalforge.run import run

from cli_helpers import FAST


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # nothing cached
    monkeypatch.setattr(models, "_reachable", {})


@pytest.mark.parametrize("plugin", ["sft", "causal_lm"])
def test_an_unreachable_hub_id_fails_in_seconds_with_the_hf_download_hint(tmp_path, no_hub, plugin):
    cfg = compose([f"plugin={plugin}", *FAST, f"model={plugin}/pretrained", "model.name_or_path=some-org/not-here",
                   "trainer.max_steps=1", "logger=none", f"run_dir={tmp_path / 'run'}"])
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        run(cfg, tmp_path / "run")
    took = time.monotonic() - start
    text = f"{info.value} {info.value.hint}"
    assert took < 10, f"took {took:.0f} s to fail"
    assert "hf download some-org/not-here" in text and "HF_HUB_OFFLINE=1" in text and "model.name_or_path" in text
    assert "huggingface-cli" not in text


def test_local_folders_cached_ids_and_declared_offline_are_not_probed(tmp_path, no_hub, monkeypatch):
    from huggingface_hub import constants

    probes = []
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: probes.append(1) or False)
    models.check_hub(str(tmp_path))  # a local folder
    models.check_hub("/no/such/folder")  # not a hub id: from_pretrained names the path
    (tmp_path / "hf_cache" / "models--org--cached").mkdir(parents=True)
    models.check_hub("org/cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.check_hub("org/elsewhere")
    assert probes == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        models.check_hub("org/elsewhere")
    assert probes == [1] and constants.ENDPOINT.endswith(":9")


def test_the_load_error_hint_names_hf_download():
    err = models.offline_hint("org/model", OSError("no"))
    assert "hf download org/model" in str(err) and "huggingface-cli" not in str(err)
