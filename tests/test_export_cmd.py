"""``modalforge export``: any checkpoint of a run in the final/ layout, loadable with plain transformers / PEFT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from modalforge.cli import main
from modalforge.config import compose
from modalforge.cli.export import export_checkpoint
from modalforge.run import run

FAST = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", "module.num_samples=0", "trainer.limit_val_batches=0",
        "checkpoint.export_on_end=false", "checkpoint.every_n_train_steps=2", "checkpoint.save_top_k=-1", "trainer.max_steps=4",
        "logger=none"]
PREFIX = "objective.model."


def _train(tmp_path: Path, *extra: str) -> Path:
    os.environ["MODALFORGE_QUIET"] = "1"
    run_dir = tmp_path / "run"
    run(compose(["plugin=causal_lm", *FAST, *extra, f"run_dir={run_dir}"]), run_dir)
    return run_dir


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


def test_export_of_an_unfinished_step_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = _train(tmp_path)
    assert not (run_dir / "final").exists()
    ckpt = run_dir / "checkpoints" / "step0000002.ckpt"
    proc = run_cli("modalforge", "export", str(ckpt))
    out = run_dir / "export" / "step0000002"
    assert str(out) in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    saved, loaded = _weights(ckpt), model.state_dict()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    meta = json.loads((out / "modalforge.json").read_text())
    assert meta["global_step"] == 2 and meta["plugin"] == "causal_lm"
    # the same export again is refused (one line, exit 2), --overwrite replaces it
    again = run_cli("modalforge", "export", str(ckpt), check=False)
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and lines[-2].startswith("error:") and "not overwritten" in lines[-2]
    assert lines[-1] == "hint: choose another --out, or add --overwrite"
    run_cli("modalforge", "export", str(ckpt), "--overwrite")


def test_lora_run_exports_as_peft_or_merged(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = _train(tmp_path, "adapter=lora", "checkpoint.export_merged=false", "optim.lr=1e-2")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    peft_dir = export_checkpoint(run_dir, tmp_path / "peft")  # a run directory: its newest checkpoint
    assert (peft_dir / "adapter_config.json").exists() and (peft_dir / "adapter_model.safetensors").exists()
    assert not (peft_dir / "model.safetensors").exists()
    merged_dir = export_checkpoint(ckpt, tmp_path / "merged", merge_lora=True)
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()

    # the PEFT export on its base (the checkpoint's base weights) gives the merged model's outputs
    state = _weights(ckpt)
    base_state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items()
                  if "lora_" not in k}
    base = AutoModelForCausalLM.from_config(merged.config)
    missing, unexpected = base.load_state_dict(base_state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    base.tie_weights()
    with_adapter = PeftModel.from_pretrained(base, peft_dir).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-5)
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # the adapter trained: merging changed weights


def test_export_errors_are_one_line_with_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    garbage = tmp_path / "bad.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    for source in (empty, garbage, tmp_path / "missing"):
        with pytest.raises(SystemExit) as stop:
            main(["export", str(source)])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(("error:", "hint:")) and any(line.startswith("error:") for line in err)
        assert "Traceback" not in "\n".join(err)


def test_a_deepspeed_zero_checkpoint_exports_through_lightnings_conversion(tmp_path, monkeypatch):
    """A ZeRO checkpoint folder (a ``latest`` tag file) goes through Lightning's fp32 conversion; its
    state is what final/ holds. deepspeed itself (GPU-only) is replaced by a stand-in conversion here."""
    import lightning.pytorch.utilities.deepspeed as ds
    from transformers import AutoModelForCausalLM

    run_dir = _train(tmp_path)
    source = run_dir / "checkpoints" / "step0000004.ckpt"
    folder = run_dir / "checkpoints" / "zero.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    calls = []

    def convert(checkpoint_dir, output_file, tag=None):  # noqa: ANN001, ANN202
        calls.append(Path(checkpoint_dir))
        return torch.load(source, map_location="cpu", weights_only=False)

    monkeypatch.setattr(ds, "convert_zero_checkpoint_to_fp32_state_dict", convert)
    out = export_checkpoint(folder, tmp_path / "out")
    assert calls == [folder]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    for name, value in _weights(source).items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_zero_checkpoint_without_deepspeed_is_one_line(tmp_path):
    from modalforge.errors import CheckpointError
    from modalforge.checkpoints import read_zero_checkpoint

    pytest.importorskip("lightning")
    folder = tmp_path / "zero.ckpt"
    folder.mkdir()
    (folder / "latest").write_text("global_step4")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    with pytest.raises(CheckpointError, match="deepspeed"):
        read_zero_checkpoint(folder)


def test_zero_stage_is_read_from_a_deepspeed_strategy_only():
    from modalforge.module import _zero_stage

    class DeepSpeedStrategy:
        config = {"zero_optimization": {"stage": 3}}

    class DDPStrategy:
        config = {"zero_optimization": {"stage": 3}}

    class Trainer:
        def __init__(self, strategy):  # noqa: ANN001
            self.strategy = strategy

    assert _zero_stage(Trainer(DeepSpeedStrategy())) == 3
    assert _zero_stage(Trainer(DDPStrategy())) is None and _zero_stage(None) is None
