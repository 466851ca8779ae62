"""Datasets as they are published: each format decoded as trained, with no prompt or user token in it.

sft: the tokens whose label is not -100; dpo / reward_model: the tokens of the collated batch
under ``completion_mask``. Every record here has the shape of the published dataset
(UltraFeedback-binarized, Anthropic HH-RLHF, Stanford SHP, Dolly, OASST rows and trees).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modalforge.data.errors import DataError
from modalforge.text.tokenize import IGNORE
from modalforge.plugins.text.dpo.data import DPODataModule
from modalforge.plugins.text.reward_model.data import RewardModelDataModule
from modalforge.plugins.text.sft.data import SFTDataModule


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def sft(path: str, **options) -> SFTDataModule:
    dm = SFTDataModule(train=path, val=path, vocab_size=300, packing=False, batch_size=1, **options)
    dm.setup()
    return dm


def learned(dm: SFTDataModule) -> list[list[str]]:
    """Per training example, its learned spans (runs of labels != -100), decoded."""
    out = []
    for (example,) in dm.train_set.rows:
        spans, run = [], []
        for token, label in zip(example.input_ids + [None], example.labels + [IGNORE]):
            if label == IGNORE:
                if run:
                    spans.append(dm.processor.decode(run))
                run = []
            else:
                assert label == token
                run.append(token)
        out.append(spans)
    return out


def rendered(dm: SFTDataModule) -> list[str]:
    return [dm.processor.decode(example.input_ids) for (example,) in dm.train_set.rows]


def assert_none_in(texts: list[str], forbidden: list[str]) -> None:
    for text in texts:
        for word in forbidden:
            assert word not in text, (word, text)


# ---- sft --------------------------------------------------------------------------------------------------------

def test_dolly_trains_the_response_only(tmp_path):
    rows = [{"instruction": f"Name river {i}", "context": f"Rivers of land {i}" if i % 2 else "",
             "response": f"River {i} flows", "category": "open_qa"} for i in range(6)]
    dm = sft(write(tmp_path / "dolly.jsonl", rows))
    assert sorted(learned(dm)) == sorted([[f"River {i} flows<|im_end|>"] for i in range(6)])
    assert "<|im_start|>user\nName river 1\n\nRivers of land 1<|im_end|>" in "".join(rendered(dm))
    assert_none_in([s for spans in learned(dm) for s in spans], ["Name", "land", "user"])


OASST_ROWS = [
    {"message_id": "p1", "parent_id": None, "role": "prompter", "text": "Tell me a joke", "rank": None,
     "message_tree_id": "p1", "lang": "en"},
    {"message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "Second joke answer", "rank": 1},
    {"message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "Best joke answer", "rank": 0},
    {"message_id": "a3", "parent_id": "p1", "role": "assistant", "text": "Deleted answer", "rank": None,
     "deleted": True},
    {"message_id": "p2", "parent_id": "a1", "role": "prompter", "text": "Another please", "rank": 0},
    {"message_id": "a4", "parent_id": "p2", "role": "assistant", "text": "Final joke answer", "rank": 0},
    {"message_id": "p3", "parent_id": "a2", "role": "prompter", "text": "Unanswered follow", "rank": 0},
]


def test_oasst_rows_flatten_to_the_best_path_or_all_paths(tmp_path):
    path = write(tmp_path / "oasst.jsonl", OASST_ROWS)
    best = sft(path)
    assert learned(best) == [["Best joke answer<|im_end|>", "Final joke answer<|im_end|>"]]
    assert rendered(best)[0].count("<|im_start|>user") == 2
    every = sft(path, oasst_paths="all")
    assert sorted(learned(every)) == [["Best joke answer<|im_end|>", "Final joke answer<|im_end|>"],
                                      ["Second joke answer<|im_end|>"]]  # the trailing prompter turn is cut
    spans = [s for dm in (best, every) for spans in learned(dm) for s in spans]
    assert_none_in(spans + rendered(every), ["Deleted"])
    assert_none_in(spans, ["Tell me", "Another", "Unanswered"])


def test_oasst_tree_records(tmp_path):
    by_id = {r["message_id"]: {**r, "replies": []} for r in OASST_ROWS}
    for r in OASST_ROWS:
        if r["parent_id"]:
            by_id[r["parent_id"]]["replies"].append(by_id[r["message_id"]])
    dm = sft(write(tmp_path / "trees.jsonl", [{"message_tree_id": "p1", "prompt": by_id["p1"]}]))
    assert learned(dm) == [["Best joke answer<|im_end|>", "Final joke answer<|im_end|>"]]


def test_message_level_train_flags_mask_that_message(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Bad early reply", "train": False},
                      {"role": "user", "content": "Try again"},
                      {"role": "assistant", "content": "Good late reply", "train": True}]},
        {"conversations": [{"from": "human", "value": "Hello sharegpt"},
                           {"from": "gpt", "value": "Weightless reply", "weight": 0},
                           {"from": "human", "value": "Again"},
                           {"from": "gpt", "value": "Weighted reply", "weight": 1}]},
    ]
    dm = sft(write(tmp_path / "flags.jsonl", records))
    assert learned(dm) == [["Good late reply<|im_end|>"], ["Weighted reply<|im_end|>"]]
    # the masked message stays in the context, and the flags never reach the template
    first = [{k: v for k, v in m.items() if k != "train"} for m in records[0]["messages"]]
    assert rendered(dm)[0] == dm.processor.apply_chat_template(first, tokenize=False)
    with pytest.raises(DataError, match=r"flags.jsonl, line 1: messages\[1\] 'weight' is 0.5"):
        sft(write(tmp_path / "flags.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a", "weight": 0.5}]}]))


def test_pretokenized_records_are_used_as_they_are(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    sft(write(tmp_path / "text.jsonl", [{"prompt": "some words here", "completion": "more words"}])
        ).processor.save_pretrained(tokenizer_dir)
    ids = [5, 6, 7, 8, 9]
    records = [{"input_ids": ids + [0, 0], "labels": [IGNORE, IGNORE, 7, 8, 9, IGNORE, IGNORE],
                "attention_mask": [1] * 5 + [0, 0]},
               {"input_ids": [10, 11, 12]}]
    dm = sft(write(tmp_path / "tok.jsonl", records), tokenizer=str(tokenizer_dir))
    examples = sorted(([e.input_ids, e.labels] for (e,) in dm.train_set.rows), key=len)
    assert [ids, [IGNORE, IGNORE, 7, 8, 9]] in examples and [[10, 11, 12], [10, 11, 12]] in examples
    with pytest.raises(DataError, match=r"line 1: labels must equal input_ids where learned"):
        sft(write(tmp_path / "shifted.jsonl", [{"input_ids": ids, "labels": ids[1:] + [IGNORE]}]),
            tokenizer=str(tokenizer_dir))
    with pytest.raises(DataError, match="pre-tokenised records .* need the tokenizer"):
        sft(write(tmp_path / "tok.jsonl", records))


def test_column_and_role_mapping_before_detection(tmp_path):
    qa = [{"question": f"What is {i}", "answer": f"It is {i}"} for i in range(3)]
    dm = sft(write(tmp_path / "qa.jsonl", qa), columns={"prompt": "question", "completion": "answer"})
    assert sorted(learned(dm)) == [[f"It is {i}<|im_end|>"] for i in range(3)]
    dialog = [{"dialog": [{"speaker": "customer", "text": "My order is late"},
                          {"speaker": "agent", "text": "Sorry about that"}]}]
    dm = sft(write(tmp_path / "dialog.jsonl", dialog),
             columns={"messages": "dialog", "role": "speaker", "content": "text"},
             roles={"customer": "user", "agent": "assistant"})
    assert learned(dm) == [["Sorry about that<|im_end|>"]]
    assert_none_in(learned(dm)[0], ["order"])
    shared = [{"conversations": [{"from": "asker", "value": "Ping"}, {"from": "bot", "value": "Pong"}]}]
    dm = sft(write(tmp_path / "sharegpt.jsonl", shared), roles={"asker": "user", "bot": "assistant"})
    assert learned(dm) == [["Pong<|im_end|>"]]
    with pytest.raises(DataError, match=r"qa.jsonl, line 1: data.columns maps 'prompt' to column 'query'"):
        sft(str(tmp_path / "qa.jsonl"), columns={"prompt": "query", "completion": "answer"})


def test_sft_records_that_fit_none_or_two_formats(tmp_path):
    with pytest.raises(DataError, match=r"odd.jsonl, line 2: record fits none of the formats prompt_completion, "
                                        r"messages, alpaca, sharegpt, dolly, oasst, pretokenized"):
        sft(write(tmp_path / "odd.jsonl", [{"prompt": "q", "completion": "a"}, {"question": "q"}]))
    with pytest.raises(DataError, match=r"two.jsonl, line 1: record fits the formats alpaca and dolly ambiguously"):
        sft(write(tmp_path / "two.jsonl", [{"instruction": "q", "output": "a", "response": "b"}]))
    with pytest.raises(DataError, match=r"record fits the formats messages and prompt_completion ambiguously"):
        sft(write(tmp_path / "two.jsonl", [{"messages": [{"role": "user", "content": "q"}], "prompt": "q",
                                            "completion": "a"}]))


# ---- dpo / reward_model -----------------------------------------------------------------------------------------

def dpo(path: str, cls=DPODataModule, **options) -> DPODataModule:
    dm = cls(train=path, val=path, vocab_size=300, batch_size=1, **options)
    dm.setup()
    return dm


def trained_pairs(dm: DPODataModule) -> list[tuple[str, str, str]]:
    """Per pair: (prompt, chosen, rejected) as the collated batch holds them: prompt tokens, then the
    tokens under ``completion_mask`` of its chosen and of its rejected sequence."""
    out = []
    for i in range(len(dm.train_set)):
        batch = dm.collate([dm.train_set[i]])
        ids, mask = batch["input_ids"], batch["completion_mask"]
        prompt = ids[0][batch["attention_mask"][0].bool() & ~mask[0]]
        out.append((dm.processor.decode(prompt), dm.processor.decode(ids[0][mask[0]]),
                    dm.processor.decode(ids[1][mask[1]])))
    return out


def test_ultrafeedback_binarized_shared_turns_are_the_prompt(tmp_path):
    question = "Give me a short summary of TCP handshakes."
    records = [{"prompt": question, "prompt_id": "x1",
                "chosen": [{"role": "user", "content": question},
                           {"role": "assistant", "content": "A common mistake is to skip the ACK."}],
                "rejected": [{"role": "user", "content": question},
                             {"role": "assistant", "content": "Handshakes are for people."}],
                "messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": "A common mistake is to skip the ACK."}],
                "score_chosen": 8.0, "score_rejected": 5.0}]
    (prompt, chosen, rejected), = trained_pairs(dpo(write(tmp_path / "uf.jsonl", records)))
    assert prompt == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"  # rendered once
    assert chosen == "A common mistake is to skip the ACK.<|im_end|>\n"
    assert rejected == "Handshakes are for people.<|im_end|>\n"
    bad = [{**records[0], "prompt": "Some other question"}]
    with pytest.raises(DataError, match=r"uf.jsonl, line 1: 'prompt' is not one of the user turns"):
        dpo(write(tmp_path / "uf.jsonl", bad))


def test_hh_rlhf_implicit_prompt_is_the_common_prefix_up_to_the_last_assistant_turn(tmp_path):
    base = "\n\nHuman: What is a cat?\n\nAssistant: A small animal.\n\nHuman: Is it friendly?\n\nAssistant:"
    records = [{"chosen": base + " It is often friendly.", "rejected": base + " It is a rock."}]
    dm = dpo(write(tmp_path / "hh.jsonl", records))
    (prompt, chosen, rejected), = trained_pairs(dm)
    assert dm.train_items[0]["prompt"] == [{"role": "user", "content": "What is a cat?"},
                                          {"role": "assistant", "content": "A small animal."},
                                          {"role": "user", "content": "Is it friendly?"}]
    assert chosen == "It is often friendly.<|im_end|>\n" and rejected == "It is a rock.<|im_end|>\n"
    assert_none_in([chosen, rejected], ["Human", "Assistant", "cat", "friendly?", "user"])
    diverged = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Yes\n\nHuman: Ok\n\nAssistant: Good",
                 "rejected": "\n\nHuman: Hi\n\nAssistant: No\n\nHuman: Ok\n\nAssistant: Bad"}]
    with pytest.raises(DataError, match=r"hh.jsonl, line 1: 'chosen' differs .* before its last Human turn"):
        dpo(write(tmp_path / "hh.jsonl", diverged))


def test_shp_labels_pick_the_preferred_reference(tmp_path):
    records = [{"post_id": "a", "history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering.",
                "human_ref_B": "Because paint.", "labels": 1, "score_A": 10, "score_B": 2},
               {"post_id": "b", "history": "Why is grass green?", "human_ref_A": "It is wet.",
                "human_ref_B": "Chlorophyll.", "labels": 0, "score_A": 1, "score_B": 9}]
    pairs = trained_pairs(dpo(write(tmp_path / "shp.jsonl", records)))
    assert sorted(c for _, c, _ in pairs) == ["Chlorophyll.<|im_end|>\n", "Rayleigh scattering.<|im_end|>\n"]
    assert sorted(r for *_, r in pairs) == ["Because paint.<|im_end|>\n", "It is wet.<|im_end|>\n"]
    assert_none_in([c + r for _, c, r in pairs], ["Why", "sky", "grass"])


def test_ranked_lists_best_worst_for_dpo_every_pair_for_the_reward_model(tmp_path):
    records = [{"prompt": "Rate these", "responses": ["Okay one", "Best one", "Worst one"], "scores": [5, 9, 1]}]
    path = write(tmp_path / "ranked.jsonl", records)
    assert [(c, r) for _, c, r in trained_pairs(dpo(path))] == [("Best one<|im_end|>\n", "Worst one<|im_end|>\n")]
    every = {(c, r) for _, c, r in trained_pairs(dpo(path, ranked_pairs="all"))}
    expected = {("Best one<|im_end|>\n", "Okay one<|im_end|>\n"), ("Best one<|im_end|>\n", "Worst one<|im_end|>\n"),
                ("Okay one<|im_end|>\n", "Worst one<|im_end|>\n")}
    assert every == expected
    assert {(c, r) for _, c, r in trained_pairs(dpo(path, cls=RewardModelDataModule))} == expected
    by_rank = write(tmp_path / "ranks.jsonl", [{"prompt": "Rate", "responses": ["B", "A"], "ranks": [2, 1]}])
    assert [(c, r) for _, c, r in trained_pairs(dpo(by_rank))] == [("A<|im_end|>\n", "B<|im_end|>\n")]
    both = write(tmp_path / "both.jsonl", [{**records[0], "ranks": [2, 1, 3]}])
    with pytest.raises(DataError, match=r"both.jsonl, line 1: .*not both"):
        dpo(both)


def test_preference_columns_and_errors(tmp_path):
    records = [{"question": "Capital of France?", "good": "Paris.", "bad": "Rome."}]
    (prompt, chosen, rejected), = trained_pairs(dpo(write(tmp_path / "qa.jsonl", records),
                                                    columns={"prompt": "question", "chosen": "good",
                                                             "rejected": "bad"}))
    assert "Capital of France?" in prompt and (chosen, rejected) == ("Paris.<|im_end|>\n", "Rome.<|im_end|>\n")
    with pytest.raises(DataError, match=r"odd.jsonl, line 1: record fits none of the preference formats: pairs .*"
                                        r"shp .*ranked"):
        dpo(write(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match=r"two.jsonl, line 1: record fits the preference formats pairs and ranked "
                                        r"ambiguously"):
        dpo(write(tmp_path / "two.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "responses": ["a", "b"],
                                            "scores": [1, 0]}]))


def test_mapping_per_source_of_a_mixture(tmp_path):
    qa = write(tmp_path / "qa.jsonl", [{"question": "Mixed question", "answer": "Mixed answer"}])
    plain = write(tmp_path / "plain.jsonl", [{"prompt": "Plain question", "completion": "Plain answer"}])
    train = [{"path": qa, "weight": 1, "columns": {"prompt": "question", "completion": "answer"}}, {"path": plain}]
    dm = SFTDataModule(train=train, val=plain, vocab_size=300, packing=False, batch_size=1)
    dm.setup()
    spans = sorted(dm.processor.decode([t for t, label in zip(e.input_ids, e.labels) if label != IGNORE])
                   for d in dm.train_set.datasets for (e,) in d.rows)
    assert spans == ["Mixed answer<|im_end|>", "Plain answer<|im_end|>"]
    pairs = write(tmp_path / "pairs.jsonl", [{"q": "Which?", "good": "This one", "bad": "That one"}])
    dm = DPODataModule(train=[{"path": pairs, "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
                              {"path": write(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "C", "rejected": "R"}])}],
                       val=str(tmp_path / "p.jsonl"), vocab_size=300, batch_size=1)
    dm.setup()
    assert [dm.processor.decode(item["chosen"]) for item in dm.train_set.datasets[0].items] == ["This one<|im_end|>\n"]
    from modalforge.errors import ConfigError
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colums'\] \(a source has path, weight, name, "
                                          r"columns, roles\)"):
        SFTDataModule(train=[{"path": qa, "colums": {}}])
