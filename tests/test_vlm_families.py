"""vlm on image-text-to-text families beyond LLaVA: each family's tiny twin trains, exports and generates.

The twins (``model=vlm/<family> model.name_or_path=null``) are built from shrunk configs with the family's
own processor class, image processor and chat template around a BPE trained on the data, so the hub
path (``AutoModelForImageTextToText`` + ``AutoProcessor`` from a folder) is what the second half of each
test exercises on the exported ``final/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.losses import token_loss
from modalforge.plugins.multimodal.vlm.families import family
from modalforge.run import run
from modalforge.text.tokenize import IGNORE
from cli_helpers import series
from vlm_helpers import family_overrides, setup_components, write_colour_manifest

FAMILIES = ["qwen2_vl", "gemma3", "idefics3", "llava_onevision", "internvl"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_colour_manifest(tmp_path_factory.mktemp("colours"))


def _overrides(name: str, manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    return family_overrides(name, manifest, run_dir, *extra)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_twin_learns_exports_and_generates_like_its_processor(name, manifest, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # LLaVA-OneVision's published template trains answers after "assistant " but prompts with "assistant\n"
    # (README): its twin trains on chatml, given as data.chat_template, which the exported processor keeps
    template = ["data.chat_template=chatml"] if name == "llava_onevision" else []
    cfg = compose(_overrides(name, manifest, tmp_path, "trainer.max_steps=48", "trainer.val_check_interval=48",
                             "optim.lr=3e-3", "optim.warmup_steps=2", "optim.scheduler=constant",
                             "data.num_eval_questions=8", *template))
    trainer, module, dm = run(cfg, tmp_path)
    column = lambda key: list(series(tmp_path, key).values())  # noqa: E731 - in step order
    losses, accs = column("train/loss"), column("val/acc")
    assert losses[-1] < 0.5 * losses[0], losses
    assert accs[-1] >= 0.75, accs  # which colour: chance is 1/2
    final = tmp_path / "final"
    model = AutoModelForImageTextToText.from_pretrained(str(final)).eval()
    processor = AutoProcessor.from_pretrained(str(final))
    assert type(model).__name__ == type(module.objective.model).__name__
    for question in (dm.questions[2], dm.questions[0]):  # a 48x32 and a 32x32 image (tiles, grids: counts differ)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[Image.open(question.images[0].path)], text=[prompt], return_tensors="pt",
                           add_special_tokens=False)
        assert inputs["input_ids"][0].tolist() == question.input_ids  # the tokens the DataModule trained on
        for key, value in inputs.items():
            if key not in ("input_ids", "attention_mask") and key not in question.extra:
                assert torch.equal(value, dm.generation_inputs(question)[key]), key
        for key, values in question.extra.items():
            assert inputs[key][0].tolist() == values
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    from modalforge.text.stops import end_of_turn_tokens

    ends = model.generation_config.eos_token_id  # plain generate on final/ stops at the template's end of turn
    ends = {ends} if isinstance(ends, int) else set(ends)
    assert {processor.tokenizer.convert_tokens_to_ids(t) for t in end_of_turn_tokens(processor.tokenizer)} <= ends
    # the hub path: model.name_or_path=<folder> loads the model and its processor, the same tokens and weights
    dm2, objective2 = _setup([o for o in _overrides(name, manifest, tmp_path / "again") if "name_or_path" not in o]
                             + [f"model.name_or_path={final}", "model.image_processor=null"])  # the twin's sizes
    assert dm2.tokenizer.chat_template == dm.tokenizer.chat_template
    assert dm2.questions[0].input_ids == question.input_ids and dm2.questions[0].extra == question.extra
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in objective2.model.named_parameters() if n in weights)


_setup = setup_components


def test_qwen2_vl_packed_rows_are_exact_with_per_sample_mrope(manifest, tmp_path):
    from modalforge.plugins.multimodal.vlm.mrope import packed_mrope_positions

    base = _overrides("qwen2_vl", manifest, tmp_path, "data.max_length=400")
    dm, objective = _setup([*base, "data.packing=false"])
    dm_packed, _ = _setup([*base, "data.packing=true"])
    model = objective.model.eval()
    every = lambda d: d.collate([d.train_set[i] for i in range(len(d.train_set))])  # noqa: E731 - all examples
    unpacked, packed = every(dm), every(dm_packed)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # rows really hold several samples

    def loss(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "position_ids" in inputs:
            inputs["position_ids"] = packed_mrope_positions(model, inputs)
        with torch.no_grad():
            out = token_loss(model, batch["labels"], impl="dense", **inputs)
        return out.loss, out.count

    (ours, count), (reference, count_ref) = loss(packed), loss(unpacked)
    assert count == count_ref == int((unpacked["labels"][:, 1:] != IGNORE).sum())
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)
    # 1-D positions instead: the images lose their 2-D rope, and the logits change
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        naive = model(**inputs, use_cache=False).logits
        exact = model(**{**inputs, "position_ids": packed_mrope_positions(model, inputs)}, use_cache=False).logits
    assert (naive - exact).abs().max() > 1e-3


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_qwen2_vl_adapters_train_the_lm_and_the_merger_and_freeze_the_vit(adapter, manifest, tmp_path):
    overrides = _overrides("qwen2_vl", manifest, tmp_path, f"adapter={adapter}", "trainer.max_steps=4",
                           "trainer.val_check_interval=4", "data.num_eval_questions=1")
    _, objective = _setup(overrides)
    trainable = {n for n, p in objective.model.named_parameters() if p.requires_grad}
    assert any("language_model" in n and "lora_" in n for n in trainable)
    assert any(".merger.modules_to_save." in n for n in trainable)  # the projector trains in full
    assert not any(".visual.blocks." in n or "patch_embed" in n for n in trainable)  # the ViT stays frozen
    if adapter == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in objective.model.modules())
    trainer, module, dm = run(compose(overrides), tmp_path)
    assert trainer.global_step == 4 and (tmp_path / "final" / "config.json").is_file()  # a from-config base: merged


def test_a_family_that_cannot_pack_says_so(manifest, tmp_path, monkeypatch):
    from modalforge.data.errors import DataError

    monkeypatch.setattr(family("gemma3"), "PACKING", False)  # as for a family whose packed rows are not exact
    with pytest.raises(DataError, match="data.packing=true is not exact for gemma3"):
        _setup([*_overrides("gemma3", manifest, tmp_path), "data.packing=true"])


@pytest.mark.parametrize("name", [*FAMILIES, "paligemma"])
def test_a_family_twin_passes_the_conformance_suite(name, manifest, tmp_path):
    from modalforge.testing import assert_plugin_conforms

    report = assert_plugin_conforms("vlm", tmp_path, [f"model=vlm/{name}", "model.name_or_path=null",
                                                      f"data.train={manifest}", f"data.val={manifest}",
                                                      f"data.packing={str(family(name).PACKING).lower()}",
                                                      "data.batch_size=4", "data.vocab_size=300",
                                                      "data.num_eval_questions=2"], steps=6)
    tower = {"qwen2_vl": ".visual.blocks."}.get(name, "vision_tower.")
    assert report.changed and not any(tower in n for n in report.changed)  # the preset's frozen tower


@pytest.mark.slow
def test_a_family_twin_under_fsdp2_equals_one_process_and_exports(tmp_path):
    """Qwen2-VL's twin on two processes: packed M-RoPE rows, per-image grids split by rank, a gathered export."""
    from modalforge.testing import assert_plugin_conforms_sharded

    assert_plugin_conforms_sharded("vlm", tmp_path, ["model=vlm/qwen2_vl", "model.name_or_path=null",
                                                     "data.num_eval_questions=2"],
                                   steps=2, resume=False, samples=True, export=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_two_image_record_is_expanded_as_the_processor_expands_the_whole_prompt(name, manifest, tmp_path):
    """One processor call per sample: LLaVA-OneVision drops its any-res patches when a prompt has two images."""
    from PIL import Image

    root = manifest.parent
    record = {"images": [str(root / "0.png"), str(root / "2.png")], "messages": [
        {"role": "user", "content": "<image><image>Which is red?"}, {"role": "assistant", "content": "first"}]}
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps(record) + "\n")
    template = ["data.chat_template=chatml"] if name == "llava_onevision" else []
    dm, _ = _setup([*_overrides(name, two, tmp_path / "run", "data.packing=false"), f"data.train={two}",
                    f"data.val={two}", *template])
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


