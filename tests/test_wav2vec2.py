"""wav2vec2: length buckets, contrastive accuracy by hand, annealing, learning, and an HF-loadable encoder."""

from __future__ import annotations

import json

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.plugins.audio.wav2vec2.data import Wav2Vec2DataModule, length_buckets
from modalforge.plugins.audio.wav2vec2.objective import contrastive_accuracy
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series


def test_length_buckets_group_similar_lengths():
    lengths = [5, 100, 6, 98, 7, 99, 8, 97]
    batches = length_buckets(lengths, batch_size=4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spans) <= 3  # short clips together, long clips together


def test_contrastive_accuracy_by_hand():
    # 1 utterance, 3 frames, 2-d vectors; 2 negatives per frame (indices into the 3 frames)
    quantized = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    projected = torch.tensor([[[0.9, 0.1], [1.0, 0.0], [-1.0, 0.1]]])
    negatives = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    mask = torch.tensor([[True, True, False]])
    # frame 0: true target (1,0) is closest -> hit; frame 1: projected (1,0) prefers negative 0 -> miss
    assert contrastive_accuracy(projected, quantized, negatives, mask).item() == pytest.approx(0.5)


def test_batches_are_padded_with_attention_masks():
    dm = Wav2Vec2DataModule(batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_values"].shape[0] == 4 and batch["input_values"].shape[1] <= 16000
    assert batch["attention_mask"].shape == batch["input_values"].shape


def test_bad_audio_in_a_manifest_names_the_file(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "bad.wav"}) + "\n")
    with pytest.raises(DataError, match=r"bad.wav: unreadable audio"):
        Wav2Vec2DataModule(train=str(manifest), val=str(manifest)).setup()


def test_conforms(tmp_path):
    assert_plugin_conforms("wav2vec2", tmp_path, ["optim.warmup_steps=0", "optim.lr=3e-3"], steps=12,
                           loss_window=4)


def test_offline_default_learns_and_saves_a_loadable_encoder(tmp_path):
    cfg = compose(["plugin=wav2vec2", *FAST, "trainer.max_steps=150", "trainer.val_check_interval=150",
                   "callbacks=none"])
    run(cfg, tmp_path)
    accuracy = series(tmp_path, "val/contrastive_acc")
    assert accuracy[max(accuracy)] > 3 / 11, accuracy  # chance is 1/11 with 10 negatives
    temperatures = series(tmp_path, "train/gumbel_temperature")
    assert temperatures[max(temperatures)] < temperatures[min(temperatures)]
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Model

    encoder = Wav2Vec2Model.from_pretrained(tmp_path / "final")
    assert encoder(torch.randn(1, 8000)).last_hidden_state.shape[-1] == 64
    ctc = Wav2Vec2ForCTC.from_pretrained(tmp_path / "final", vocab_size=12)
    assert ctc(torch.randn(1, 8000)).logits.shape[-1] == 12
