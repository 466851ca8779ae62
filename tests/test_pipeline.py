"""Pipelines of train stages: references between stages, skip / resume / stop, and the shipped pipelines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from modalforge.cli import pipeline as pl
from modalforge.cli import main
from modalforge.errors import ConfigError

# Every stage tiny and quick: a few steps, no validation, a checkpoint every 2 steps.
TINY = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", "module.num_samples=0", "trainer.max_steps=4",
        "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=2", "optim.warmup_steps=0"]


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TWO_STAGES = """
name: two
stages:
  - name: a
    plugin: causal_lm
    overrides: [trainer.max_steps=5]
  - name: b
    plugin: sft
    overrides: [model=sft/pretrained, "model.name_or_path=${stages.a.final}", "data.train=${stages.a.run_dir}/y.jsonl",
                "data.cache_dir=${oc.env:SOME_DIR,/tmp}"]
"""


# ---- the file and its references (no training) ------------------------------------------------
def test_references_resolve_and_other_interpolations_are_left_to_hydra(tmp_path):
    pipe = pl.load_pipeline(write(tmp_path, TWO_STAGES), ["trainer.max_steps=2"])
    a, b = pl.plan(pipe, tmp_path / "run")
    root = (tmp_path / "run").absolute()
    assert a.args == ["plugin=causal_lm", "trainer.max_steps=2", f"run_dir={root / 'a'}"]  # every-stage override wins
    assert b.args[:3] == ["plugin=sft", "model=sft/pretrained", f"model.name_or_path={root / 'a' / 'final'}"]
    assert f"data.train={root / 'a'}/y.jsonl" in b.args
    assert "data.cache_dir=${oc.env:SOME_DIR,/tmp}" in b.args
    assert (a.status, b.status) == ("fresh", "fresh")
    assert b.needs == [("a", "final", "stages.b.overrides[1]"), ("a", "run_dir", "stages.b.overrides[2]")]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("model.name_or_path=${stages.nope.final}", "refers to stage 'nope', which does not exist"),
    ("model.name_or_path=${stages.c.final}", "refers to stage 'c', which runs later"),
    ("model.name_or_path=${stages.b.final}", "refers to itself"),
    ("model.name_or_path=${stages.a.weights}", "a stage's outputs are run_dir, final, checkpoints"),
])
def test_a_bad_reference_is_one_error_naming_the_override(tmp_path, override, message):
    text = f"""
stages:
  - {{name: a, plugin: causal_lm}}
  - {{name: b, plugin: sft, overrides: [model=sft/pretrained, "{override}"]}}
  - {{name: c, plugin: dpo}}
"""
    with pytest.raises(ConfigError) as info:
        pl.plan(pl.load_pipeline(write(tmp_path, text)), tmp_path / "run")
    assert info.value.where == "stages.b.overrides[1]"
    assert message in info.value.what


def test_an_output_that_will_not_be_produced_is_an_error_before_anything_runs(tmp_path):
    text = TWO_STAGES.replace("[trainer.max_steps=5]", "[checkpoint.export_on_end=false]")
    with pytest.raises(ConfigError) as info:
        pl.plan(pl.load_pipeline(write(tmp_path, text)), tmp_path / "run")
    assert info.value.where == "stages.b.overrides[1]" and "export_on_end=false" in info.value.what
    # a stage that finished earlier without final/ (checkpoints only)
    (tmp_path / "run" / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "a" / "finished.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"stage 'a' finished without producing .*final"):
        pl.plan(pl.load_pipeline(write(tmp_path, TWO_STAGES)), tmp_path / "run")


@pytest.mark.parametrize("text, where, message", [
    ("stages: []", "stages", "non-empty list"),
    ("stages:\n  - {name: a, plugin: causal_lm}\n  - {name: a, plugin: sft}", "stages[1].name", "two stages"),
    ("stages:\n  - {name: a}", "stages.a.plugin", "is required"),
    ("stages:\n  - {name: a b, plugin: sft}", "stages[0].name", "must be a word"),
    ("stages:\n  - {name: a, plugin: sft, overides: []}", "stages.a.overides", "unknown key"),
    ("stages:\n  - {name: a, plugin: sft, overrides: [run_dir=x]}", "stages.a.overrides[0]", "set by the pipeline"),
    ("stages:\n  - {name: a, plugin: sft, overrides: [ckpt_path=last]}", "stages.a.overrides[0]", "set by the pipe"),
    ("stages:\n  - {name: a, plugin: sft, overrides: [-m]}", "stages.a.overrides[0]", "flags"),
    ("steps: []", "steps", "unknown key"),
])
def test_schema_mistakes_name_where(tmp_path, text, where, message):
    with pytest.raises(ConfigError) as info:
        pl.load_pipeline(write(tmp_path, text))
    assert info.value.where == where and message in info.value.what


def test_each_stage_config_is_validated_before_any_stage_runs(tmp_path, capsys):
    text = """
