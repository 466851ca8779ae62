"""The causal_lm plugin: data packing, tokenizer, errors, and learning on the offline default."""

from __future__ import annotations

import json

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.errors import ModelLoadError
from modalforge.plugins.text.causal_lm.data import CausalLMDataModule, pack_blocks
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series


def test_pack_blocks_concatenates_with_eos_and_wastes_nothing():
    blocks, dropped = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert dropped == 0
    blocks, dropped = pack_blocks([[1, 2, 3, 4, 5, 6]], block_size=4, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3, 4]] and dropped == 3


def test_datamodule_works_alone_on_the_synthetic_default():
    dm = CausalLMDataModule(block_size=32, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert dm.processor.pad_token_id not in batch["input_ids"]  # packing: no padding at all
    assert len(dm.val_dataloader()) > 0
    hints = dm.model_hints()
    assert hints["vocab_size"] == len(dm.processor) <= 512 + 8


def test_reads_txt_files_and_splits_validation_from_train(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} says hello world again and again. " * 5)
    dm = CausalLMDataModule(train=str(tmp_path), block_size=16, batch_size=2, vocab_size=300)
    dm.setup()
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    assert len(dm.val_texts) == 1  # 5% of 20 documents


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a b c"}\n\n{"txt": "wrong key"}\n')
    dm = CausalLMDataModule(train=str(path), block_size=4)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert "c.jsonl" in str(err.value) and "line 3" in str(err.value) and "text" in str(err.value)


def test_corpus_shorter_than_one_block_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps({"text": "hi"}) for _ in range(3)))
    dm = CausalLMDataModule(train=str(path), val=str(path), block_size=4096, vocab_size=260)
    with pytest.raises(DataError, match="fewer than one block"):
        dm.setup()


def test_unloadable_model_says_how_to_point_at_a_local_folder():
    cfg = compose(["plugin=causal_lm", "model.name_or_path=nobody/nothing"])
    from modalforge.models import build_model

    with pytest.raises(ModelLoadError, match="model.name_or_path=/models/x"):
        build_model(dict(cfg.model))


def save_tiny_pretrained(folder) -> int:
    """A tiny Llama + the demo tokenizer saved like a downloaded checkpoint; returns the vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dm = CausalLMDataModule(block_size=32, batch_size=4)
    dm.setup()
    config = LlamaConfig(vocab_size=len(dm.processor), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    dm.processor.save_pretrained(folder)
    return len(dm.processor)


def test_loads_a_local_pretrained_model_and_tokenizer(tmp_path):
    """The real-use path (`model.name_or_path=<dir>`), tested with a model saved to a temp dir."""
    save_tiny_pretrained(tmp_path / "m")
    report = assert_plugin_conforms("causal_lm", tmp_path, [f"model.name_or_path={tmp_path / 'm'}",
                                                            "model=causal_lm/pretrained"], steps=6)
    assert report.losses


def test_conforms(tmp_path):
    assert_plugin_conforms("causal_lm", tmp_path, ["data.batch_size=8"], steps=10)


def test_conforms_with_lora(tmp_path):
    report = assert_plugin_conforms("causal_lm", tmp_path, ["adapter=lora", "optim.lr=1e-2"], steps=10)
    assert report.changed and all("lora_" in name for name in report.changed)


def test_validation_loss_falls_clearly_on_the_offline_default(tmp_path):
    cfg = compose(["plugin=causal_lm", *FAST, "trainer.max_steps=100", "trainer.val_check_interval=25",
                   "trainer.limit_val_batches=10", "checkpoint.export_on_end=false", "callbacks=none"])
    trainer, module, dm = run(cfg, tmp_path)
    val = series(tmp_path, "val/loss")
    steps = sorted(val)
    assert len(steps) == 4
    assert val[steps[-1]] < 0.6 * val[steps[0]], f"validation loss did not fall clearly: {val}"
    ppl = series(tmp_path, "val/ppl")
    assert ppl[max(ppl)] == pytest.approx(torch.exp(torch.tensor(val[steps[-1]])).item(), rel=0.05)


def test_conforms_with_qlora_and_gradient_checkpointing(tmp_path):
    report = assert_plugin_conforms("causal_lm", tmp_path, ["adapter=qlora", "module.gradient_checkpointing=true",
                                                            "optim.lr=1e-2"], steps=8)
    assert all("lora_" in name for name in report.changed)


def test_empty_corpus_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no documents found"):
        CausalLMDataModule(train=str(path)).setup()


def test_lora_run_exports_a_peft_adapter_for_a_pretrained_base(tmp_path):
    """With model.name_or_path the export is the adapter alone, loadable with plain PEFT on that base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    vocab_size = save_tiny_pretrained(tmp_path / "base")
    cfg = compose(["plugin=causal_lm", *FAST, "model=causal_lm/pretrained", f"model.name_or_path={tmp_path / 'base'}",
                   "adapter=lora", "trainer.max_steps=6", "trainer.limit_val_batches=0", "callbacks=none"])
    trainer, module, _ = run(cfg, tmp_path / "run")
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), final).eval()
    ids = torch.randint(0, vocab_size, (1, 12))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, module.objective.model(input_ids=ids).logits)


def test_streams_webdataset_shards_split_by_worker(tmp_path):
    import webdataset as wds

    from modalforge.plugins.text.causal_lm.synthetic import document
    import random

    rng = random.Random(0)
    for s in range(4):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as sink:
            for i in range(30):
                sink.write({"__key__": f"{s}-{i}", "txt": document(rng)})
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"txt": document(rng)}) for _ in range(40)))
    dm = CausalLMDataModule(train=str(tmp_path / "shard-{000..003}.tar"), val=str(val), text_field="txt",
                            streaming=True, block_size=32, batch_size=4, num_workers=2, vocab_size=300)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert batches and all(b["input_ids"].shape == (4, 32) for b in batches[:-1])
    # two workers read disjoint shards: every block appears once
    rows = [tuple(r.tolist()) for b in batches for r in b["input_ids"]]
    assert len(rows) == len(set(rows))
    with pytest.raises(DataError, match="needs data.train .* and data.val"):
        CausalLMDataModule(train=str(tmp_path / "*.tar"), streaming=True)
