"""vlm on InternVL (``model=vlm/internvl``): what is InternVL's own (exact packing, adapters); the family tests
(``tests/test_vlm_families.py``) train, export and compare its twin with the processor as the others'.

The twin is built from a shrunk ``InternVLConfig`` with ``InternVLProcessor`` (tiled
``GotOcr2ImageProcessor``) and InternVL3-hf's chat template around a BPE trained on the data.
"""

from __future__ import annotations

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
