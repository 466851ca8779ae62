"""What each reader does with empty values, truncated media, duplicates and mixed types (issue 23, item 8).

Each test pins one promise the docstrings and plugin READMEs make; all read tiny files, offline, no training."""

from __future__ import annotations

import json
import logging
import tarfile

import pytest
from PIL import Image

from modalforge.data.errors import DataError
from modalforge.data.readers import read_records


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def images(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / f"{name}.png")
    return tmp_path


# ---- core readers ------------------------------------------------------------------------
def test_jsonl_keeps_types_and_nulls_per_line(tmp_path):
    spec = _jsonl(tmp_path / "a.jsonl", [{"x": 1}, {"x": "1"}, {"x": None}, {"x": ""}])
    assert [r.data["x"] for r in read_records(spec)] == [1, "1", None, ""]


def test_csv_empty_cell_is_empty_string_and_every_value_text(tmp_path):
    (tmp_path / "a.csv").write_text("id,text\n1,\n2,5\n")
    assert [r.data for r in read_records(str(tmp_path / "a.csv"))] == [{"id": "1", "text": ""},
                                                                       {"id": "2", "text": "5"}]


def test_parquet_null_stays_none(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "a.parquet")
    assert [r.data["text"] for r in read_records(str(tmp_path / "a.parquet"))] == ["a", None]


def test_one_file_named_twice_is_an_error(tmp_path):
    spec = _jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="a.jsonl' is named twice"):
        list(read_records([spec, str(tmp_path / "*.jsonl")]))


def test_cut_tar_shard_is_an_error_naming_it(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i in range(3):
            file = tmp_path / f"{i:03d}.txt"
            file.write_text("x" * 2000)
            tar.add(file, arcname=f"s{i:03d}.txt")
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:3000])
    with pytest.raises(DataError, match="cut.tar: unreadable webdataset shard"):
        list(read_records(str(tmp_path / "cut.tar")))


# ---- text ----------------------------------------------------------------------------
def test_causal_lm_skips_blank_documents_counted(tmp_path, caplog):
    from modalforge.plugins.text.causal_lm.data import CausalLMDataModule

    spec = _jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": "  "}, {"text": "hello"}])
    with caplog.at_level(logging.WARNING):
        assert CausalLMDataModule().read(spec, "data.train") == ["hello"]
    assert "2 blank document(s) skipped" in caplog.text


def test_causal_lm_refuses_a_number_for_text(tmp_path):
    from modalforge.plugins.text.causal_lm.data import CausalLMDataModule

    spec = _jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": 5}])
    with pytest.raises(DataError, match="line 2: field 'text' is int"):
        CausalLMDataModule().read(spec, "data.train")


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
])
def test_sft_refuses_a_blank_assistant_turn(tmp_path, record):
    from modalforge.plugins.text.sft.data import SFTDataModule

    with pytest.raises(DataError, match=r"line 1: messages\[1\] \(assistant\) is empty"):
        SFTDataModule().read(_jsonl(tmp_path / "a.jsonl", [record]), "data.train")


def test_sft_keeps_a_masked_blank_turn_and_counts_repeats(tmp_path, caplog):
    from modalforge.plugins.text.sft.data import SFTDataModule

    masked = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "train": False},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]}
    pair = {"prompt": "q", "completion": "a"}
    with caplog.at_level(logging.WARNING):
        items = SFTDataModule().read(_jsonl(tmp_path / "a.jsonl", [masked, pair, pair]), "data.train")
    assert len(items) == 3 and "1 conversation(s) repeat an earlier one" in caplog.text


def test_sft_refuses_a_number_prompt(tmp_path):
    from modalforge.plugins.text.sft.data import SFTDataModule

    spec = _jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": 5, "completion": "a"}])
    with pytest.raises(DataError, match="line 2: field 'prompt' is int"):
        SFTDataModule().read(spec, "data.train")


