"""audio_lm: conformance, the beeps demo learns above chance, export reloads and generates, assembly from a
Whisper and a causal LM folder loads their weights exactly, bad records name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from modalforge.config import compose
from modalforge.run import run

FAST = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0", "module.num_samples=0", "data.num_eval_questions=16"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MODALFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "audio_lm_cache"))


def test_audio_lm_conforms(tmp_path):
    from modalforge.testing import assert_plugin_conforms

    report = assert_plugin_conforms("audio_lm", tmp_path, ["data.demo=beeps", "data.num_eval_questions=2"], steps=8)
    assert not any(".audio_tower." in name for name in report.changed)  # frozen by default
    assert any(".multi_modal_projector." in name for name in report.changed)


def test_beeps_learn_above_chance_and_export_generates(tmp_path):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    cfg = compose(["plugin=audio_lm", "data.demo=beeps", "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.limit_val_batches=1",
                   "logger=csv", f"run_dir={tmp_path}", *FAST])
    trainer, module, dm = run(cfg, tmp_path)
    rows = [line.split(",") for line in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()]
    accs = [float(r[rows[0].index("val/acc")]) for r in rows[1:] if r[rows[0].index("val/acc")]]
    assert accs[-1] > 0.5, accs  # how many beeps (one..four): chance is 0.25

    final = tmp_path / "final"
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(final)).eval()
    processor = AutoProcessor.from_pretrained(str(final))
    clip = dm.questions[0]
    text = processor.apply_chat_template(clip.messages(with_answer=False), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], audio=[clip.wave()], sampling_rate=16000, return_tensors="pt")
    assert (inputs["input_ids"] == processor.audio_token_id).sum() > 1  # the processor expanded the placeholder
    out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == module.objective.answer([clip])[0]


def _whisper_and_llama(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny whisper_asr-style final/ (Whisper + feature extractor) and a causal_lm-style final/ (tied Llama + BPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor
    from transformers import WhisperForConditionalGeneration

    from modalforge.data.tokenizers import train_bpe

    whisper_dir, lm_dir = tmp_path / "whisper", tmp_path / "lm"
    torch.manual_seed(0)
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=50, vocab_size=300,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None))
    whisper.save_pretrained(str(whisper_dir))
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=1).save_pretrained(str(whisper_dir))
    words = ["how many beeps one two three four transcribe the audio zero five six seven eight nine"] * 20
    tokenizer = train_bpe(words, 300)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id))
    lm.save_pretrained(str(lm_dir))
    tokenizer.save_pretrained(str(lm_dir))
    return whisper_dir, lm_dir


def test_assembled_from_whisper_and_causal_lm_loads_their_weights_exactly(tmp_path):
    from transformers import AutoModelForCausalLM, WhisperForConditionalGeneration

    whisper_dir, lm_dir = _whisper_and_llama(tmp_path)
    cfg = compose(["plugin=audio_lm", "model=audio_lm/parts", f"model.audio_encoder={whisper_dir}",
                   f"model.language_model={lm_dir}", "data.demo=beeps", "trainer.max_steps=2", "logger=none",
                   "adapter=lora", f"run_dir={tmp_path / 'run'}", *FAST])
    trainable: list[str] = []

    class Trainable(L.Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001 - before export merges the adapter
            trainable.extend(n for n, p in pl_module.named_parameters() if p.requires_grad)

    trainer, module, dm = run(cfg, tmp_path / "run", callbacks=[Trainable()])
    assert trainer.global_step == 2
    assert any("language_model" in n and "lora_" in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)  # the projector trains in full
    assert not any("audio_tower" in n for n in trainable)
    built = module.objective.model
    built = built.get_base_model() if hasattr(built, "get_base_model") else built

    # the encoder is frozen and untouched by LoRA: every Whisper encoder tensor is there under the same name
    encoder = WhisperForConditionalGeneration.from_pretrained(str(whisper_dir)).model.encoder.state_dict()
    tower = built.model.audio_tower.state_dict()
    assert set(encoder) == set(tower)
    for name, value in encoder.items():
        assert torch.equal(value, tower[name]), name

    # a fresh assembly (no training) holds the language model's weights exactly, the tied head untied as a copy
    from modalforge.plugins.multimodal.audio_lm.model import build_audio_lm

    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir))
    fresh = build_audio_lm(audio_encoder=str(whisper_dir), language_model=str(lm_dir), audio_token_id=5,
                           vocab_size=len(dm.tokenizer))
    fresh_lm = fresh.model.language_model.state_dict()
    for name, value in lm.model.state_dict().items():
        size = value.shape[0]
        assert torch.equal(value, fresh_lm[name][:size]), name
    assert torch.equal(lm.lm_head.weight, fresh.lm_head.weight[: lm.lm_head.weight.shape[0]])
    assert fresh.lm_head.weight.data_ptr() != fresh.model.language_model.embed_tokens.weight.data_ptr()


def test_samples_in_a_record_train_and_a_bad_record_names_file_and_line(tmp_path):
    from modalforge.data.errors import DataError
    from modalforge.plugins.multimodal.audio_lm.data import AudioLMDataModule

    rng = np.random.default_rng(0)
    good = [{"audio": rng.normal(0, 0.1, 8000).tolist(), "sample_rate": 8000, "question": "What is it?",
             "answer": "noise"}, {"audio": rng.normal(0, 0.1, 4000).tolist(), "transcript": "hiss"}]
    manifest = tmp_path / "good.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in good) + "\n")
    dm = AudioLMDataModule(train=str(manifest), val=str(manifest), batch_size=2, cache_dir=str(tmp_path))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    learned = batch["labels"][batch["labels"] != -100]
    assert (batch["input_ids"] == dm.audio_token_id).sum() > 2 and dm.audio_token_id not in learned.tolist()
    texts = {dm.tokenizer.decode(row[row != -100]) for row in batch["labels"]}
    assert texts == {"noise<|im_end|>", "hiss<|im_end|>"}  # assistant tokens only

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good[0]) + "\n" + json.dumps({"audio": "a.wav", "question": "How many?"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2"):
        AudioLMDataModule(train=str(bad), val=str(manifest), cache_dir=str(tmp_path)).setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"audio": [], "transcript": "x"}) + "\n")
    with pytest.raises(DataError, match=r"empty\.jsonl.*line 1"):
        AudioLMDataModule(train=str(empty), val=str(manifest), cache_dir=str(tmp_path)).setup()
