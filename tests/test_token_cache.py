"""The token cache: a second start reads the tokenised data; a changed file or option tokenises again."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import modalforge.plugins.text.sft.data as sft_data
import modalforge.text.preference_data as preference_data
from modalforge.text import token_cache

RECORDS = [{"prompt": f"What is {a} plus {b}?", "completion": str(a + b)} for a, b in
           [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]
PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)} for a, b in
         [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def counted(monkeypatch):
    """How many conversations / completions were tokenised, by plugin module."""
    calls = {"sft": 0, "pairs": 0}

    def wrap(module, name, key):
        original = getattr(module, name)

        def counting(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)

    wrap(sft_data, "tokenize_conversation", "sft")
    wrap(preference_data, "tokenize_completion", "pairs")
    return calls


def sft(tmp_path, **options):
    train = tmp_path / "train.jsonl"
    if not train.exists():
        write(train, RECORDS)
    dm = sft_data.SFTDataModule(train=str(train), val=write(tmp_path / "val.jsonl", RECORDS[:2]),
                                cache_dir=str(tmp_path / "cache"), batch_size=2, **options)
    dm.setup()
    return dm


def tokens(dm):
    return [[(e.input_ids, e.labels) for e in row] for row in dm.train_set.rows]


def test_sft_second_start_reads_the_cache_and_a_change_tokenises_again(tmp_path, counted):
    first = sft(tmp_path)
    assert counted["sft"] == len(RECORDS) + 2  # train + val
    entry, hit, count = first.token_cache_entries["data.train"]
    assert not hit and count == len(RECORDS) and (entry / "meta.json").exists()
    assert entry.parent == tmp_path / "cache" / "tokenized"
    assert not list(entry.parent.glob("*.building"))  # written in a temporary folder, renamed into place

    again = sft(tmp_path)  # an unchanged re-run: nothing tokenised, the same rows and stats
    assert counted["sft"] == len(RECORDS) + 2
    assert again.token_cache_entries["data.train"][:2] == (entry, True)
    assert tokens(again) == tokens(first) and again.stats == first.stats
    assert again.collate(list(again.train_set.rows[:2]))["input_ids"].tolist() == \
        first.collate(list(first.train_set.rows[:2]))["input_ids"].tolist()

    sft(tmp_path, max_length=64)  # an option that changes tokens
    assert counted["sft"] == 2 * (len(RECORDS) + 2)
    unpacked = sft(tmp_path, packing=False)
    assert counted["sft"] == 3 * (len(RECORDS) + 2)
    assert [len(row) for row in unpacked.train_set.rows] == [1] * len(RECORDS)

    write(tmp_path / "train.jsonl", RECORDS[:-1] + [{"prompt": "What is 9 plus 9?", "completion": "18"}])
    changed = sft(tmp_path)  # a changed file: tokenised again (val too: the BPE trained on train changed)
    assert counted["sft"] == 4 * (len(RECORDS) + 2)
    assert changed.token_cache_entries["data.train"][0] != entry


def test_sft_token_cache_off_and_a_folder(tmp_path, counted):
    sft(tmp_path, token_cache="off")
    sft(tmp_path, token_cache="off")
    assert counted["sft"] == 2 * (len(RECORDS) + 2)
    assert not (tmp_path / "cache" / "tokenized").exists()
    dm = sft(tmp_path, token_cache=str(tmp_path / "tokens"))
    assert dm.token_cache_entries["data.train"][0].parent == tmp_path / "tokens"


def test_the_tokenizer_and_its_template_are_part_of_the_key(tmp_path, counted):
    import copy

    tokenizer = sft(tmp_path).processor
    before = token_cache.tokenizer_digest(tokenizer)
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    added = copy.deepcopy(tokenizer)
    added.add_tokens(["plus"])
    assert len({before, token_cache.tokenizer_digest(templated), token_cache.tokenizer_digest(added)}) == 3
    assert token_cache.tokenizer_digest(copy.deepcopy(tokenizer)) == before
    sft(tmp_path, chat_template="llama3")  # another template: tokenised again
    assert counted["sft"] == 2 * (len(RECORDS) + 2)


def test_preference_pairs_are_cached_like_sft(tmp_path, counted):
    def dm(**options):
        module = preference_data.PreferenceDataModule(train=write(tmp_path / "pairs.jsonl", PAIRS),
                                                      val=write(tmp_path / "pairs_val.jsonl", PAIRS[:2]),
                                                      cache_dir=str(tmp_path / "cache"), batch_size=2, **options)
        module.setup()
        return module

    first = dm()
    assert counted["pairs"] == 2 * (len(PAIRS) + 2)
    again = dm()
    assert counted["pairs"] == 2 * (len(PAIRS) + 2)
    assert again.train_set.items == first.train_set.items
    assert again.collate([again.train_set[0], again.train_set[1]])["input_ids"].tolist() == \
        first.collate([first.train_set[0], first.train_set[1]])["input_ids"].tolist()
    dm(max_length=32, too_long="truncate")
    assert counted["pairs"] == 4 * (len(PAIRS) + 2)


def test_causal_lm_blocks_are_cached(tmp_path):
    from modalforge.plugins.text.causal_lm.data import CausalLMDataModule

    texts = [{"text": f"document {i} says the number {i * 7} is odd or even."} for i in range(40)]
    options = dict(train=write(tmp_path / "docs.jsonl", texts), cache_dir=str(tmp_path / "cache"), block_size=16)
    first = CausalLMDataModule(**options)
    first.setup()
    again = CausalLMDataModule(**options)
    again.setup()
    assert not first.token_cache_entries["data.train"][1] and again.token_cache_entries["data.train"][1]
    assert again.train_set.blocks.dtype == first.train_set.blocks.dtype
    assert again.train_set.blocks.tolist() == first.train_set.blocks.tolist()


def test_an_interrupted_write_leaves_no_entry(tmp_path):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        token_cache.cached("x", tmp_path, {"k": 1}, interrupted)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    (arrays, meta), hit, entry = token_cache.cached("x", tmp_path, {"k": 1},
                                                    lambda: ({"a": np.arange(3)}, {"examples": 3}))
    assert not hit and arrays["a"].tolist() == [0, 1, 2] and meta["examples"] == 3
    (arrays, _), hit, _ = token_cache.cached("x", tmp_path, {"k": 1}, lambda: pytest.fail("built twice"))
    assert hit and isinstance(arrays["a"], np.memmap)


def test_ragged_round_trip():
    lists = [[1, 2, 3], [], [-100, 7]]
    flat, offsets = token_cache.ragged(lists)
    assert list(token_cache.Ragged(flat, offsets)) == lists and flat.dtype == np.int32


def test_the_option_composes_and_validates(tmp_path):
    from modalforge.config import compose
    from modalforge.validate import validate_config

    validate_config(compose(["plugin=sft", "data.token_cache=off"]))
    validate_config(compose(["plugin=dpo", "data.token_cache=off"]))
    assert token_cache.cache_folder(False) is None and token_cache.cache_folder("off") is None
    assert token_cache.cache_folder("auto", tmp_path) == tmp_path / "tokenized"
    assert token_cache.cache_folder("auto") == token_cache.cache_root(os.environ.get("MODALFORGE_CACHE")) / "tokenized"


def test_preprocess_fills_the_cache_that_train_reads(tmp_path, capsys):
    from modalforge.cli import main

    overrides = ["preprocess", "plugin=sft", f"data.train={write(tmp_path / 'train.jsonl', RECORDS)}",
                 f"data.val={write(tmp_path / 'val.jsonl', RECORDS[:2])}", f"data.cache_dir={tmp_path / 'cache'}"]
    main(overrides)
    out = capsys.readouterr().out
    assert f"data.train: {len(RECORDS)} examples written to the token cache {tmp_path / 'cache' / 'tokenized'}" in out
    main(overrides)
    assert f"data.train: {len(RECORDS)} examples already in the token cache" in capsys.readouterr().out


def _rank(rank: int, world: int, folder: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    original = sft_data.tokenize_conversation
    sft_data.tokenize_conversation = lambda *a, **k: calls.append(1) or original(*a, **k)
    dm = sft_data.SFTDataModule(train=f"{folder}/train.jsonl", val=f"{folder}/val.jsonl", cache_dir=f"{folder}/cache",
                                batch_size=2)
    dm.setup()
    result = {"calls": len(calls), "hit": dm.token_cache_entries["data.train"][1], "tokens": tokens(dm)}
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_local_rank_zero_tokenises_and_the_others_read(tmp_path):
    import socket

    import torch.multiprocessing as mp

    write(tmp_path / "train.jsonl", RECORDS)
    write(tmp_path / "val.jsonl", RECORDS[:2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, str(tmp_path), port), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (zero["calls"], zero["hit"]) == (len(RECORDS) + 2, False)
    assert (one["calls"], one["hit"]) == (0, True)  # waited at the barrier, then read rank zero's entry
    assert one["tokens"] == zero["tokens"]


def test_an_unreadable_entry_is_built_again(tmp_path):
    build = lambda: ({"a": np.arange(4)}, {"examples": 4})  # noqa: E731
    _, _, entry = token_cache.cached("x", tmp_path, {"k": 2}, build)
    (entry / "a.npy").unlink()  # removed by hand
    (arrays, _), hit, again = token_cache.cached("x", tmp_path, {"k": 2}, build)
    assert again == entry and not hit and arrays["a"].tolist() == [0, 1, 2, 3]


def test_first_fit_packing_with_its_tree_equals_the_scan():
    import random

    from modalforge.text.packing import pack_first_fit
    from modalforge.text.tokenize import Tokenized

    def scan(examples, max_length):
        rows, room = [], []
        for example in sorted(examples, key=len, reverse=True):
            for i, free in enumerate(room):
                if len(example) <= free:
                    rows[i].append(example)
                    room[i] -= len(example)
                    break
            else:
                rows.append([example])
                room.append(max_length - len(example))
        return rows

    rng = random.Random(0)
    for _ in range(100):
        examples = [Tokenized([0] * n, [0] * n) for n in (rng.randint(1, 40) for _ in range(rng.randint(0, 50)))]
        max_length = rng.randint(1, 48)
        assert [[id(e) for e in r] for r in pack_first_fit(examples, max_length)] == \
            [[id(e) for e in r] for r in scan(examples, max_length)]
