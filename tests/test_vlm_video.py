"""vlm video records: files (PyAV) and frame lists, expanded by the family's own processor; the motion demo learns.

Videos go to the families that take them (Qwen2-VL, LLaVA-OneVision) as the model's processor expands
them: the tokens the DataModule trains on are those ``AutoProcessor`` gives for the chat template's
rendering and the same sampled frames. Records that cannot work fail naming the file and line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.losses import token_loss
from modalforge.plugins.multimodal.vlm.motion import QUESTION, draw_clip
from modalforge.run import run
from modalforge.text.tokenize import IGNORE
from cli_helpers import series
from vlm_helpers import FAST, setup_components


def _write_mp4(path: Path, frames: list, fps: int = 4) -> None:
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].size[0], frames[0].size[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Twelve clips as frame lists (two as inline parts) and one as an mp4 file of 16 frames at 8 fps."""
    root = tmp_path_factory.mktemp("clips")
    rng = random.Random(0)
    lines = []
    for n in range(12):
        direction = ("left", "right", "up", "down")[n % 4]
        paths = []
        for t, frame in enumerate(draw_clip(direction, 4, 32, rng)):
            paths.append(f"{n}-{t}.png")
            frame.save(root / paths[-1])
        part = {"type": "video", "video": paths} if n < 2 else {"type": "video"}
        record = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]},
                               {"role": "assistant", "content": direction}]}
        if n >= 2:
            record["videos"] = [paths]
        lines.append(record)
    _write_mp4(root / "clip.mp4", draw_clip("right", 16, 32, rng), fps=8)
    lines.append({"video": "clip.mp4", "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                                                         {"from": "gpt", "value": "right"}]})  # LLaVA-Video's form
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return root / "train.jsonl"


def _overrides(name: str, manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["plugin=vlm", f"model=vlm/{name}", "model.name_or_path=null", f"data.train={manifest}",
            f"data.val={manifest}", "data.vocab_size=300", "data.batch_size=4", "data.packing=false",
            "data.num_eval_questions=13", "data.max_length=256", "data.video_frames=4", f"run_dir={run_dir}",
            *FAST, *extra]


_setup = setup_components


@pytest.mark.parametrize("name", ["qwen2_vl", "llava_onevision"])
def test_video_tokens_are_the_processors_for_frame_lists_and_files(name, clips, tmp_path):
    template = ["data.chat_template=chatml"] if name == "llava_onevision" else []  # as the families test says why
    dm, objective = _setup(_overrides(name, clips, tmp_path, *template))
    processor = dm.processor
    assert len(dm.questions) == 13
    for index, text in ((0, QUESTION), (5, QUESTION), (12, "\n" + QUESTION)):  # inline frames, listed, mp4
        question = dm.questions[index]
        (video,) = question.videos
        frames = dm.read_video(video, question)
        assert len(frames) == 4  # data.video_frames, from the file's 16 frames too
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], videos=[frames], return_tensors="pt", add_special_tokens=False,
                           do_sample_frames=False)
        assert inputs["input_ids"][0].tolist() == question.input_ids
        for key, values in question.extra.items():
            assert inputs[key][0].tolist() == values
    batch = dm.collate([dm.train_set[i] for i in range(3)])
    videos = batch["video_grid_thw"] if "video_grid_thw" in batch else batch["pixel_values_videos"]
    assert videos.shape[0] == 3  # one per record, in order
    assert int((batch["labels"] != IGNORE).sum()) > 0
    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    assert not ((batch["input_ids"] == video_id) & (batch["labels"] != IGNORE)).any()  # video tokens never learned
    model = objective.model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = token_loss(model, batch["labels"], impl="dense", **inputs)
    out.loss.backward()
    vision = [p.grad for n, p in model.named_parameters() if ("visual" in n or "vision_tower" in n or
                                                               "multi_modal_projector" in n) and p.grad is not None]
    assert vision and any(g.abs().sum() > 0 for g in vision)  # the video reached the model


def test_qwen2_vl_packed_video_rows_equal_unpacked(clips, tmp_path):
    from modalforge.plugins.multimodal.vlm.mrope import packed_mrope_positions

    base = _overrides("qwen2_vl", clips, tmp_path, "data.max_length=400")
    dm, objective = _setup(base)
    dm_packed, _ = _setup([*base, "data.packing=true"])
    model = objective.model.eval()
    every = lambda d: d.collate([d.train_set[i] for i in range(len(d.train_set))])  # noqa: E731 - all examples
    unpacked, packed = every(dm), every(dm_packed)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    assert torch.equal(packed["video_grid_thw"], unpacked["video_grid_thw"])

    def loss(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "position_ids" in inputs:
            inputs["position_ids"] = packed_mrope_positions(model, inputs)
        with torch.no_grad():
            return token_loss(model, batch["labels"], impl="dense", **inputs).loss

    assert torch.allclose(loss(packed), loss(unpacked), atol=1e-5)


def test_video_files_are_sampled_by_count_or_by_time(clips, tmp_path):
    dm, _ = _setup(_overrides("qwen2_vl", clips, tmp_path, "data.video_frames=null", "data.video_fps=2"))
    question = dm.questions[12]
    assert question.videos[0].path.endswith("clip.mp4")
    assert len(dm.read_video(question.videos[0], question)) == 4  # 2 s at 2 fps
    assert len(dm.read_video(dm.questions[0].videos[0], dm.questions[0])) == 4  # a frame list: all its frames
    with pytest.raises(Exception, match="video_frames"):
        _setup(_overrides("qwen2_vl", clips, tmp_path, "data.video_fps=2"))


def _manifest(name: str, clips: Path, record: dict) -> Path:
    path = clips.parent / f"bad-{name}.jsonl"  # beside the clips: line 1 is a good record with relative paths
    good = clips.read_text().splitlines()[2]
    path.write_text(good + "\n" + json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize("problem", ["missing", "unreadable", "count", "llava"])
def test_a_bad_video_record_names_its_file_and_line(problem, clips, tmp_path):
    frames = [str(clips.parent / f"0-{t}.png") for t in range(4)]
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "left"}]
    record = {"messages": chat, "videos": [frames]}
    expected = "video"
    if problem == "missing":
        record["videos"] = [str(tmp_path / "gone.mp4")]
        expected = "video file not found: .*gone.mp4"
    elif problem == "unreadable":
        (tmp_path / "cut.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
        record["videos"] = [str(tmp_path / "cut.mp4")]
        expected = "cut.mp4: unreadable video"
    elif problem == "count":
        record["videos"] = [frames, frames]
        expected = "1 video placeholder"
    manifest = _manifest(problem, clips, record)
    name = "tiny" if problem == "llava" else "qwen2_vl"
    overrides = _overrides(name, manifest, tmp_path, f"data.val={manifest}")
    if problem == "llava":
        overrides = [o for o in overrides if not o.startswith("model.name_or_path")]
        expected = "LLaVA takes images only"
    with pytest.raises(DataError, match=expected) as caught:
        _setup(overrides)
    line = 1 if problem == "llava" else 2  # for LLaVA the good record is a video record too
    assert f"bad-{problem}.jsonl, line {line}" in str(caught.value)


def test_the_motion_demo_learns_and_its_export_answers_a_video(tmp_path):
    """experiment=vlm/video: Qwen2-VL's twin tells which way the square moves (chance 1/4), exported."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = compose(["plugin=vlm", "experiment=vlm/video", "trainer.max_steps=400", "trainer.val_check_interval=400",
                   "data.num_eval_questions=32", f"run_dir={tmp_path}", *FAST])
    trainer, module, dm = run(cfg, tmp_path)
    column = lambda key: list(series(tmp_path, key).values())  # noqa: E731 - in step order
    losses, accs = column("train/loss"), column("val/acc")
    assert losses[-1] < 0.5 * losses[0], losses
    assert accs[-1] >= 0.5, accs
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "final")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "final"))
    question = dm.questions[0]
    frames = dm.read_video(question.videos[0], question)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], videos=[frames], return_tensors="pt", add_special_tokens=False,
                       do_sample_frames=False)
    assert inputs["input_ids"][0].tolist() == question.input_ids
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
