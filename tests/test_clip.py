"""clip: open_clip loss wiring, data sources, tower locking, LoRA, SigLIP, and learning on the demo set."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.plugins.vision.clip.data import CLIPDataModule
from modalforge.plugins.vision.clip.objective import CLIPObjective, recall_at_k
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series

FAST_FIT = ["data.batch_size=32", "optim.warmup_steps=0"]


def test_loss_is_the_symmetric_infonce_of_the_paper():
    """open_clip's ClipLoss as wired here equals CLIP's formula computed by hand."""
    objective = CLIPObjective(model={})
    objective.model = torch.nn.Module()
    objective.model.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = torch.exp(torch.tensor(2.0)) * image @ text.T
    by_hand = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(objective._contrastive(image, text), by_hand)


def test_recall_counts_identical_captions_as_hits():
    similarity = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.3, 0.9], [0.1, 0.9, 0.2]])
    groups = torch.tensor([0, 1, 0])  # captions 0 and 2 are the same text
    # top-1: query 0 -> 0 (hit), query 1 -> 2 (miss), query 2 -> 1 (miss)
    assert recall_at_k(similarity, groups, groups, 1) == pytest.approx(1 / 3)
    # top-2: query 2 now also retrieves caption 2, the same text as its own: a hit
    assert recall_at_k(similarity, groups, groups, 2) == pytest.approx(1.0)


def test_demo_datamodule_works_alone():
    dm = CLIPDataModule(batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["texts"].shape == (4, 16)
    assert dm.classnames == sorted(["circle", "square", "triangle", "cross", "ring", "bar"])


def test_shards_and_streaming(tmp_path):
    import webdataset as wds

    dm = CLIPDataModule()
    shapes = dm._synthetic()
    lines = [json.loads(l) for l in (shapes / "train.jsonl").read_text().splitlines()[:48]]
    for s in range(4):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as sink:
            for i, item in enumerate(lines[s * 12:(s + 1) * 12]):
                sink.write({"__key__": f"{s}-{i}", "png": (shapes / item["image"]).read_bytes(),
                            "txt": item["caption"]})
    stream = CLIPDataModule(train=str(tmp_path / "shard-{000..003}.tar"), val=str(shapes / "val.jsonl"),
                            streaming=True, batch_size=8, num_workers=2)
    stream.setup()
    batches = list(stream.train_dataloader())
    assert len(batches) == 6 and batches[0]["images"].shape == (8, 3, 32, 32)  # 48 pairs, each read once
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "nocap", "png": (shapes / lines[0]["image"]).read_bytes()})
    with pytest.raises(DataError, match=r"bad.tar, key nocap: shard sample needs an image .* and a caption"):
        CLIPDataModule(train=str(tmp_path / "bad.tar"), val=str(shapes / "val.jsonl")).setup()


SHAPES = ["circle", "square", "triangle", "cross", "ring", "bar"]


def _integer_manifest(tmp_path, n=24, label=lambda shape: SHAPES.index(shape)):
    """The first ``n`` demo validation pairs with their shape written as an integer label."""
    shapes = CLIPDataModule()._synthetic()
    lines = [json.loads(l) for l in (shapes / "val.jsonl").read_text().splitlines()[:n]]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"image": str(shapes / item["image"]), "caption": item["caption"],
                                        "label": label(item["label"])}) + "\n" for item in lines))
    return path, [item["label"] for item in lines]


def test_integer_labels_with_classnames_map_by_index_and_keep_zeroshot(tmp_path):
    """Integer labels + data.classnames: label i is the i-th name, and zero-shot accuracy is measured with it."""
    path, shapes = _integer_manifest(tmp_path)
    dm = CLIPDataModule(train=str(path), val=str(path), classnames=SHAPES, batch_size=8)
    dm.setup()
    assert dm.val_set.labels == [SHAPES.index(s) for s in shapes]
    objective = CLIPObjective(model=compose(["plugin=clip"]).model)
    objective.connect(dm)
    objective.configure_model()
    prompts = []
    tokenizer = dm.processor
    dm.processor = lambda texts: (prompts.extend(texts), tokenizer(texts))[1]
    for batch in dm.val_dataloader():
        objective.validation_step(batch)
    metrics = objective.validation_epoch_metrics()
    assert 0.0 <= float(metrics["zeroshot_acc"]) <= 1.0
    assert "a photo of a circle." in prompts and not any("a photo of a 0." in p for p in prompts)
    # string labels that are the names match by name, whatever the order of data.classnames
    named, _ = _integer_manifest(tmp_path, label=lambda shape: shape)
    dm = CLIPDataModule(train=str(named), val=str(named), classnames=SHAPES[::-1])
    dm.setup()
    assert dm.val_set.labels == [SHAPES[::-1].index(s) for s in shapes]


def test_labels_that_match_no_class_name_are_an_error(tmp_path):
    path, _ = _integer_manifest(tmp_path)
    with pytest.raises(DataError, match=r"val.jsonl, line \d+: label='[45]' matches no name in data.classnames "
                                         r"\(4 names: .*\) and is not an index into them \(0..3\)"):
        CLIPDataModule(train=str(path), val=str(path), classnames=SHAPES[:4]).setup()
    named, _ = _integer_manifest(tmp_path, label=lambda shape: shape)
    with pytest.raises(DataError, match=r"val.jsonl, line \d+: label='(cross|ring|bar)' matches no name"):
        CLIPDataModule(train=str(named), val=str(named), classnames=["circle", "square", "triangle"]).setup()
    with pytest.raises(DataError, match=r"data.classnames is set but no validation record has a label"):
        CLIPDataModule(train=str(named), val=str(named), classnames=SHAPES, label_field="cls").setup()
    with pytest.raises(DataError, match=r"data.templates: 'a photo' needs exactly one"):
        CLIPDataModule(train=str(named), val=str(named), templates=["a photo"]).setup()


def test_bare_number_class_names_warn(tmp_path, caplog):
    path, shapes = _integer_manifest(tmp_path)
    dm = CLIPDataModule(train=str(path), val=str(path))
    with caplog.at_level("WARNING"):
        dm.setup()
    assert "validation labels are bare numbers" in caplog.text and "data.classnames=[" in caplog.text
    assert dm.classnames == [str(i) for i in range(6)]
    assert dm.val_set.labels == [SHAPES.index(s) for s in shapes]


def test_conforms(tmp_path):
    assert_plugin_conforms("clip", tmp_path, FAST_FIT, steps=10)


def test_siglip_conforms(tmp_path):
    report = assert_plugin_conforms("clip", tmp_path, [*FAST_FIT, "objective.loss=siglip"], steps=10)
    assert "objective.model.logit_bias" in report.changed


def test_lit_locks_the_image_tower(tmp_path):
    report = assert_plugin_conforms("clip", tmp_path, [*FAST_FIT, "objective.lock_image=true"], steps=10)
    assert report.changed and not any(".visual." in n for n in report.changed)


def test_lora_on_the_text_tower_only(tmp_path):
    report = assert_plugin_conforms("clip", tmp_path, [*FAST_FIT, "adapter=lora", "optim.lr=1e-2",
                                                       "adapter.target_modules='^transformer.*(c_fc|c_proj)$'"],
                                    steps=10)
    assert report.changed and all("lora_" in n and ".visual." not in n for n in report.changed)


def test_offline_default_retrieval_rises_far_above_chance(tmp_path):
    cfg = compose(["plugin=clip", *FAST, "trainer.max_steps=150", "trainer.val_check_interval=150",
                   "callbacks=none"])
    run(cfg, tmp_path)
    recall = series(tmp_path, "val/recall@1")
    # 360 validation pairs with ~144 distinct captions: chance recall@1 is about 1%
    assert recall[max(recall)] > 0.1, recall
    assert (tmp_path / "final" / "open_clip_model.safetensors").exists()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_final_loads_with_open_clips_own_loader(tmp_path, loss):
    import open_clip
    from safetensors.torch import load_file

    cfg = compose(["plugin=clip", *FAST, "trainer.max_steps=2", "trainer.limit_val_batches=0", "callbacks=none",
                   "data.batch_size=8", f"objective.loss={loss}", f"run_dir={tmp_path}"])
    _, module, _ = run(cfg, tmp_path)
    final = tmp_path / "final"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{final}")
    saved = load_file(str(final / "open_clip_model.safetensors"))
    loaded = model.state_dict()
    assert set(saved) == set(loaded)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(0, 1000, (2, 16))
    ours = module.objective.model.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), ours.encode_image(images), atol=1e-6)
        assert torch.allclose(model.encode_text(text), ours.encode_text(text), atol=1e-6)
    resize = next(t for t in preprocess.transforms if type(t).__name__ == "Resize")
    assert resize.size in (32, [32], (32, 32))
