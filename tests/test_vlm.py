"""vlm: record formats, image-token bookkeeping, bad inputs, packing, assembly from parts, export, learning."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.data.readers import Record
from modalforge.errors import ModalforgeError
from modalforge.plugins.multimodal.vlm.data import VLMDataModule, load_image
from modalforge.plugins.multimodal.vlm.formats import parse_record
from modalforge.text.answers import normalise_answer
from modalforge.text.tokenize import IGNORE
from modalforge.run import build_components, build_module, run
from modalforge.testing import assert_plugin_conforms, check_config_binds

pytest.importorskip("open_clip")

IMG = "<image>"
NO_WARMSTART = "model.warmstart=null"  # a random tower: tests do not pretrain it (the warm start has its own test)
FAST = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=csv"]


def _png(path: Path, colour=(200, 30, 30), size: int = 32) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def _chat(images: list[str], question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [*({"type": "image"} for _ in images),
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}], "images": images}


def _manifest(folder: Path, records: list[dict], name: str = "data.jsonl") -> str:
    path = folder / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A manifest of 24 one- and two-image chats about plain red / blue squares."""
    folder = tmp_path_factory.mktemp("vlm-small")
    _png(folder / "red.png", (200, 30, 30))
    _png(folder / "blue.png", (30, 30, 200), size=48)  # another size: resized by the processor
    records = []
    for i in range(24):
        colour = ("red", "blue")[i % 2]
        if i % 3 == 2:
            records.append(_chat(["red.png", "blue.png"], "Which one is red?", "the first."))
        else:
            records.append(_chat([f"{colour}.png"], "What colour is it?", colour))
    return folder, _manifest(folder, records)


@pytest.fixture(scope="module")
def small_dm(small) -> VLMDataModule:
    folder, manifest = small
    dm = VLMDataModule(train=manifest, val=manifest, batch_size=4, vocab_size=300, max_length=200)
    dm.setup()
    return dm


def rec(data: dict, source: str = "chats.jsonl", line: int = 3) -> Record:
    return Record(data, source, f"line {line}")


