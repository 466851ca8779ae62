"""Shared data readers: every format, clear errors, splits, and shard streaming."""

from __future__ import annotations

import json

import pytest

from modalforge.data.errors import DataError
from modalforge.data.paths import expand_paths
from modalforge.data.readers import read_records, require_fields
from modalforge.data.shards import webdataset_stream
from modalforge.data.splits import split_train_val


def write_shards(folder, count=4, per_shard=3):
    import webdataset as wds

    for s in range(count):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"s{s}-{i:02d}", "txt": f"caption {s}-{i}", "json": {"n": i}, "jpg": b"\xff\xd8raw"})


def test_jsonl_json_txt_csv_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"text": "three"}]}))
    (tmp_path / "c.txt").write_text("line one\n\nline two\n")
    (tmp_path / "d.csv").write_text("text,label\nfour,1\nfive,0\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["six", "seven"]}), tmp_path / "e.parquet")
    got = {r.data["text"]: r.location for r in read_records(str(tmp_path), txt_mode="line")}
    assert got == {"one": "line 1", "two": "line 3", "three": "item 0", "line one": "line 1", "line two": "line 3",
                   "four": "line 2", "five": "line 3", "six": "row 0", "seven": "row 1"}
    whole = list(read_records(str(tmp_path / "c.txt")))
    assert len(whole) == 1 and whole[0].data["text"].startswith("line one")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError) as err:
        list(read_records(str(path)))
    assert str(err.value).startswith(f"{path}, line 3: invalid JSON")
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        list(read_records(str(path)))


def test_missing_and_mistyped_fields_are_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a"}\n{"txt": "b"}\n{"text": 3}\n')
    records = list(read_records(str(path)))
    require_fields(records[0], {"text": str})
    with pytest.raises(DataError, match=r"r.jsonl, line 2: missing field 'text' \(expected a string\); keys present: \['txt'\]"):
        require_fields(records[1], {"text": str})
    with pytest.raises(DataError, match="line 3: field 'text' is int, expected a string"):
        require_fields(records[2], {"text": str})


def test_globs_braces_and_missing_paths(tmp_path):
    write_shards(tmp_path)
    assert len(expand_paths(str(tmp_path / "shard-{000..002}.tar"))) == 3
    assert len(expand_paths(str(tmp_path / "*.tar"))) == 4
    with pytest.raises(DataError, match=r"data\.val: no file matches '.*nothing\*\.jsonl'"):
        expand_paths(str(tmp_path / "nothing*.jsonl"), what="data.val")
    with pytest.raises(DataError, match="data.train is not set"):
        expand_paths(None)


def test_webdataset_shards_are_decoded_with_keys(tmp_path):
    write_shards(tmp_path, count=1)
    records = list(read_records(str(tmp_path / "shard-000.tar")))
    assert [r.location for r in records] == ["key s0-00", "key s0-01", "key s0-02"]
    assert records[1].data["txt"] == "caption 0-1" and records[1].data["json"] == {"n": 1}
    assert isinstance(records[1].data["jpg"], bytes)


def test_corrupt_shard_is_named(tmp_path):
    path = tmp_path / "broken.tar"
    path.write_bytes(b"this is not a tar file at all" * 10)
    with pytest.raises(DataError, match="broken.tar"):
        list(read_records(str(path)))


def test_hf_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    records = list(read_records(str(tmp_path / "ds")))
    assert [r.data["text"] for r in records] == ["x", "y", "z"] and records[2].location == "row 2"
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                               "test": datasets.Dataset.from_dict({"text": ["b"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.data["text"] for r in read_records(f"hf:{tmp_path / 'dd'}:test")] == ["b"]


def test_hub_dataset_offline_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="save_to_disk"):
        list(read_records("hf:someone/not-here"))


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = split_train_val(items, val_fraction=0.1, seed=3)
    assert len(val) == 10 and set(train).isdisjoint(val) and sorted(train + val) == items
    assert split_train_val(items, val_fraction=0.1, seed=3) == (train, val)
    with pytest.raises(DataError, match="give data.val"):
        split_train_val([1])


def test_stream_gives_each_rank_disjoint_shards(tmp_path, monkeypatch):
    write_shards(tmp_path, count=4)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({r.data["__key__"] for r in webdataset_stream(str(tmp_path / "shard-{000..003}.tar"))})
    assert len(seen[0]) == len(seen[1]) == 6
    assert seen[0].isdisjoint(seen[1])
