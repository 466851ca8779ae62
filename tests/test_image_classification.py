"""image_classification: readers, bad images, mixing, model builders, and learning on the shapes demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.plugins.vision.image_classification.data import ImageClassificationDataModule
from modalforge.plugins.vision.image_classification.model import build_image_classifier, classifier_heads
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series


# no warmup and the shapes' geometry kept (augment=none): a few steps must already lower the loss
FAST_FIT = ["data.batch_size=32", "optim.warmup_steps=0", "data.augment=none"]


@pytest.fixture(scope="module")
def shapes() -> Path:
    dm = ImageClassificationDataModule()
    dm.prepare_data()
    return Path(dm.synthetic_data()[0]).parent


def test_demo_datamodule_works_alone():
    dm = ImageClassificationDataModule(batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (8, 3, 32, 32) and batch["labels"].shape == (8,)
    assert dm.classes == sorted(["circle", "square", "triangle", "cross", "ring", "bar"])
    assert dm.model_hints() == {"num_classes": 6, "image_size": 32}


def test_image_folder_manifest_and_shards_agree(shapes, tmp_path):
    import webdataset as wds

    folder_dm = ImageClassificationDataModule(train=str(shapes / "train"), val=str(shapes / "val"))
    folder_dm.setup()
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as sink:
        for i, line in enumerate((shapes / "val.jsonl").read_text().splitlines()[:30]):
            item = json.loads(line)
            sink.write({"__key__": f"{i:04d}", "png": (shapes / item["image"]).read_bytes(), "cls": item["label"]})
    shard_dm = ImageClassificationDataModule(train=str(shapes / "train.jsonl"), val=str(tmp_path / "shard-000.tar"))
    shard_dm.setup()
    assert folder_dm.classes == shard_dm.classes
    assert len(folder_dm.train_set) == len(shard_dm.train_set) == 1800 and len(shard_dm.val_set) == 30
    image, label = shard_dm.val_set[3]
    assert image.shape == (3, 32, 32) and 0 <= label < 6


def test_unreadable_image_names_the_file_or_is_skipped_and_counted(shapes, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = (shapes / "train.jsonl").read_text().splitlines()[:12]
    manifest = tmp_path / "m.jsonl"
    rows = [json.dumps({**json.loads(l), "image": str(shapes / json.loads(l)["image"])}) for l in lines]
    rows.append(json.dumps({"image": "broken.png", "label": "circle"}))
    manifest.write_text("\n".join(rows) + "\n")
    checked = ImageClassificationDataModule(train=str(manifest), val=str(manifest))
    with pytest.raises(DataError, match=r"broken.png: unreadable image") as info:
        checked.setup()  # the header pass (data.verify) finds it before training starts
    assert "data.skip_bad=true" in info.value.hint
    dm = ImageClassificationDataModule(train=str(manifest), val=str(manifest), verify=False)
    dm.setup()
    with pytest.raises(DataError, match=r"broken.png: unreadable image"):
        dm.train_set[len(dm.train_set) - 1]
    skipping = ImageClassificationDataModule(train=str(manifest), val=str(manifest), skip_bad=True)
    skipping.setup()
    assert len(skipping.train_set) == 12 and len(skipping.skipped) == 2  # once in train, once in val
    assert skipping.skipped[0].endswith("broken.png")


def test_missing_label_field_and_unknown_val_class(tmp_path, shapes):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl, line 1: missing field 'label'"):
        ImageClassificationDataModule(train=str(manifest)).setup()
    val = tmp_path / "v.jsonl"
    val.write_text(json.dumps({"image": str(shapes / "val/circle/00000.png"), "label": "hexagon"}) + "\n")
    with pytest.raises(DataError, match="'hexagon' does not occur in the training data"):
        ImageClassificationDataModule(train=str(shapes / "train.jsonl"), val=str(val)).setup()


def test_mixup_and_cutmix_give_soft_targets():
    dm = ImageClassificationDataModule(batch_size=8, mixup_alpha=0.4, cutmix_alpha=1.0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["targets"].shape == (8, 6)
    torch.testing.assert_close(batch["targets"].sum(-1), torch.ones(8))


def test_builders_resize_the_head(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = build_image_classifier("resnet18", num_classes=6, weights=str(tmp_path / "r18.pth"))
    assert model.fc.out_features == 6 and torch.equal(model.conv1.weight, reference.conv1.weight)
    assert classifier_heads(model, 6) == ["fc"]
    assert build_image_classifier("timm:resnet18", num_classes=4).get_classifier().out_features == 4
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, num_labels=3)
                              ).save_pretrained(tmp_path / "vit")
    hf = build_image_classifier(f"hf:{tmp_path / 'vit'}", num_classes=6)
    assert hf.classifier.out_features == 6
    assert hf(torch.randn(2, 3, 32, 32)).logits.shape == (2, 6)


def test_conforms(tmp_path):
    assert_plugin_conforms("image_classification", tmp_path, FAST_FIT, steps=12)


def test_linear_probe_trains_only_the_head(tmp_path):
    report = assert_plugin_conforms("image_classification", tmp_path,
                                    [*FAST_FIT, "adapter=freeze", "adapter.trainable=[fc]"], steps=12)
    assert sorted(report.changed) == ["objective.model.fc.bias", "objective.model.fc.weight"]


def test_lora_on_a_vit_trains_adapters_and_the_new_head(tmp_path):
    report = assert_plugin_conforms("image_classification", tmp_path,
                                    [*FAST_FIT, "model=image_classification/vit_custom", "adapter=lora",
                                     "optim.lr=3e-2"], steps=24, loss_window=6)
    assert any("lora_" in n for n in report.changed) and any("heads" in n for n in report.changed)
    assert all("lora_" in n or "heads" in n for n in report.changed)


def test_offline_default_learns_and_saves_a_confusion_matrix(tmp_path):
    cfg = compose(["plugin=image_classification", *FAST, "trainer.max_steps=120", "trainer.val_check_interval=60",
                   "callbacks=none"])
    run(cfg, tmp_path)
    acc = series(tmp_path, "val/acc")
    assert acc[max(acc)] > 0.5, acc  # chance is 1/6
    matrix = (tmp_path / "final" / "confusion_matrix.csv").read_text().splitlines()
    assert matrix[0].startswith("true\\predicted,bar,circle") and len(matrix) == 7
    assert json.loads((tmp_path / "final" / "labels.json").read_text())[0] == "bar"


def test_a_flat_folder_of_images_says_class_sub_folders_are_missing(shapes, tmp_path):
    import shutil

    flat = tmp_path / "photos"
    flat.mkdir()
    for file in sorted((shapes / "train").rglob("*.png"))[:3]:
        shutil.copy(file, flat / f"{file.parent.name}-{file.name}")
    with pytest.raises(DataError, match=r"photos: 3 images found .* but no class sub-folders") as caught:
        ImageClassificationDataModule(train=str(flat)).setup()
    assert "photos/<class>/<image>" in caught.value.hint and ".jsonl" not in str(caught.value)