def test_oasst_duplicate_id_inside_a_tree_and_cycles_are_errors(tmp_path):
    from modalforge.plugins.text.sft.data import SFTDataModule

    tree = {"prompt": {"message_id": "a", "role": "prompter", "text": "q", "replies": [
        {"message_id": "b", "role": "assistant", "text": "x", "rank": 0},
        {"message_id": "b", "role": "assistant", "text": "y", "rank": 1}]}}
    with pytest.raises(DataError, match="id 'b' appears twice in this tree"):
        SFTDataModule().read(_jsonl(tmp_path / "t.jsonl", [tree]), "data.train")
    rows = [{"message_id": "r", "parent_id": None, "role": "prompter", "text": "q"},
            {"message_id": "s", "parent_id": "r", "role": "assistant", "text": "x"},
            {"message_id": "c1", "parent_id": "c2", "role": "prompter", "text": "q"},
            {"message_id": "c2", "parent_id": "c1", "role": "assistant", "text": "x"}]
    with pytest.raises(DataError, match="line 3: OASST message 'c1' never reaches"):
        SFTDataModule().read(_jsonl(tmp_path / "r.jsonl", rows), "data.train")


def test_oasst_ids_of_two_types_are_named(tmp_path):
    from modalforge.plugins.text.sft.data import SFTDataModule

    rows = [{"message_id": 1, "parent_id": None, "role": "prompter", "text": "q"},
            {"message_id": 2, "parent_id": "1", "role": "assistant", "text": "x"}]
    with pytest.raises(DataError) as info:
        SFTDataModule().read(_jsonl(tmp_path / "r.jsonl", rows), "data.train")
    assert "ids of one type" in info.value.hint


def test_dpo_refuses_identical_chosen_and_rejected(tmp_path):
    from modalforge.plugins.text.dpo.data import DPODataModule

    for rows in ([{"prompt": "q", "chosen": "a", "rejected": "a"}],
                 [{"prompt": "q", "responses": ["a", "a"], "scores": [1, 2]}]):
        with pytest.raises(DataError, match="chosen and rejected are the same"):
            DPODataModule().read(_jsonl(tmp_path / "p.jsonl", rows), "data.train")


def test_dpo_counts_repeated_and_contradicting_pairs(tmp_path, caplog):
    from modalforge.plugins.text.dpo.data import DPODataModule

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2 + [{"prompt": "q", "chosen": "b", "rejected": "a"}]
    with caplog.at_level(logging.WARNING):
        assert len(DPODataModule().read(_jsonl(tmp_path / "p.jsonl", rows), "data.train")) == 3
    assert "1 example(s) repeat" in caplog.text and "contradicted by another" in caplog.text


def test_kto_label_must_be_boolean_or_0_1(tmp_path):
    from modalforge.plugins.text.dpo.data import DPODataModule

    spec = _jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": 2}])
    with pytest.raises(DataError, match="KTO 'label' is 2"):
        DPODataModule(kind="kto").read(spec, "data.train")


def test_rl_prompt_messages_are_checked(tmp_path):
    from modalforge.rl.prompts import PromptDataModule

    for prompt, match in (([{"role": "user", "content": 5}], "content is int"),
                          ([{"role": "bot", "content": "x"}], "has role 'bot'"),
                          ([{"role": "user", "content": " "}], "every message is blank")):
        with pytest.raises(DataError, match=match):
            PromptDataModule().read(_jsonl(tmp_path / "r.jsonl", [{"prompt": prompt}]), "data.train")


# ---- vision / audio --------------------------------------------------------------------
def test_image_folder_manifest_repeats_counted_conflicts_refused(images, caplog):
    from modalforge.plugins.vision.image_classification.data import ImageClassificationDataModule as IC

    same = _jsonl(images / "m.jsonl", [{"image": "a.png", "label": "cat"}] * 2)
    with caplog.at_level(logging.WARNING):
        assert len(IC(verify=False).read(same, "data.train")) == 2
    assert "1 image(s) repeat an earlier one" in caplog.text
    two = _jsonl(images / "n.jsonl", [{"image": "a.png", "label": "cat"}, {"image": "a.png", "label": "dog"}])
    with pytest.raises(DataError, match="n.jsonl, line 2: image .* has label 'dog' here and 'cat'"):
        IC(verify=False).read(two, "data.train")


@pytest.mark.parametrize("row, match", [({"image": "a.png", "label": ""}, "field 'label' is empty"),
                                        ({"image": "a.png", "label": True}, "field 'label' is bool"),
                                        ({"image": "", "label": "cat"}, "field 'image' is empty")])
