"""sft: record formats, the assistant-token mask, packing without cross-contamination, learning."""

from __future__ import annotations

import json

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.data.readers import Record
from modalforge.text.formats import to_messages
from modalforge.text.packing import collate_rows, pack_first_fit
from modalforge.text.tokenize import IGNORE, tokenize_conversation
from modalforge.plugins.text.sft.data import SFTDataModule
from modalforge.plugins.text.sft.objective import token_loss_and_accuracy
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series

CHAT = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Use the calculator for 2 times 9."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2*9"}}}]},
    {"role": "tool", "content": "18"},
    {"role": "assistant", "content": "18"},
]


@pytest.fixture(scope="module")
def dm() -> SFTDataModule:
    module = SFTDataModule(batch_size=4)
    module.setup()
    return module


def rec(data, line=1):
    return Record(data, "chats.jsonl", f"line {line}")


def test_every_format_becomes_messages():
    expected = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages(rec({"prompt": "Q", "completion": "A"})) == expected
    assert to_messages(rec({"instruction": "Q", "output": "A"})) == expected
    assert to_messages(rec({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})) == expected
    assert to_messages(rec({"messages": expected})) == expected
    assert to_messages(rec({"instruction": "Q", "input": "ctx", "output": "A"}))[0]["content"] == "Q\n\nctx"


def test_unknown_record_names_file_line_and_formats_tried():
    with pytest.raises(DataError, match=r"chats.jsonl, line 5: record fits none of the formats prompt_completion, "
                                        r"messages, alpaca, sharegpt, dolly, oasst, pretokenized "
                                        r"\(keys present: \['question'\]\)"):
        to_messages(rec({"question": "Q"}, line=5))
    with pytest.raises(DataError, match="no assistant message"):
        to_messages(rec({"messages": [{"role": "user", "content": "Q"}]}))


def test_mask_token_by_token_on_a_multi_turn_chat_with_a_tool_call(dm):
    tokenizer = dm.processor
    example = tokenize_conversation(tokenizer, CHAT)
    assert len(example.input_ids) == len(example.labels)
    # the tokens, learned or not, are exactly the rendered conversation
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    # contiguous learned spans, decoded: each assistant turn's content and its end-of-turn marker, nothing else
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE:
            if current:
                spans.append(tokenizer.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    spans.append(tokenizer.decode(current)) if current else None
    call = json.dumps(CHAT[4]["tool_calls"][0]["function"])
    assert spans == ["7<|im_end|>", f"<tool_call>{call}</tool_call><|im_end|>", "18<|im_end|>"]
    everything = tokenize_conversation(tokenizer, CHAT, train_on="all")
    assert everything.labels == everything.input_ids


def test_packed_loss_equals_unpacked_loss(dm):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(dm.processor), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    examples = dm.train_set.rows[0][:6]
    assert len(examples) >= 3
    pad = dm.processor.pad_token_id

    def summed(batch):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch.get("position_ids")).logits
        loss, _, count = token_loss_and_accuracy(logits, batch["labels"])
        return loss * count, count

    packed_sum, packed_count = summed(collate_rows([examples], pad, packed=True))
    unpacked_sum, unpacked_count = summed(collate_rows([[e] for e in examples], pad, packed=False))
    assert packed_count == unpacked_count
    torch.testing.assert_close(packed_sum / packed_count, unpacked_sum / unpacked_count, atol=1e-5, rtol=1e-5)


def test_packing_removes_padding(dm):
    assert dm.stats["padding_share_packed"] < 0.5 * dm.stats["padding_share_unpacked"]
    rows = pack_first_fit([e for row in dm.train_set.rows for e in row], dm.max_length)
    assert all(sum(len(e) for e in row) <= dm.max_length for row in rows)


def test_too_long_examples(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "short", "completion": "ok"}) + "\n"
                    + json.dumps({"prompt": "word " * 200, "completion": "ok"}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl, line 2: example of \d+ tokens is longer than data.max_length=64"):
        SFTDataModule(train=str(path), val=str(path), max_length=64, vocab_size=300).setup()
    dropping = SFTDataModule(train=str(path), val=str(path), max_length=64, too_long="drop", vocab_size=300)
    dropping.setup()
    assert sum(len(r) for r in dropping.train_set.rows) == 1


def test_conforms(tmp_path):
    assert_plugin_conforms("sft", tmp_path, ["optim.warmup_steps=0"], steps=10)


def test_conforms_with_lora(tmp_path):
    report = assert_plugin_conforms("sft", tmp_path, ["adapter=lora", "optim.lr=1e-2", "optim.warmup_steps=0"],
                                    steps=10)
    assert all("lora_" in n for n in report.changed)


def test_offline_default_learns_and_saves_its_chat_template(tmp_path):
    cfg = compose(["plugin=sft", *FAST, "trainer.max_steps=100", "trainer.val_check_interval=20",
                   "callbacks=none"])
    run(cfg, tmp_path)
    val = series(tmp_path, "val/loss")
    assert val[max(val)] < 0.6 * val[min(val)], val
    config = json.loads((tmp_path / "final" / "tokenizer_config.json").read_text())
    saved = config.get("chat_template") or (tmp_path / "final" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in saved
