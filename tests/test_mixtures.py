"""Weighted mixtures of sources and named validation sets: in the core, for every plugin."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from modalforge.config import compose
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.loader import ResumableDataLoader
from modalforge.data.mixture import MixedDataset
from modalforge.data.sources import parse_train, parse_val
from modalforge.errors import ConfigError
from modalforge.run import run

from cli_helpers import FAST, series


def _chats(path, n, op="+"):
    path.write_text("".join(json.dumps({"prompt": f"What is {i} {op} 1?", "completion": str(eval(f"{i}{op}1"))}) + "\n"
                            for i in range(n)))
    return str(path)


def test_sources_parse_paths_mixtures_and_named_val_sets():
    assert parse_train(None) == []
    one = parse_train(["a.jsonl", "b.jsonl"])
    assert len(one) == 1 and one[0].spec == ["a.jsonl", "b.jsonl"]  # a plain list is one source
    mix = parse_train([{"path": "web.jsonl", "weight": 3}, "code.jsonl"])
    assert [(s.name, s.weight) for s in mix] == [("web", 3.0), ("code", 1.0)]
    assert parse_val({"easy": "e.jsonl", "hard": "h.jsonl"}) == {"easy": "e.jsonl", "hard": "h.jsonl"}
    assert parse_val("v.jsonl") == {"val": "v.jsonl"}


@pytest.mark.parametrize("spec,where,words", [
    ([{"path": "a.jsonl", "weight": 0}], "data.train[0].weight", "> 0"),
    ([{"path": "a.jsonl", "weight": -2}], "data.train[0].weight", "> 0"),
    ([{"path": "a.jsonl", "weight": "heavy"}], "data.train[0].weight", "> 0"),
    ([{"weight": 1}], "data.train[0]", "needs a 'path'"),
    ([{"path": "a/x.jsonl"}, {"path": "b/x.jsonl"}], "data.train", "named 'x'"),
    ([{"path": "a.jsonl", "wieght": 2}], "data.train[0]", "unknown key"),
])
def test_bad_mixture_is_one_clear_error(spec, where, words):
    with pytest.raises(ConfigError) as info:
        parse_train(spec)
    assert info.value.where == where and words in str(info.value)


def test_mixture_follows_weights_and_is_deterministic():
    a, b = list(range(100)), list(range(1000, 1010))
    mixed = MixedDataset([a, b], [1.0, 1.0], ["big", "small"])
    assert mixed.quotas() == [55, 55]
    import torch

    order = mixed.sample_order(torch.Generator().manual_seed(7))
    values = [mixed[i] for i in order]
    counts = Counter("small" if v >= 1000 else "big" for v in values)
    assert counts == {"big": 55, "small": 55}  # the small source repeats, the big one is subsampled
    repeats = Counter(v for v in values if v >= 1000)
    assert set(repeats) == set(b) and set(repeats.values()) <= {5, 6}  # cycled evenly, not drawn with replacement
    again = mixed.sample_order(torch.Generator().manual_seed(7))
    assert again == order and mixed.sample_order(torch.Generator().manual_seed(8)) != order


def test_mixture_resumes_exactly_mid_epoch():
    mixed = MixedDataset([list(range(30)), list(range(100, 112))], [3.0, 1.0], ["a", "b"])
    full = ResumableDataLoader(mixed, batch_size=4, seed=5)
    full.sampler.set_epoch(1)
    expected = [b.tolist() for b in full]
    first = ResumableDataLoader(mixed, batch_size=4, seed=5)
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it).tolist() for _ in range(4)]
    counts = first.source_counts()
    assert sum(counts.values()) == 16 and counts["a"] > counts["b"]
    assert first.source_counts() == counts  # counted once, not again
    probe = ResumableDataLoader(mixed, batch_size=4, seed=5)
    probe.sampler.set_epoch(1)
    probe_it = iter(probe)
    for _ in range(6):
        next(probe_it)
        running = probe.source_counts()
    assert running == mixed.count_sources(probe.sampler.current[:24])  # incremental = counted from scratch
    resumed = ResumableDataLoader(mixed, batch_size=4, seed=5)
    resumed.load_state_dict(first.state_dict())
    resumed.sampler.set_epoch(1)
    assert seen + [b.tolist() for b in resumed] == expected


def test_every_builtin_map_style_datamodule_is_sourced():
    """Mixtures and named validation sets work for a plugin by inheriting the core shape."""
    from hydra.utils import get_object

    for name in ("causal_lm", "sft", "dpo", "reward_model", "image_classification", "whisper_asr", "wav2vec2",
                 "diffusion", "grpo", "ppo", "clip", "vlm"):
        cls = get_object(str(compose([f"plugin={name}"]).data._target_))
        assert issubclass(cls, SourcedDataModule), name


def test_sft_trains_on_a_weighted_mixture_with_named_val_sets(tmp_path):
    add, sub = _chats(tmp_path / "add.jsonl", 64, "+"), _chats(tmp_path / "sub.jsonl", 32, "-")
    val_add, val_sub = _chats(tmp_path / "val_add.jsonl", 8, "+"), _chats(tmp_path / "val_sub.jsonl", 8, "-")
    cfg = compose(["plugin=sft", *FAST, "trainer.max_steps=6", "trainer.val_check_interval=6",
                   "trainer.limit_val_batches=1", "callbacks=none", "checkpoint.export_on_end=false",
                   "data.batch_size=4", "data.packing=false", "data.max_length=64",
                   f"data.train=[{{path: '{add}', weight: 3}}, {{path: '{sub}', weight: 1, name: minus}}]",
                   f"data.val={{plus: '{val_add}', minus: '{val_sub}'}}", f"run_dir={tmp_path / 'run'}"])
    trainer, module, dm = run(cfg, tmp_path / "run")
    assert isinstance(dm.train_set, MixedDataset) and dm.val_names == ["plus", "minus"]
    logged = trainer.logged_metrics
    assert "val/plus/loss" in logged and "val/minus/loss" in logged and "val/loss" in logged
    seen = series(tmp_path / "run", "data/add/seen")
    assert seen and max(seen.values()) > 0
    minus = series(tmp_path / "run", "data/minus/seen")
    assert max(seen.values()) > max(minus.values())  # weight 3 against 1


def test_mixture_in_the_middle_of_a_run_resumes_to_the_same_batches(tmp_path):
    a, b = _chats(tmp_path / "a.jsonl", 40, "+"), _chats(tmp_path / "b.jsonl", 20, "-")
    common = ["plugin=sft", *FAST, "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
              "callbacks=none", "checkpoint.export_on_end=false", "optim.scheduler=constant", "data.batch_size=4",
              "data.packing=false", "data.max_length=64", "checkpoint.every_n_train_steps=3",
              f"data.train=[{{path: '{a}', weight: 2}}, {{path: '{b}', weight: 1}}]", f"data.val={a}"]
    straight = tmp_path / "straight"
    run(compose([*common, "trainer.max_steps=6", f"run_dir={straight}"]), straight)
    split = tmp_path / "split"
    run(compose([*common, "trainer.max_steps=3", f"run_dir={split}"]), split)
    run(compose([*common, "trainer.max_steps=6", f"run_dir={split}", "ckpt_path=last"]), split)
    x, y = series(straight, "train/loss"), series(split, "train/loss")
    for step in (3, 4, 5):
        assert y[step] == pytest.approx(x[step], abs=1e-6), step


def test_streamed_shards_mix_by_weight(tmp_path):
    import webdataset as wds

    for name, count in (("web", 40), ("code", 40)):
        with wds.TarWriter(str(tmp_path / f"{name}-000.tar")) as sink:
            for i in range(count):
                sink.write({"__key__": f"{name}{i:03d}", "txt": f"{name} document number {i} " * 3})
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"txt": f"validation text {i} " * 3}) + "\n"
                                                for i in range(20)))
    cfg = compose(["plugin=causal_lm", "data.streaming=true", "data.text_field=txt", "data.block_size=8",
                   "data.batch_size=4", "data.shuffle_buffer=0", f"data.val={tmp_path / 'val.jsonl'}",
                   f"data.train=[{{path: '{tmp_path}/web-000.tar', weight: 3}}, {{path: '{tmp_path}/code-000.tar'}}]"])
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    tokenizer = datamodule.processor
    words = Counter()
    for i, batch in enumerate(datamodule.train_dataloader()):
        for row in batch["input_ids"]:
            text = tokenizer.decode(row)
            words["web"] += text.count("web")
            words["code"] += text.count("code")
        if i == 20:
            break
    assert words["web"] > 1.8 * words["code"] > 0