# ---- formats ---------------------------------------------------------------------------------
def test_every_format_becomes_placeholders_and_images(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    src = str(tmp_path / "m.jsonl")
    trl = parse_record(rec(_chat(["a.png", "b.png"], "Same?", "no"), src), None, IMG)
    assert trl.messages[0]["content"] == f"{IMG}{IMG}Same?" and [r.path for r in trl.images] == [str(a), str(b)]
    data_url = "data:image/png;base64," + base64.b64encode(a.read_bytes()).decode()
    openai = parse_record(rec({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                     {"type": "image_url", "image_url": {"url": data_url}},
                                     {"type": "image_url", "image_url": {"url": "b.png"}}]},
        {"role": "assistant", "content": "ok"}]}, src), None, IMG)
    assert openai.messages[0]["content"] == f"Look: {IMG}{IMG}"
    assert openai.images[0].data == a.read_bytes() and openai.images[1].path == str(b)
    llava = parse_record(rec({"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]}, src), None, IMG)
    assert llava.messages == [{"role": "user", "content": f"{IMG}\nDescribe."},
                              {"role": "assistant", "content": "A square."}]
    obelics = parse_record(rec({"texts": ["Intro.", None, "Then.", None], "images": [None, "a.png", None, "b.png"]},
                               src), None, IMG)
    assert obelics.text == f"Intro. {IMG} Then. {IMG}" and not obelics.is_chat
    mmc4 = parse_record(rec({"text_list": ["One.", "Two."], "image_info": [
        {"image_name": "b.png", "matched_text_index": 1}]}, src), None, IMG)
    assert mmc4.text == f"One. {IMG} Two." and mmc4.images[0].path == str(b)
    caption = parse_record(rec({"image": "a.png", "caption": "a red square"}, src), None, IMG)
    assert caption.text == f"{IMG}a red square"


def test_webdataset_shards_with_several_images(tmp_path):
    shard = tmp_path / "shard-000.tar"
    png = _png(tmp_path / "x.png").read_bytes()
    with tarfile.open(shard, "w") as tar:
        for name, payload in [("s1.json", json.dumps(_chat(["0.png", "1.png"], "Same?", "yes")).encode()),
                              ("s1.0.png", png), ("s1.1.png", png), ("s2.jpg", png), ("s2.txt", b"a caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    from modalforge.data.readers import read_records

    samples = [parse_record(r, None, IMG) for r in read_records(str(shard))]
    assert samples[0].messages[0]["content"] == f"{IMG}{IMG}Same?" and all(i.data == png for i in samples[0].images)
    assert samples[1].text == f"{IMG}a caption" and samples[1].images[0].data == png


def test_image_tokens_expand_once_and_are_never_learned(small_dm):
    dm = small_dm
    assert dm.image_tokens == 64  # (32 / 4) ** 2, the CLS token dropped
    image_id = dm.processor.image_token_id
    two = next(e for row in dm.train_set.rows for e in row if len(e.images) == 2)
    ids, labels = torch.tensor(two.input_ids), torch.tensor(two.labels)
    assert int((ids == image_id).sum()) == 128
    assert bool((labels[ids == image_id] == IGNORE).all())
    learned = dm.tokenizer.decode([t for t, l in zip(two.input_ids, two.labels) if l != IGNORE])
    assert learned.startswith("the first.") and "Which" not in learned  # assistant tokens only
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[1:] == (3, 32, 32)
    assert int((batch["input_ids"] == image_id).sum()) == 64 * batch["pixel_values"].shape[0]


def test_exact_match_normalisation():
    assert normalise_answer("  The first. ") == normalise_answer("the first") == "the first"
    assert normalise_answer("3.5") == "3.5"


def test_held_out_captions_prompt_with_the_image_and_score_bleu_and_rouge_l(small, tmp_path):
    from modalforge.plugins.multimodal.vlm.data import CAPTION
    from modalforge.plugins.multimodal.vlm.objective import VLMObjective

    folder, manifest = small
    captions = [{"image": "red.png", "caption": "a red square on grey"},
                {"image": "blue.png", "caption": "a big blue square on grey"}]
    val = _manifest(folder, [json.loads(line) for line in Path(manifest).read_text().splitlines()][:4] + captions,
                    "val_captions.jsonl")
    dm = VLMDataModule(train=manifest, val=val, vocab_size=300, num_eval_captions=8)
    dm.setup()
    assert [c.answer for c in dm.captions] == [c["caption"] for c in captions] and len(dm.questions) == 4
    trained = dm.tokenize(dm.parse(rec(captions[0], val)))  # the prompt is how the caption record begins
    prompt = dm.captions[0]
    assert trained.input_ids[:len(prompt.input_ids)] == prompt.input_ids and prompt.question == CAPTION
    assert prompt.input_ids.count(dm.processor.image_token_id) == dm.image_tokens
    assert CAPTION in {q.question for q in dm.sample_inputs(3)}
    objective = VLMObjective()
    objective.datamodule = dm
    dm.questions = []
    objective.answer = lambda items, limit: ["a red square on grey", "a blue square on grey"]  # the metric only
    metrics = objective.validation_epoch_metrics()
    # ROUGE-L F by hand: the second caption's LCS "a blue square on grey" = 5 of 5 predicted, 5 of 6 reference words
    p_r = (1.0, 5 / 6)
    assert float(metrics["caption_rougeL"]) == pytest.approx((1.0 + 2 * p_r[0] * p_r[1] / sum(p_r)) / 2, abs=1e-4)
    assert 0.3 < float(metrics["caption_bleu"]) < 1.0
    objective.answer = lambda items, limit: [c.answer for c in items]
    assert float(objective.validation_epoch_metrics()["caption_bleu"]) == pytest.approx(1.0)


# ---- bad inputs ------------------------------------------------------------------------------
def test_bad_records_name_the_record(tmp_path):
    _png(tmp_path / "a.png")
    src = str(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match=r"m.jsonl, line 3: 2 image placeholder\(s\) \(<image>\) but 1 image"):
        parse_record(rec(_chat(["a.png", "a.png"], "x", "y") | {"images": ["a.png"]}, src), None, IMG)
    with pytest.raises(DataError, match=r"m.jsonl, line 3: image file not found: .*missing.png"):
        parse_record(rec(_chat(["missing.png"], "x", "y"), src), None, IMG)
    with pytest.raises(DataError, match="m.jsonl, line 3: the conversation has no assistant message"):
        parse_record(rec({"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["a.png"]}, src),
                     None, IMG)
    with pytest.raises(DataError, match="m.jsonl, line 3: record fits none of the formats"):
        parse_record(rec({"question": "x"}, src), None, IMG)


def test_too_long_and_unreadable_images_name_the_record_and_file(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    manifest = _manifest(tmp_path, [_chat(["a.png"], "What?", "red"), _chat(["a.png"] * 3, "What?", "red")])
    dm = VLMDataModule(train=manifest, val=manifest, max_length=150, vocab_size=300)
    with pytest.raises(DataError, match=r"data.jsonl, line 2: \d+ tokens once its 3 image\(s\) expand to 64 tokens "
                                        r"each, longer than data.max_length=150"):
        dm.setup()
    manifest = _manifest(tmp_path, [_chat(["broken.png"], "What?", "red")] * 2, "broken.jsonl")
    dm = VLMDataModule(train=manifest, val=manifest, vocab_size=300, batch_size=1)
    dm.setup()
    with pytest.raises(DataError, match=r"broken.jsonl, line 1: image .*broken.png: unreadable image"):
        next(iter(dm.train_dataloader()))


def test_tower_and_data_disagreeing_on_image_tokens_is_named(small):
    _, manifest = small
    cfg = compose(["plugin=vlm", NO_WARMSTART, f"data.train={manifest}", f"data.val={manifest}", "data.patch_size=4",
                   "data.vocab_size=300"])
    dm, objective, adapter = build_components(cfg)
    dm.setup()
    objective.connect(dm)
    with pytest.raises(ModalforgeError, match="expands each image to 65 image tokens .* vision tower produces 17"):
        objective.configure_model()


# ---- packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["position_ids", "dense"])
def test_packed_loss_equals_unpacked_and_images_land_on_their_sample(small_dm, attention):
    from modalforge.plugins.multimodal.vlm.model import build_vlm
    from modalforge.plugins.text.sft.objective import token_loss_and_accuracy

    dm = small_dm
    torch.manual_seed(0)
    model = build_vlm(vision={"layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
                      text={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "num_key_value_heads": 1},
                      vision_feature_layer=-1, **dm.model_hints()).eval()
    examples = [e for row in dm.train_set.rows for e in row][:5]
    images = [[load_image(r, e) for r in e.images] for e in examples]
    dm.packing, dm.packing_attention = True, attention
    packed = dm.collate([(examples, [i for group in images for i in group])])
    dm.packing = False
    unpacked = dm.collate([([e], group) for e, group in zip(examples, images)])
    dm.packing, dm.packing_attention = True, "position_ids"
    assert packed["input_ids"].shape[0] == 1 and unpacked["input_ids"].shape[0] == 5
    assert ("attention_mask" in packed) == (attention == "dense")  # position_ids: no L x L mask at all
    keys = [k for k in ("input_ids", "pixel_values", "attention_mask", "position_ids") if k in packed]
    with torch.no_grad():
        logits_p = model(**{k: packed[k] for k in keys}, use_cache=False).logits  # as the Objective calls it
        logits_u = model(input_ids=unpacked["input_ids"], pixel_values=unpacked["pixel_values"],
                         attention_mask=unpacked["attention_mask"]).logits
    loss_p, _, n_p = token_loss_and_accuracy(logits_p, packed["labels"])
    loss_u, _, n_u = token_loss_and_accuracy(logits_u, unpacked["labels"])
    assert n_p == n_u and abs(float(loss_p) - float(loss_u)) < 1e-5
    # every image's projected features sit on its own sample's image tokens, in order
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**{k: packed[k] for k in keys}, use_cache=False)
    handle.remove()
    image_id, start = dm.processor.image_token_id, 0
    for example, group in zip(examples, images):
        ids = torch.tensor(example.input_ids)
        own = seen["embeds"][0, start:start + len(example)][ids == image_id]
        if group:
            with torch.no_grad():
                features = model.model.get_image_features(pixel_values=dm.pixel_values(group)).pooler_output
            assert torch.allclose(own, torch.cat(list(features)), atol=1e-6)
        start += len(example)


# ---- parts, recipes, export, learning ---------------------------------------------------------
def _clip_final(folder: Path) -> torch.nn.Module:
    """A clip run's final/ as the clip plugin writes it (open_clip weights + builder arguments)."""
    from safetensors.torch import save_model

    from modalforge.plugins.vision.clip.model import build_clip

    torch.manual_seed(0)
    clip = build_clip(vision={"layers": 2, "width": 64, "head_width": 32, "patch_size": 4}, image_size=32,
                      context_length=16)
    folder.mkdir(parents=True)
    save_model(clip, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"builder": "x", "kwargs": {
        "name": None, "embed_dim": 64, "vision": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
        "text": {"layers": 2, "width": 64, "heads": 2}, "image_size": 32, "context_length": 16}}))
    return clip


def test_assembled_from_a_clip_run_and_an_hf_lm(tmp_path, small):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modalforge.plugins.multimodal.vlm.model import load_vision_tower

    clip = _clip_final(tmp_path / "clip")
    tower = load_vision_tower(str(tmp_path / "clip")).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the converted tower computes what open_clip computes
        ours = tower(pixel_values=pixels).pooler_output @ clip.visual.proj
        assert torch.allclose(ours, clip.visual.eval()(pixels), atol=1e-5)
    _, manifest = small
    dm0 = VLMDataModule(train=manifest, val=manifest, vocab_size=300)
    dm0.setup()
    dm0.tokenizer.save_pretrained(str(tmp_path / "lm"))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(dm0.tokenizer) - 1, hidden_size=48, intermediate_size=96,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).save_pretrained(
        str(tmp_path / "lm"))
    cfg = compose(["plugin=vlm", "experiment=vlm/stage1", "model=vlm/parts", f"model.vision_tower={tmp_path}/clip",
                   f"model.language_model={tmp_path}/lm", f"data.train={manifest}", f"data.val={manifest}",
                   "data.max_length=320"])
    assert not check_config_binds(cfg)
    dm, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    dm.setup()
    objective.connect(dm)
    module.configure_model()
    llava = objective.model
    assert llava.config.vision_config.hidden_size == 64 and llava.config.text_config.hidden_size == 48
    assert torch.equal(llava.model.vision_tower.embeddings.patch_embedding.weight, tower.embeddings.patch_embedding.weight)
    trainable = {n.split(".")[1] for n, p in llava.named_parameters() if p.requires_grad}
    assert trainable == {"multi_modal_projector"}  # stage 1: projector only
    # a LLaVA folder with a tower whose hidden size does not fit its projector: named
    llava.save_pretrained(str(tmp_path / "llava"))
    from modalforge.plugins.multimodal.vlm.model import build_vlm
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=4)).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ModalforgeError, match="hidden size 32 does not match the projector .* takes 64"):
        build_vlm(name_or_path=str(tmp_path / "llava"), vision_tower=str(tmp_path / "other"), image_token_id=1)


def test_stage2_lora_trains_projector_in_full_and_lm_adapters_only(tmp_path, small):
    _, manifest = small
    cfg = compose(["plugin=vlm", NO_WARMSTART, "adapter=lora", "objective.freeze_vision_tower=true", f"data.train={manifest}",
                   f"data.val={manifest}", "data.vocab_size=300",
                   "optim.param_groups=[{modules: [multi_modal_projector], lr: 5.0e-3}]"])
    dm, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    dm.setup()
    objective.connect(dm)
    module.configure_model()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and not any("vision_tower" in n for n in names)
    assert all("lora_" in n or "multi_modal_projector" in n for n in names)
    assert any("language_model" in n and "lora_" in n for n in names)
    from modalforge.optim import build_optimizer

    optimizer = build_optimizer(module.named_parameters(), module.optim_config)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == sorted({5e-3, float(cfg.optim.lr)})
    assert float(cfg.optim.lr) != 5e-3  # the rest keep the run's own learning rate


def test_stage2_lora_exports_a_peft_adapter_that_loads_on_the_base(tmp_path, small):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from modalforge.testing import FAST_OVERRIDES

    _, manifest = small
    data = [f"data.train={manifest}", f"data.val={manifest}", "data.vocab_size=300", "data.batch_size=4"]
    cfg = compose(["plugin=vlm", NO_WARMSTART, *data])  # the base: an untrained tiny LLaVA folder, as a stage 1 run leaves it
    dm, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    dm.setup()
    objective.connect(dm)
    module.configure_model()
    base = module.export(tmp_path / "base")
    cfg2 = compose(["plugin=vlm", "experiment=vlm/stage2", "adapter=lora", f"model.name_or_path={base}", *data,
                    *FAST_OVERRIDES, "trainer.max_steps=4", "optim.lr=1e-2", f"run_dir={tmp_path / 'run'}"])
    trainer, module2, dm2 = run(cfg2, tmp_path / "run")
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(str(base)), str(final)).eval()
    batch = next(iter(dm2.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "position_ids") if k in batch}
    trained = module2.objective.model.eval()
    with torch.no_grad():
        ours, theirs = trained(**inputs, use_cache=False).logits, loaded(**inputs, use_cache=False).logits
        untouched = LlavaForConditionalGeneration.from_pretrained(str(base))(**inputs, use_cache=False).logits
    assert torch.allclose(ours, theirs, atol=1e-5)  # LoRA on the LM and the projector (saved in full) both load
    assert not torch.allclose(theirs, untouched, atol=1e-4)
    projector = loaded.base_model.model.model.multi_modal_projector
    assert hasattr(projector, "modules_to_save")  # trained in full, saved beside the adapter
    assert AutoProcessor.from_pretrained(str(final)).image_token == IMG


def test_conforms(tmp_path):
    # the default path: a (2-step) pretrained tower, frozen
    report = assert_plugin_conforms("vlm", tmp_path, ["data.num_eval_questions=4", "model.warmstart.steps=2",
                                                      "model.warmstart.batch_size=8", f"model.cache_dir={tmp_path}/c"],
                                    steps=6)
    assert not any("vision_tower" in name for name in report.changed)


def test_tower_warm_start_is_built_once_then_reused_and_loaded(tmp_path, monkeypatch):
    from transformers import CLIPVisionModel

    from modalforge.plugins.multimodal.vlm import warmstart
    from modalforge.plugins.multimodal.vlm.model import build_vlm

    vision = {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    calls = []
    train = warmstart.train_tower
    monkeypatch.setattr(warmstart, "train_tower", lambda folder, **kw: (calls.append(kw), train(folder, **kw)))
    settings = {"steps": 3, "lr": 1e-3, "batch_size": 8, "seed": 0}
    first = warmstart.pretrained_tower_dir(vision, 32, cache_dir=str(tmp_path), **settings)
    assert warmstart.pretrained_tower_dir(vision, 32, cache_dir=str(tmp_path), **settings) == first
    assert len(calls) == 1 and (first / "warmstart.json").exists()
    other = warmstart.pretrained_tower_dir(vision, 32, cache_dir=str(tmp_path), **{**settings, "steps": 4})
    assert other != first and len(calls) == 2  # another setting, another tower
    # the default model loads the cached tower's weights (no third build)
    model = build_vlm(vision=vision, text={"model_type": "llama", "hidden_size": 64, "intermediate_size": 64,
                                           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
                      vision_feature_layer=-1, image_token_id=5, vocab_size=16,
                      warmstart={**settings, "freeze": True}, cache_dir=str(tmp_path))
    saved = CLIPVisionModel.from_pretrained(str(first)).state_dict()
    assert len(calls) == 2
    assert all(torch.equal(v, saved[k]) for k, v in model.model.vision_tower.state_dict().items())
    # the config: the warm-started tower is frozen; without a warm start it trains
    assert compose(["plugin=vlm"]).objective.freeze_vision_tower is True
    assert compose(["plugin=vlm", NO_WARMSTART]).objective.freeze_vision_tower is False


def test_tower_pretraining_batches_label_shape_colour_and_count():
    import random

    from modalforge.plugins.multimodal.vlm.warmstart import shape_batch

    pixels, labels = shape_batch(8, 32, random.Random(0))
    assert pixels.shape == (8, 3, 32, 32)
    assert (labels["shape"][:4] >= 0).all() and (labels["shape"][4:] == -100).all()
    assert (labels["count"][:4] == -100).all() and ((labels["count"][4:] >= 0) & (labels["count"][4:] < 4)).all()


def test_learns_and_exports_a_model_plain_transformers_runs(tmp_path, small):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, manifest = small
    cfg = compose(["plugin=vlm", NO_WARMSTART, f"run_dir={tmp_path}", *FAST, f"data.train={manifest}", f"data.val={manifest}",
                   "data.vocab_size=300", "data.batch_size=4", "data.packing=false", "data.num_eval_questions=8",
                   "trainer.max_steps=48", "trainer.val_check_interval=24", "trainer.num_sanity_val_steps=0",
                   "module.num_samples=1", "optim.lr=3e-3", "optim.warmup_steps=5", "optim.scheduler=constant"])
    trainer, module, dm = run(cfg, tmp_path)
    rows = [line.split(",") for line in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()]
    header = rows[0]
    column = lambda name: [float(r[header.index(name)]) for r in rows[1:] if r[header.index(name)]]  # noqa: E731
    losses, accs = column("train/loss"), column("val/acc")
    assert losses[-1] < losses[0] / 2, losses
    assert accs[-1] >= 0.75, accs  # chance: 1/2 per question
    samples = [json.loads(line) for line in (tmp_path / "csv" / "samples.jsonl").read_text().splitlines()]
    assert samples and ".png" in samples[0]["input"] and " -> " in samples[0]["sample"]
    # final/ is a plain transformers LLaVA: load, prompt with an image part, generate the trained answer
    final = tmp_path / "final"
    model = LlavaForConditionalGeneration.from_pretrained(str(final))
    processor = AutoProcessor.from_pretrained(str(final))
    question = next(q for q in dm.questions if len(q.images) == 1)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(question.images[0].path), text=prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == question.input_ids  # the same tokens the DataModule trained on
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert normalise_answer(answer) == normalise_answer(question.answer)
    # stage 2 starts from this folder: its processor (same tokens) and weights, tower frozen, LM trainable
    cfg2 = compose(["plugin=vlm", "experiment=vlm/stage2", f"model.name_or_path={final}", f"data.train={manifest}",
                    f"data.val={manifest}"])
    dm2, objective2, adapter2 = build_components(cfg2)
    module2 = build_module(cfg2, objective2, adapter2)
    dm2.setup()
    objective2.connect(dm2)
    module2.configure_model()
    assert dm2.image_tokens == dm.image_tokens and dm2.questions[0].input_ids == dm.questions[0].input_ids
    trainable = {n.split(".")[1] for n, p in objective2.model.named_parameters() if p.requires_grad}
    assert trainable == {"multi_modal_projector", "language_model"}
    assert torch.equal(objective2.model.model.multi_modal_projector.linear_1.weight,
                       model.model.multi_modal_projector.linear_1.weight)