def test_image_classification_refuses_blank_and_boolean_values(images, row, match):
    from modalforge.plugins.vision.image_classification.data import ImageClassificationDataModule as IC

    with pytest.raises(DataError, match="line 1: " + match):
        IC(verify=False).read(_jsonl(images / "m.jsonl", [row]), "data.train")


def test_image_classification_int_and_str_labels_are_one_class(images):
    from modalforge.plugins.vision.image_classification.data import ImageClassificationDataModule as IC

    spec = _jsonl(images / "m.jsonl", [{"image": "a.png", "label": 1}, {"image": "b.png", "label": "1"}])
    assert {label for _, label in IC(verify=False).read(spec, "data.train")} == {"1"}


def test_cut_image_is_found_by_the_header_pass(images):
    from modalforge.plugins.vision.image_classification.data import ImageClassificationDataModule as IC

    data = (images / "a.png").read_bytes()
    (images / "cut.png").write_bytes(data[: len(data) // 2])
    spec = _jsonl(images / "m.jsonl", [{"image": "cut.png", "label": "x"}])
    with pytest.raises(DataError, match="cut.png: unreadable image"):
        IC(verify=True).read(spec, "data.train")


def test_clip_manifest_blank_caption_refused_blank_label_none_repeats_counted(images, caplog):
    from modalforge.plugins.vision.clip.data import CLIPDataModule

    with pytest.raises(DataError, match="line 1: field 'caption' is empty"):
        CLIPDataModule(verify=False).read(_jsonl(images / "c.jsonl", [{"image": "a.png", "caption": " "}]),
                                          "data.train")
    rows = [{"image": "a.png", "caption": "a cat", "label": ""}] * 2 + [{"image": "a.png", "caption": "cat"}]
    with caplog.at_level(logging.WARNING):
        pairs = CLIPDataModule(verify=False).read(_jsonl(images / "d.jsonl", rows), "data.train")
    assert [p.label for p in pairs] == [None, None, None]
    assert "1 image-caption pair(s) repeat" in caplog.text  # the second caption of a.png is not a repeat


def test_diffusion_refuses_a_number_caption_even_when_unused(images):
    from modalforge.plugins.vision.diffusion.data import DiffusionDataModule

    spec = _jsonl(images / "f.jsonl", [{"image": "a.png", "label": "cat", "caption": 5}])
    with pytest.raises(DataError, match="line 1: field 'caption' is int"):
        DiffusionDataModule(conditioning="class", verify=False).read(spec, "data.train")


def test_whisper_manifest_same_clip_two_transcripts_is_an_error(tmp_path, caplog):
    from modalforge.plugins.audio.whisper_asr.data import WhisperASRDataModule

    rows = [{"audio": "a.wav", "text": "one"}, {"audio": "a.wav", "text": "two"}]
    with pytest.raises(DataError, match="w.jsonl, line 2: audio .* has transcript 'two' here and 'one'"):
        WhisperASRDataModule(verify=False).read(_jsonl(tmp_path / "w.jsonl", rows), "data.train")
    with pytest.raises(DataError, match="line 1: empty transcript"):
        WhisperASRDataModule(verify=False).read(_jsonl(tmp_path / "e.jsonl", [{"audio": "a.wav", "text": " "}]),
                                                "data.train")
    with caplog.at_level(logging.WARNING):
        WhisperASRDataModule(verify=False).read(_jsonl(tmp_path / "s.jsonl", rows[:1] * 2), "data.train")
    assert "1 clip(s) repeat an earlier one" in caplog.text


def test_vlm_refuses_blank_caption_and_non_string_text():
    from modalforge.data.readers import Record
    from modalforge.plugins.multimodal.vlm.formats import parse_record

    with pytest.raises(DataError, match="the caption is empty"):
        parse_record(Record({"image": "x.png", "caption": " "}, "m.jsonl", "line 1"), None, "<image>")
    with pytest.raises(DataError, match=r"text_list\[1\] is NoneType"):
        parse_record(Record({"text_list": ["a", None], "image_info": []}, "m.jsonl", "line 1"), None, "<image>")
