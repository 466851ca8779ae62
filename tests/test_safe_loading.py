"""Files from elsewhere cannot run code: checkpoints load with weights_only=True, trust_remote_code stays off."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from cli_helpers import FAST, run_cli
from modalforge.checkpoints import read_checkpoint
from modalforge.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


class _CreatesAFile:
    """Unpickling this runs ``open(path, "w")``: what a crafted checkpoint could do with any call."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def _malicious(tmp_path: Path, legacy: bool = False) -> tuple[Path, Path]:
    marker, ckpt = tmp_path / "pwned", tmp_path / ("legacy.ckpt" if legacy else "evil.ckpt")
    payload = {"state_dict": {"w": torch.zeros(2)}, "global_step": 1, "x": _CreatesAFile(marker)}
    torch.save(payload, ckpt, _use_new_zipfile_serialization=not legacy)  # legacy: torch < 1.6's format, no mmap
    return ckpt, marker


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_naming_file_and_switch(tmp_path: Path, legacy: bool):
    ckpt, marker = _malicious(tmp_path, legacy)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(ckpt))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"ckpt_path={ckpt}: holds objects that could run code")
    assert "checkpoint.trust=true" in text
    assert legacy or "io.open" in text  # the object torch refused, by name
    assert not marker.exists(), "loading the checkpoint ran code from it"
    read_checkpoint(str(ckpt), trust=True)  # the switch: the user vouches for the file (and it runs)
    assert marker.exists()


def test_a_run_checkpoint_reads_without_unpickling_code(tmp_path: Path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "loops": {"a": [1, 2.0, "x", None]}, "modalforge_config": {}},
               path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no weights_only FutureWarning/UserWarning either
        assert torch.equal(read_checkpoint(str(path))["state_dict"]["w"], torch.ones(3))


@pytest.mark.slow
def test_train_refuses_a_malicious_checkpoint_in_one_line(tmp_path: Path):
    ckpt, marker = _malicious(tmp_path)
    proc = run_cli("train", "plugin=causal_lm", *FAST, "trainer.max_steps=1", f"run_dir={tmp_path / 'run'}",
                   f"ckpt_path={ckpt}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(ckpt) in errors[0] and "checkpoint.trust=true" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_a_normal_run_resumes_and_every_load_is_weights_only(tmp_path: Path, monkeypatch):
    """The run's own checkpoints load on resume through ours and Lightning's ``torch.load``, all weights_only."""
    from modalforge.config import compose
    from modalforge.run import run

    run_dir = tmp_path / "run"
    args = ["plugin=causal_lm", *FAST, "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
            "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=2", "checkpoint.export_on_end=false",
            f"run_dir={run_dir}"]
    run(compose([*args, "trainer.max_steps=2"]), run_dir)
    calls, real_load = [], torch.load

    def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(kw.get("weights_only"))
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, _ = run(compose([*args, "trainer.max_steps=4", "ckpt_path=last"]), run_dir)
    assert trainer.global_step == 4
    assert len(calls) >= 2 and all(w is True for w in calls), calls  # ours (read_checkpoint) and Lightning's
    assert not [w for w in caught if "weights_only" in str(w.message)]


# ---- trust_remote_code ------------------------------------------------------------------------------
def test_trust_remote_code_is_never_switched_on_in_the_source():
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("core", "plugins") for p in (ROOT / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"trust_remote_code\s*[=:]\s*True", line)]
    hits += [f"{p.relative_to(ROOT)}" for p in (ROOT / "plugins").rglob("*.yaml")
             if re.search(r"trust_remote_code:\s*true", p.read_text())]
    assert not hits, hits


@pytest.mark.parametrize("plugin", ["causal_lm", "sft", "dpo", "grpo", "ppo", "reward_model"])
def test_pretrained_model_configs_default_to_no_remote_code(plugin: str):
    from modalforge.config import compose

    cfg = compose([f"plugin={plugin}", f"model={plugin}/pretrained", "model.name_or_path=/models/some-llama"])
    assert cfg.model.get("trust_remote_code", False) is False


def test_model_and_tokenizer_loading_pass_trust_remote_code_false(monkeypatch):
    import transformers

    from modalforge.data.tokenizers import load_tokenizer
    from modalforge.text.models import build_causal_lm

    seen: list[dict] = []

    def spy(name, **kwargs):  # noqa: ANN001, ANN202
        seen.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    with pytest.raises(Exception):
        build_causal_lm("/models/some-llama")
    with pytest.raises(Exception):
        load_tokenizer("/models/some-llama")
    assert len(seen) == 2 and all(kwargs.get("trust_remote_code", False) is False for kwargs in seen), seen


def test_export_refuses_it_too_naming_its_own_switch(tmp_path: Path):
    from modalforge.cli.export import _read

    ckpt, marker = _malicious(tmp_path)
    with pytest.raises(CheckpointError, match="--trust loads it"):
        _read(ckpt)
    assert not marker.exists()