stages:
  - {name: a, plugin: causal_lm}
  - {name: b, plugin: sft, overrides: [model=sft/pretrained, "model.name_or_path=${stages.a.final}", trainer.max_step=3]}
"""
    with pytest.raises(SystemExit) as info:
        main(["pipeline", str(write(tmp_path, text)), "--dir", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: stages.b.overrides[2]: trainer.max_step: unknown key",
                   "hint: did you mean trainer.max_steps?"], err
    assert not (tmp_path / "run").exists()


def test_shipped_pipelines_by_name_and_dry_run(tmp_path, capsys):
    assert {"causal_lm_sft_dpo", "causal_lm_sft_dpo_grpo", "causal_lm_sft_dpo_lora", "clip_image_classification",
            "clip_causal_lm_vlm"} <= set(pl.shipped_pipelines())
    main(["pipeline", "causal_lm_sft_dpo", "--dry-run", "--dir", str(tmp_path / "run"), "trainer.max_steps=3"])
    out = capsys.readouterr().out
    final = (tmp_path / "run" / "pretrain" / "final").absolute()
    assert f"train plugin=sft model=sft/pretrained model.name_or_path={final}" in out
    assert out.count("trainer.max_steps=3") == 3 and "runs" in out
    main(["pipeline", "causal_lm_sft_dpo_lora", "--dry-run", "--dir", str(tmp_path / "run")])
    sft_final = (tmp_path / "run" / "sft" / "final").absolute()
    assert f"train plugin=dpo model=dpo/pretrained model.name_or_path={sft_final} adapter=lora" in \
        capsys.readouterr().out
    main(["pipeline", "clip_image_classification", "--dry-run", "--dir", str(tmp_path / "run")])
    assert "model=image_classification/clip_tower model.path=" in capsys.readouterr().out
    main(["pipeline", "clip_causal_lm_vlm", "--dry-run", "--dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    clip, pretrain = (tmp_path / "run" / "clip" / "final").absolute(), (tmp_path / "run" / "pretrain" / "final").absolute()
    assert f"model.vision_tower={clip} model.language_model={pretrain}" in out
    assert f"model.name_or_path={(tmp_path / 'run' / 'vlm_stage1' / 'final').absolute()}" in out
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "no_such_pipeline"])
    assert info.value.code == 2 and "shipped pipelines: " in capsys.readouterr().err


# ---- running (a stand-in for train where the outcome is what is tested) ----------------------------
def test_a_failed_stage_stops_the_pipeline_with_its_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pl, "_TRAIN", "import sys; sys.exit(3)")
    with pytest.raises(SystemExit) as info:
        main(["pipeline", str(write(tmp_path, TWO_STAGES)), "--dir", str(tmp_path / "run")])
    assert info.value.code == 3
    captured = capsys.readouterr()
    assert "error: stages.a: train exited with code 3" in captured.err
    assert "stage 2/2" not in captured.out  # b never started


def test_a_stage_that_stops_unfinished_stops_the_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pl, "_TRAIN", "pass")  # exits 0 without finished.json, as after Ctrl-C
    with pytest.raises(SystemExit) as info:
        main(["pipeline", str(write(tmp_path, TWO_STAGES)), "--dir", str(tmp_path / "run")])
    assert info.value.code == 130 and "stages.a: stopped before finishing" in capsys.readouterr().err


def test_sigterm_to_the_pipeline_reaches_the_running_stage(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import threading
    import time

    started, stopped = tmp_path / "started", tmp_path / "stopped"
    monkeypatch.setattr(pl, "_TRAIN", (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(stopped)!r}).touch(), sys.exit(143)))\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "time.sleep(60)"))

    def preempt() -> None:
        deadline = time.time() + 30
        while not started.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    with pytest.raises(SystemExit) as info:
        main(["pipeline", str(write(tmp_path, TWO_STAGES)), "--dir", str(tmp_path / "run")])
    assert info.value.code == 143 and stopped.exists()
    assert "error: stages.a: train exited with code 143" in capsys.readouterr().err


def test_status_comes_from_the_run_directory(tmp_path):
    pipe = pl.load_pipeline(write(tmp_path, TWO_STAGES))
    (tmp_path / "run" / "a" / "final").mkdir(parents=True)
    (tmp_path / "run" / "a" / "finished.json").write_text("{}")
    (tmp_path / "run" / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "b" / "checkpoints" / "last.ckpt").write_bytes(b"")
    a, b = pl.plan(pipe, tmp_path / "run")
    assert (a.status, b.status) == ("finished", "resume") and b.args[-1] == "ckpt_path=last"


# ---- the shipped pipelines, trained at tiny size ----------------------------------------------------
def _mtimes(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_causal_lm_sft_dpo_runs_skips_and_resumes(tmp_path, capsys):
    from transformers import AutoTokenizer

    root = tmp_path / "pipe"
    main(["pipeline", "causal_lm_sft_dpo", "--dir", str(root), *TINY])
    for stage in ("pretrain", "sft", "dpo"):
        assert (root / stage / "finished.json").exists() and (root / stage / "final" / "model.safetensors").exists()
    # sft and dpo use the tokenizer trained on the pretraining corpus (plus the chat tokens sft adds)
    pre = AutoTokenizer.from_pretrained(root / "pretrain" / "final").get_vocab()
    sft = AutoTokenizer.from_pretrained(root / "sft" / "final").get_vocab()
    dpo = AutoTokenizer.from_pretrained(root / "dpo" / "final").get_vocab()
    assert all(sft[token] == i for token, i in pre.items()) and "<|im_start|>" in sft
    assert dpo == sft
    sft_config = (root / "sft" / ".hydra" / "config.yaml").read_text()
    assert f"name_or_path: {root / 'pretrain' / 'final'}" in sft_config
    assert "tokenizer: ${oc.select:model.name_or_path,null}" in sft_config

    # a rerun skips every finished stage and touches none of its files
    before = _mtimes(root)
    capsys.readouterr()
    main(["pipeline", "causal_lm_sft_dpo", "--dir", str(root), *TINY])
    assert capsys.readouterr().out.count("finished earlier") == 3
    assert _mtimes(root) == before

    # an interrupted stage (checkpoints, not finished) resumes from its last checkpoint; here it is
    # given two more steps, and the finished stages, run with max_steps=4, are kept as they are
    (root / "dpo" / "finished.json").unlink()
    shutil.rmtree(root / "dpo" / "final")
    kept = {k: v for k, v in before.items() if "/dpo/" not in k}
    main(["pipeline", "causal_lm_sft_dpo", "--dir", str(root), *TINY, "trainer.max_steps=6"])
    out = capsys.readouterr().out
    assert "stage 3/3 'dpo': resumes from its last checkpoint" in out and "ckpt_path=last" in out
    assert out.count("note: it ran with other overrides (then: trainer.max_steps=4; now: trainer.max_steps=6)") == 2
    assert json.loads((root / "dpo" / "final" / "modalforge.json").read_text())["global_step"] == 6
    assert {k: v for k, v in _mtimes(root).items() if k in kept} == kept

    # -> grpo: the longer shipped pipeline continues this directory: three stages skipped, RL from dpo's final/
    capsys.readouterr()
    main(["pipeline", "causal_lm_sft_dpo_grpo", "--dir", str(root), *TINY, "trainer.max_steps=6"])
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 3
    assert (root / "grpo" / "finished.json").exists() and (root / "grpo" / "final" / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(root / "grpo" / "final").get_vocab() == dpo


def _tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}


@pytest.mark.slow
def test_clip_then_image_classification_probe_and_finetune(tmp_path):
    root = tmp_path / "pipe"
    main(["pipeline", "clip_image_classification", "--dir", str(root), *TINY])
    clip = _tensors(root / "clip" / "final" / "open_clip_model.safetensors", "visual.")
    probe = _tensors(root / "linear_probe" / "final" / "model.safetensors", "backbone.")
    tuned = _tensors(root / "finetune" / "final" / "model.safetensors", "backbone.")
    assert clip and set(probe) == set(clip) == set(tuned)
    # the linear probe trained its head only: the tower is the clip run's, bit for bit
    assert all(torch.equal(probe[k], clip[k]) for k in clip)
    # the fine-tune moved the tower
    assert any(not torch.equal(tuned[k], clip[k]) for k in clip)


@pytest.mark.slow
def test_clip_and_causal_lm_then_vlm_loads_with_plain_transformers(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = tmp_path / "pipe"
    main(["pipeline", "clip_causal_lm_vlm", "--dir", str(root), *TINY])
    for stage in ("clip", "pretrain", "vlm_stage1", "vlm_stage2"):
        assert (root / stage / "finished.json").exists(), stage
    # stage 1 trained the projector only: the language model is the causal_lm run's
    lm = _tensors(root / "pretrain" / "final" / "model.safetensors", "model.layers.0.")
    joined = LlavaForConditionalGeneration.from_pretrained(root / "vlm_stage1" / "final")
    layer = {k: v for k, v in joined.model.language_model.layers[0].state_dict().items()}
    assert lm and all(torch.equal(layer[k], lm[k]) for k in lm)
    model = LlavaForConditionalGeneration.from_pretrained(root / "vlm_stage2" / "final")
    processor = AutoProcessor.from_pretrained(root / "vlm_stage2" / "final")
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(processor.image_token)


# ---- the clip_tower model (no training) --------------------------------------------------------------
@pytest.fixture
def clip_final(tmp_path) -> Path:
    """A clip run's final/ as the clip plugin writes it, from a tiny untrained CLIP."""
    from modalforge.plugins.vision.clip.model import build_clip
    from modalforge.plugins.vision.clip.objective import CLIPObjective

    config = {"_target_": "modalforge.plugins.vision.clip.model.build_clip", "name": None, "embed_dim": 16,
              "vision": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8}, "text": {"layers": 1, "width": 32}}
    objective = CLIPObjective(model=config)
    objective.model = build_clip(**{k: v for k, v in config.items() if k != "_target_"}, image_size=32,
                                 context_length=8)
    objective.hints = {"image_size": 32, "context_length": 8}
    folder = tmp_path / "clip" / "final"
    objective.save_pretrained(folder)
    (folder / "preprocess_config.json").write_text(json.dumps({"image_size": 32, "mean": [0.5, 0.4, 0.3],
                                                               "std": [0.2, 0.25, 0.3]}))
    return folder


