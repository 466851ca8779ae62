"""whisper_asr: prompt masking, audio errors, resampling, adapters, learning, and reloading a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.data.audio import AudioRef, load_audio
from modalforge.data.errors import DataError
from modalforge.plugins.audio.whisper_asr.data import IGNORE, WhisperASRDataModule
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series

FAST_FIT = ["optim.warmup_steps=0", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def dm() -> WhisperASRDataModule:
    module = WhisperASRDataModule(batch_size=4)
    module.setup()
    return module


def test_decoder_prompt_is_masked_from_the_loss(dm):
    ids, labels = dm.decoder_sequence("three one", "en")
    prompt = dm.prompt_ids("en")
    assert ids[:4] == prompt and len(ids) == len(labels)
    assert labels[:3] == [IGNORE] * 3  # <|en|> <|transcribe|> <|notimestamps|> are inputs, never targets
    assert labels[-1] == dm.end_id() and IGNORE not in labels[3:]
    assert dm.processor.decode(labels[3:-1]).strip() == "three one"


def test_batches_have_fixed_window_features(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_features"].shape == (4, 80, 200)  # 2 s window, 10 ms hop
    assert batch["decoder_input_ids"].shape == batch["labels"].shape


def test_any_sample_rate_is_resampled_to_16k(tmp_path):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(22050, dtype=np.float32), 22050)
    assert load_audio(AudioRef(path=str(tmp_path / "a.wav")), 16000).shape == (16000,)


def test_unreadable_and_empty_audio_name_the_file(tmp_path):
    import numpy as np
    import soundfile as sf

    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DataError, match=r"bad.wav: unreadable audio"):
        load_audio(AudioRef(path=str(tmp_path / "bad.wav")), 16000)
    with pytest.raises(DataError, match=r"empty.wav: empty audio"):
        load_audio(AudioRef(path=str(tmp_path / "empty.wav")), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "bad.wav"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl, line 1: missing field 'text'"):
        WhisperASRDataModule(train=str(manifest), val=str(manifest)).setup()


def test_conforms(tmp_path):
    assert_plugin_conforms("whisper_asr", tmp_path, FAST_FIT, steps=10)


def test_frozen_encoder(tmp_path):
    report = assert_plugin_conforms("whisper_asr", tmp_path, [*FAST_FIT, "objective.freeze_encoder=true"], steps=10)
    assert report.changed and not any(".encoder." in n for n in report.changed)


def test_lora_on_attention_projections(tmp_path):
    report = assert_plugin_conforms("whisper_asr", tmp_path, [*FAST_FIT, "adapter=lora", "optim.lr=1e-2"], steps=10)
    assert report.changed and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in report.changed)


def test_offline_default_wer_falls_and_the_run_reloads(tmp_path):
    cfg = compose(["plugin=whisper_asr", *FAST, "trainer.max_steps=250", "trainer.val_check_interval=125",
                   "callbacks=none"])
    run(cfg, tmp_path / "first")
    wer = series(tmp_path / "first", "val/wer")
    assert wer[max(wer)] < 0.5, wer
    # the exported folder (model + tokenizer + feature extractor) is a valid model.name_or_path
    again = compose(["plugin=whisper_asr", *FAST, "model=whisper_asr/pretrained",
                     f"model.name_or_path={tmp_path / 'first' / 'final'}", "trainer.max_steps=2",
                     "trainer.val_check_interval=2", "callbacks=none"])
    run(again, tmp_path / "second")
    assert series(tmp_path / "second", "val/wer")[1] < 0.5


def test_reads_webdataset_shards_with_audio_and_transcripts(dm, tmp_path):
    import webdataset as wds

    folder = Path(dm.synthetic_data()[0]).parent
    lines = [json.loads(l) for l in (folder / "val.jsonl").read_text().splitlines()[:6]]
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as sink:
        for i, item in enumerate(lines):
            sink.write({"__key__": f"u{i}", "wav": (folder / item["audio"]).read_bytes(), "txt": item["text"]})
        sink.write({"__key__": "notext", "wav": (folder / lines[0]["audio"]).read_bytes()})
    with pytest.raises(DataError, match=r"shard-000.tar, key notext: shard sample needs audio .* and a transcript"):
        WhisperASRDataModule(train=str(folder / "train.jsonl"), val=str(tmp_path / "shard-000.tar")).setup()
    with wds.TarWriter(str(tmp_path / "good-000.tar")) as sink:
        for i, item in enumerate(lines):
            sink.write({"__key__": f"u{i}", "wav": (folder / item["audio"]).read_bytes(), "txt": item["text"]})
    shards = WhisperASRDataModule(train=str(folder / "train.jsonl"), val=str(tmp_path / "good-000.tar"))
    shards.setup()
    features, ids, labels = shards.val_set[2]
    assert features.shape == (80, 200) and shards.val_set.items[2].text == lines[2]["text"]


def _tones(dm: WhisperASRDataModule, n: int = 4) -> tuple[Path, list[dict]]:
    folder = Path(dm.synthetic_data()[0]).parent
    return folder, [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()[:n]]


def test_a_wav_cut_short_of_its_header_is_an_error_or_a_counted_skip(dm, tmp_path, caplog):
    folder, lines = _tones(dm)
    whole = (folder / lines[0]["audio"]).read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])  # libsndfile reads it as a shorter clip
    rows = [{"audio": str(folder / item["audio"]), "text": item["text"]} for item in lines]
    rows.append({"audio": "cut.wav", "text": lines[0]["text"]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"cut.wav: truncated audio: 0\.\d+ s of the \d\.\d+ s its header declares"):
        WhisperASRDataModule(train=str(manifest), val=str(manifest)).setup()
    skipping = WhisperASRDataModule(train=str(manifest), val=str(manifest), skip_bad=True)
    with caplog.at_level("WARNING"):
        skipping.setup()
    assert "skipped 1 unreadable audio clip(s)" in caplog.text and "cut.wav" in caplog.text
    assert len(skipping.train_items) == len(skipping.val_set) == len(lines)  # train and val: the same manifest
    # Without the header pass, the clip stops the run when it is loaded.
    with pytest.raises(DataError, match=r"cut.wav: truncated audio"):  # cached features: met while caching
        WhisperASRDataModule(train=str(manifest), val=str(manifest), verify=False, val_fraction=0.0).setup()
    unchecked = WhisperASRDataModule(train=str(manifest), val=str(manifest), verify=False, val_fraction=0.0,
                                     cache_features=False)
    unchecked.setup()
    index = next(i for i, u in enumerate(unchecked.val_set.items) if u.audio.describe().endswith("cut.wav"))
    with pytest.raises(DataError, match=r"cut.wav: truncated audio"):
        unchecked.val_set[index]


def test_an_empty_transcript_names_its_file_and_line(dm, tmp_path):
    folder, lines = _tones(dm, 3)
    rows = [{"audio": str(folder / item["audio"]), "text": item["text"]} for item in lines]
    rows[2]["text"] = "  "
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"m.jsonl, line 3: empty transcript"):
        WhisperASRDataModule(train=str(manifest), val=str(manifest)).setup()


def test_cached_log_mel_features_equal_computed_ones_and_are_computed_once(dm, tmp_path, monkeypatch):
    folder, lines = _tones(dm, 6)
    rows = [{"audio": str(folder / item["audio"]), "text": item["text"]} for item in lines]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = dict(train=str(manifest), val=str(manifest), cache_dir=str(tmp_path / "cache"))
    plain = WhisperASRDataModule(**options, cache_features=False)
    plain.setup()
    cached = WhisperASRDataModule(**options)
    cached.setup()
    assert cached.train_set.features is not None and plain.train_set.features is None
    computed = [plain.train_set[i][0] for i in range(len(rows))]
    assert all(torch.equal(cached.train_set[i][0], computed[i]) for i in range(len(rows)))
    calls = []
    monkeypatch.setattr(WhisperASRDataModule, "features_of", lambda self, item: calls.append(item) or 1 / 0)
    again = WhisperASRDataModule(**options)
    again.setup()  # the same clips and settings: read back, nothing decoded
    assert not calls and torch.equal(again.train_set[0][0], computed[0])
    other = WhisperASRDataModule(**options, num_mel_bins=40)  # another setting: another cache, computed
    with pytest.raises(ZeroDivisionError):
        other.setup()
    monkeypatch.undo()
    (tmp_path / "moved.wav").write_bytes((folder / lines[0]["audio"]).read_bytes())
    rows[0]["audio"] = str(tmp_path / "moved.wav")
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    changed = WhisperASRDataModule(**options)
    changed.setup()  # another file: another key
    assert changed.train_set.features.path != cached.train_set.features.path
    loader = torch.utils.data.DataLoader(changed.train_set, batch_size=2, num_workers=1,
                                         collate_fn=changed.collate)  # a worker opens its own memory map
    assert next(iter(loader))["input_features"].shape[0] == 2
