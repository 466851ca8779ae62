"""vlm on InternVL (``model=vlm/internvl``): its tiny twin trains, exports, generates and packs exactly.

As ``tests/test_vlm_families.py`` does for the other families: the twin is built from a shrunk
``InternVLConfig`` with ``InternVLProcessor`` (tiled ``GotOcr2ImageProcessor``) and InternVL3-hf's chat
template around a BPE trained on the data, and ``final/`` is reloaded the hub way
(``AutoModelForImageTextToText`` + ``AutoProcessor``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.losses import token_loss
from modalforge.run import run
from modalforge.text.tokenize import IGNORE
from vlm_helpers import family_overrides, setup_components, write_colour_manifest

NAME = "internvl"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Squares of two colours (two sizes: one tile for 32x32, two tiles and a thumbnail for 48x32)."""
    return write_colour_manifest(tmp_path_factory.mktemp("colours"))


def _overrides(manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    return family_overrides(NAME, manifest, run_dir, *extra)


_setup = setup_components


def test_internvl_twin_learns_exports_and_generates_like_its_processor(manifest, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = compose(_overrides(manifest, tmp_path, "trainer.max_steps=48", "trainer.val_check_interval=48",
                             "optim.lr=3e-3", "optim.warmup_steps=2", "optim.scheduler=constant",
                             "data.num_eval_questions=8"))
    trainer, module, dm = run(cfg, tmp_path)
    rows = [line.split(",") for line in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()]
    column = lambda key: [float(r[rows[0].index(key)]) for r in rows[1:] if r[rows[0].index(key)]]  # noqa: E731
    losses, accs = column("train/loss"), column("val/acc")
    assert losses[-1] < 0.5 * losses[0], losses
    assert accs[-1] >= 0.75, accs  # which colour: chance is 1/2
    final = tmp_path / "final"
    model = AutoModelForImageTextToText.from_pretrained(str(final)).eval()
    processor = AutoProcessor.from_pretrained(str(final))
    assert type(model).__name__ == type(module.objective.model).__name__ == "InternVLForConditionalGeneration"
    assert type(processor).__name__ == "InternVLProcessor"
    for question in (dm.questions[0], dm.questions[2]):  # a one-tile and a three-tile image
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[Image.open(question.images[0].path)], text=[prompt], return_tensors="pt",
                           add_special_tokens=False)
        assert inputs["input_ids"][0].tolist() == question.input_ids  # the tokens the DataModule trained on
        assert torch.equal(inputs["pixel_values"], dm.generation_inputs(question)["pixel_values"])
        for key, values in question.extra.items():
            assert inputs[key][0].tolist() == values
    assert len(dm.questions[0].input_ids) != len(dm.questions[2].input_ids)  # the tiles count
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # the hub path: model.name_or_path=<folder> loads the model and its processor, the same tokens and weights
    dm2, objective2 = _setup([o for o in _overrides(manifest, tmp_path / "again") if "name_or_path" not in o]
                             + [f"model.name_or_path={final}", "model.image_processor=null"])  # the twin's sizes
    assert dm2.tokenizer.chat_template == dm.tokenizer.chat_template
    assert dm2.questions[0].input_ids == dm.questions[0].input_ids and dm2.questions[0].extra == dm.questions[0].extra
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in objective2.model.named_parameters() if n in weights)


def test_internvl_packed_rows_give_the_unpacked_loss(manifest, tmp_path):
    """PACKING=True is earned: packed rows (position ids restarting per sample) give the unpacked loss."""
    base = _overrides(manifest, tmp_path, "data.max_length=400")
    dm, objective = _setup([*base, "data.packing=false"])
    dm_packed, _ = _setup([*base, "data.packing=true"])
    model = objective.model.eval()
    every = lambda d: d.collate([d.train_set[i] for i in range(len(d.train_set))])  # noqa: E731 - all examples
    unpacked, packed = every(dm), every(dm_packed)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # rows really hold several samples
    assert packed["pixel_values"].shape == unpacked["pixel_values"].shape  # every tile, in its sample's row order

    def loss(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            out = token_loss(model, batch["labels"], impl="dense", **inputs)
        return out.loss, out.count

    (ours, count), (reference, count_ref) = loss(packed), loss(unpacked)
    assert count == count_ref == int((unpacked["labels"][:, 1:] != IGNORE).sum())
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)
    # the test can fail: without the restarting position ids the packed samples see each other
    naive, _ = loss({k: v for k, v in packed.items() if k != "position_ids"})
    assert (naive - reference).abs() > 1e-3, (naive, reference)


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_internvl_adapters_train_the_lm_and_the_projector_and_freeze_the_vit(adapter, manifest, tmp_path):
    overrides = _overrides(manifest, tmp_path, f"adapter={adapter}", "trainer.max_steps=4",
                           "trainer.val_check_interval=4", "data.num_eval_questions=1")
    _, objective = _setup(overrides)
    trainable = {n for n, p in objective.model.named_parameters() if p.requires_grad}
    assert any("language_model" in n and "lora_" in n for n in trainable)
    assert any(".multi_modal_projector.modules_to_save." in n for n in trainable)  # the projector trains in full
    assert not any(".vision_tower." in n for n in trainable)  # the preset's frozen InternViT
    if adapter == "qlora":  # every width a multiple of 64: the tower's layers quantise too
        import bitsandbytes as bnb

        from modalforge.plugins.multimodal.vlm.parts import vlm_parts

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in vlm_parts(objective.model).tower.modules())
    trainer, module, dm = run(compose(overrides), tmp_path)
    assert trainer.global_step == 4 and (tmp_path / "final" / "config.json").is_file()  # a from-config base: merged


def test_internvl_two_image_record_is_expanded_as_the_processor_expands_the_whole_prompt(manifest, tmp_path):
    """One processor call per sample: both images' tiles, in order, as the exported processor gives them."""
    from PIL import Image

    root = manifest.parent
    record = {"images": [str(root / "0.png"), str(root / "2.png")], "messages": [
        {"role": "user", "content": "<image><image>Which is red?"}, {"role": "assistant", "content": "first"}]}
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps(record) + "\n")
    dm, _ = _setup([*_overrides(two, tmp_path / "run", "data.packing=false"), f"data.train={two}", f"data.val={two}"])
    processor, question = dm.processor, dm.questions[0]
    images = [Image.open(root / "0.png").convert("RGB"), Image.open(root / "2.png").convert("RGB")]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Which is red?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = processor(text=[prompt], images=[images], return_tensors="pt", add_special_tokens=False)
    assert question.input_ids == expected["input_ids"][0].tolist()
    inputs = dm.generation_inputs(question)
    for key, value in expected.items():
        if key not in ("input_ids", "attention_mask"):
            assert torch.equal(inputs[key], value), key