def test_clip_tower_holds_the_clip_weights_and_freezes_for_a_probe(clip_final):
    from modalforge.plugins.vision.image_classification.model import build_clip_tower_classifier

    clip = _tensors(clip_final / "open_clip_model.safetensors", "visual.")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model = build_clip_tower_classifier(str(clip_final), num_classes=5, image_size=32, freeze_backbone=True,
                                        input_mean=mean, input_std=std)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in clip.items())
    model.requires_grad_(True)  # what adapter=full does: the backbone stays frozen
    model.train()
    assert not any(p.requires_grad for p in model.backbone.parameters()) and not model.backbone.training
    assert all(p.requires_grad for p in model.head.parameters())
    # images normalised with the data's mean/std reach the tower normalised as in the clip run
    raw = torch.rand(2, 3, 32, 32)
    as_data = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    as_clip = (raw - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    model.eval()
    assert torch.allclose(model(as_data), model.head(model.backbone(as_clip)), atol=1e-5)
    tuned = build_clip_tower_classifier(str(clip_final), num_classes=5, image_size=32)
    tuned.requires_grad_(True)
    assert all(p.requires_grad for p in tuned.parameters())


def test_clip_tower_mistakes_are_one_line(clip_final, tmp_path):
    from modalforge.errors import ModalforgeError
    from modalforge.plugins.vision.image_classification.model import build_clip_tower_classifier

    with pytest.raises(ModalforgeError) as info:
        build_clip_tower_classifier(str(clip_final), num_classes=5, image_size=64)
    assert info.value.where == "data.image_size" and "takes 32x32" in info.value.what
    with pytest.raises(ModalforgeError) as info:
        build_clip_tower_classifier(str(tmp_path), num_classes=5)
    assert info.value.where == "model.path" and "holds no open_clip_config.json" in info.value.what
    # a clip run directory works as well as its final/
    assert build_clip_tower_classifier(str(clip_final.parent), num_classes=5, image_size=32) is not None