def test_paligemma_twin_learns_as_a_prefix_lm_and_exports(manifest, tmp_path):
    """PaliGemma: the processor writes each example (prefix bidirectional, suffix learned); no chat template."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = compose(_overrides("paligemma", manifest, tmp_path, "trainer.max_steps=48", "trainer.val_check_interval=48",
                             "optim.lr=3e-3", "optim.warmup_steps=2", "optim.scheduler=constant",
                             "data.num_eval_questions=8"))
    trainer, module, dm = run(cfg, tmp_path)
    column = lambda key: list(series(tmp_path, key).values())  # noqa: E731 - in step order
    assert column("train/loss")[-1] < 0.5 * column("train/loss")[0]
    assert column("val/acc")[-1] >= 0.75, column("val/acc")
    example = dm.train_set[0][0][0]
    assert example.extra["token_type_ids"][-2:] == [1, 1]  # the answer and EOS: the suffix
    assert [t for t, label in zip(example.extra["token_type_ids"], example.labels) if label != IGNORE] == [1, 1]
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "final")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "final"))
    question = dm.questions[0]
    inputs = processor(text=["<image>" + question.question], images=[Image.open(question.images[0].path)],
                       return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == question.input_ids
    assert inputs["token_type_ids"][0].tolist() == question.extra["token_type_ids"]
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() \
        == question.answer


def test_paligemma_refuses_what_a_prefix_lm_cannot_train(manifest, tmp_path):
    from modalforge.data.errors import DataError

    record = {"images": [str(manifest.parent / "0.png")], "messages": [
        {"role": "user", "content": "<image>What colour is it?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}]}
    bad = tmp_path / "turns.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"turns.jsonl, line 1: PaliGemma trains one prompt and one answer"):
        _setup([*_overrides("paligemma", bad, tmp_path / "run"), f"data.train={bad}", f"data.val={bad}"])
    with pytest.raises(DataError, match="data.packing=true is not exact for paligemma"):
        _setup([*_overrides("paligemma", manifest, tmp_path / "run"), "data.packing=true"])


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_paligemma_adapters_train_the_lm_and_the_projector(adapter, manifest, tmp_path):
    overrides = _overrides("paligemma", manifest, tmp_path, f"adapter={adapter}", "trainer.max_steps=4",
                           "trainer.val_check_interval=4", "data.num_eval_questions=1")
    _, objective = _setup(overrides)
    trainable = {n for n, p in objective.model.named_parameters() if p.requires_grad}
    assert any("language_model" in n and "lora_" in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save." in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    trainer, _, _ = run(compose(overrides), tmp_path)
    assert trainer.global_step == 4 and (tmp_path / "final" / "config.json").is_file()


@pytest.mark.parametrize("name", ["gemma3", "idefics3", "llava_onevision"])
def test_qlora_quantises_each_twin_and_trains(name, manifest, tmp_path):
    """bitsandbytes' CPU 4-bit kernels take 64-wide blocks (every twin is that wide); an attention-pooling head's
    out_proj stays in full precision (nn.MultiheadAttention reads its weight itself)."""
    import bitsandbytes as bnb

    template = ["data.chat_template=chatml"] if name == "llava_onevision" else []
    overrides = _overrides(name, manifest, tmp_path, "adapter=qlora", "trainer.max_steps=2",
                           "trainer.val_check_interval=2", "data.num_eval_questions=1", *template)
    trainer, module, _ = run(compose(overrides), tmp_path)
    assert trainer.global_step == 2
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.objective.model.modules())
