"""Shared fixtures: an isolated cache, offline hubs, and tiny overrides for every run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Never reach a model hub from tests; a hub name must fail fast with our message.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def modalforge_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session: synthetic corpora and tokenizers are built once, never in ~/.cache."""
    path = tmp_path_factory.mktemp("modalforge-cache")
    os.environ["MODALFORGE_CACHE"] = str(path)
    return path


@pytest.fixture
def bin_dir() -> Path:
    """Folder holding this environment's console scripts (`train`, `modalforge`)."""
    return Path(sys.executable).parent


TINY = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_model_summary=false",
    "module.num_samples=0",
]
