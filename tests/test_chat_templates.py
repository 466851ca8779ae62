"""Published chat templates through the sft tokenisation: exactly the template's tokens, exactly the answers learned.

Each template in ``tests/chat_templates/`` (as the family's ``tokenizer_config.json`` ships it) is attached
to one tiny byte-level BPE that carries every family's special tokens. For multi-turn chats with a system
prompt, tool calls and reasoning, where the template supports them, the sft DataModule must produce
``apply_chat_template(whole conversation)``'s ids, and its learned tokens must decode to exactly each
assistant message as the template renders it plus its end-of-turn marker. A template that raises, or
would drop something, is one ``DataError`` line naming the file and line of the record.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from modalforge.data.errors import DataError
from modalforge.data.readers import Record
from modalforge.data.tokenizers import train_bpe
from modalforge.errors import format_user_error
from modalforge.text.formats import check_messages
from modalforge.text.tokenize import IGNORE, tokenize_conversation
from modalforge.plugins.text.sft.data import SFTDataModule

TEMPLATES = Path(__file__).parent / "chat_templates"
END = {"deepseek": "<\uff5cend\u2581of\u2581sentence\uff5c>"}

# family: (bos, eos, end-of-turn marker, special tokens, supports: system / tools)
FAMILIES = {
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", ["<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"], {"system", "tools"}),
    "qwen2_5": (None, "<|im_end|>", "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>",
                "</tool_call>"], {"system", "tools"}),
    "qwen3": (None, "<|im_end|>", "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
              "<think>", "</think>", "<tool_response>", "</tool_response>"], {"system", "tools"}),
    "deepseek_r1_distill": ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", END["deepseek"], END["deepseek"],
                            ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", END["deepseek"], "<\uff5cUser\uff5c>",
                             "<\uff5cAssistant\uff5c>"], {"system"}),
    "phi3_5": (None, "<|endoftext|>", "<|end|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
               "<|endoftext|>"], {"system"}),
    "mistral_v0_3": ("<s>", "</s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                     "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], {"tools"}),
    "gemma2": ("<bos>", "<eos>", "<end_of_turn>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], set()),
    "gemma3": ("<bos>", "<eos>", "<end_of_turn>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
               {"system"}),
    "smollm2": (None, "<|im_end|>", "<|im_end|>", ["<|im_start|>", "<|im_end|>"], {"system"}),
    "zephyr": (None, "</s>", "</s>", ["</s>", "<|user|>", "<|assistant|>", "<|system|>"], {"system"}),
}

SYSTEM = {"role": "system", "content": "You answer briefly."}
CHAT = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "It is 7."},
        {"role": "user", "content": "And 2 times 9?"}, {"role": "assistant", "content": "That makes 18."}]
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                           "parameters": {"type": "object", "required": ["expression"],
                                                          "properties": {"expression": {"type": "string"}}}}}]
ARGUMENTS = {"expression": "2*9"}


def tool_chat(arguments: object) -> list[dict]:
    return [{"role": "user", "content": "Use the calculator for 2 times 9."},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call00001", "type": "function", "function": {
                "name": "calculator", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call00001", "content": "result: 18"},
            {"role": "assistant", "content": "The answer is 18."}]


REASONING = [{"role": "user", "content": "What is 3 plus 4?"},
             {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 7."},
             {"role": "user", "content": "And 2 times 9?"},
             {"role": "assistant", "content": "<think>\nmultiply\n</think>\n\nThat makes 18."}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """One tiny BPE with every family's special tokens, saved once per family with its template."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat_templates")
    specials = list(dict.fromkeys(t for f in FAMILIES.values() for t in f[3]))
    texts = [m["content"] for m in CHAT + REASONING + tool_chat("") + [SYSTEM]] + [json.dumps(TOOLS)]
    train_bpe(texts * 4, 400, extra_special_tokens=specials).save_pretrained(str(root / "base"))
    out = {}
    for name, (bos, eos, *_rest) in FAMILIES.items():
        tok = AutoTokenizer.from_pretrained(str(root / "base"))
        if bos:
            tok.bos_token = bos
        tok.eos_token = eos
        tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
        tok.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def learned_spans(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE:
            if current:
                spans.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([tokenizer.decode(current)] if current else [])


def through_sft(path: Path, records: list[dict], tmp_path: Path, **options):
    """The sft DataModule's examples of ``records`` (file order), and its tokenizer."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = SFTDataModule(train=str(data), val=str(data), tokenizer=str(path), chat_template="tokenizer",
                       packing=False, max_length=4096, batch_size=1, num_workers=0, **options)
    dm.setup()
    return [row[0] for row in dm.val_set.rows], dm.processor


def cases(name: str) -> list[tuple[dict, list[str]]]:
    """(record, expected learned text per assistant turn, without the end marker) for one family."""
    supports = FAMILIES[name][4]
    system = [SYSTEM] if "system" in supports else []
    out = [({"messages": system + CHAT}, ["It is 7.", "That makes 18."])]
    if "tools" in supports:
        call = {"llama3_1": '{"name": "calculator", "parameters": {"expression": "2*9"}}',
                "mistral_v0_3": '[TOOL_CALLS] [{"name": "calculator", "arguments": {"expression": "2*9"}, '
                                '"id": "call00001"}]'}.get(
            name, '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*9"}}\n</tool_call>')
        answer = "<think>\n\n</think>\n\nThe answer is 18." if name == "qwen3" else "The answer is 18."
        out.append(({"messages": system + tool_chat(json.dumps(ARGUMENTS)), "tools": TOOLS}, [call, answer]))
    if name == "qwen3":  # earlier reasoning is dropped by the template, the last one is kept
        out.append(({"messages": REASONING}, ["It is 7.", "<think>\nmultiply\n</think>\n\nThat makes 18."]))
        out[0] = (out[0][0], ["It is 7.", "<think>\n\n</think>\n\nThat makes 18."])
    if name == "deepseek_r1_distill":  # the template keeps only what follows </think>
        out.append(({"messages": REASONING}, ["It is 7.", "That makes 18."]))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_published_template_trains_exactly_what_it_renders(name, tokenizers, tmp_path):
    records_and_answers = cases(name)
    examples, tok = through_sft(tokenizers[name], [r for r, _ in records_and_answers], tmp_path)
    assert len(examples) == len(records_and_answers)
    end = FAMILIES[name][2]
    for example, (record, answers) in zip(examples, records_and_answers):
        messages = check_messages(copy.deepcopy(record["messages"]), Record(record, "x", "line 1"))
        reference = tok.apply_chat_template(messages, tools=record.get("tools"), tokenize=True, return_dict=False)
        assert example.input_ids == reference
        spans = learned_spans(tok, example.input_ids, example.labels)
        # Mistral renders " " + answer, DeepSeek "\n\n" + answer: the template's text, learned with the answer
        assert [s.lstrip(" \n") for s in spans] == [a + end for a in answers], name
        if record.get("tools"):  # the tool list reached the template, as prompt
            prompt = tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE])
            assert "Evaluate arithmetic." in prompt and "result: 18" in prompt


@pytest.mark.parametrize("name", ["llama3_1", "qwen2_5", "qwen3", "mistral_v0_3"])
def test_string_and_object_tool_arguments_train_the_same_tokens(name, tokenizers, tmp_path):
    records = [{"messages": tool_chat(json.dumps(ARGUMENTS)), "tools": TOOLS},
               {"messages": tool_chat(ARGUMENTS), "tools": TOOLS}]
    (wire, native), _ = through_sft(tokenizers[name], records, tmp_path)
    assert wire.input_ids == native.input_ids and wire.labels == native.labels


def test_content_parts_are_joined_as_text(tokenizers, tmp_path):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 3 "}, {"type": "text", "text": "plus 4?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "It is 7."}]}]
    plain = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "It is 7."}]
    (a, b), _ = through_sft(tokenizers["qwen2_5"], [{"messages": parts}, {"messages": plain}], tmp_path)
    assert a.input_ids == b.input_ids and a.labels == b.labels
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, plain[1]]
    with pytest.raises(DataError, match=r"chats.jsonl, line 1: messages\[0\] content part 0 is of type 'image_url'"):
        through_sft(tokenizers["qwen2_5"], [{"messages": image}], tmp_path)


@pytest.mark.parametrize(("name", "messages", "message", "hint"), [
    ("gemma2", [SYSTEM] + CHAT, "refused this conversation: System role not supported", "data.system_prompt=fold"),
    ("mistral_v0_3", [CHAT[0], CHAT[2], CHAT[1]], "refused this conversation: After the optional system message, "
                                                  "conversation roles must alternate", "merge consecutive turns"),
    ("mistral_v0_3", [SYSTEM] + CHAT, "drops the system message", "data.system_prompt=fold"),
    ("phi3_5", tool_chat(ARGUMENTS), "message 1: the template does not render this message's tool calls", None),
])
def test_template_errors_are_one_line_naming_the_record(name, messages, message, hint, tokenizers, tmp_path):
    records = [{"messages": CHAT}, {"messages": messages}]
    with pytest.raises(DataError) as info:
        through_sft(tokenizers[name], records, tmp_path)
    lines = format_user_error(info.value)
    assert lines[0].startswith("error: ") and "chats.jsonl, line 2: " in lines[0] and message in lines[0]
    assert "\n" not in lines[0] and len(lines) <= 2
    if hint:
        assert hint in lines[1]


@pytest.mark.parametrize("name", ["gemma2", "mistral_v0_3"])
def test_system_prompt_fold_puts_it_in_the_first_user_turn(name, tokenizers, tmp_path):
    (example,), tok = through_sft(tokenizers[name], [{"messages": [SYSTEM] + CHAT}], tmp_path, system_prompt="fold")
    text = tok.decode(example.input_ids)
    assert "You answer briefly.\n\nWhat is 3 plus 4?" in text
    assert [s.strip() for s in learned_spans(tok, example.input_ids, example.labels)] == [
        "It is 7." + FAMILIES[name][2], "That makes 18." + FAMILIES[name][2]]


def test_generation_blocks_give_the_mask_when_the_template_has_them(tokenizers):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers["smollm2"]))
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                         "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
                         "{% endgeneration %}{{ '\n' }}"
                         "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}")
    example = tokenize_conversation(tok, CHAT)
    assert example.input_ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert learned_spans(tok, example.input_ids, example.labels) == ["It is 7.<|im_end|>", "That makes 18.<|im_end|>"]


def test_chat_template_from_a_jinja_file(tokenizers, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    dm = SFTDataModule(train=str(data), val=str(data), tokenizer=str(tokenizers["smollm2"]), packing=False,
                       chat_template=str(TEMPLATES / "gemma3.jinja"), num_workers=0, batch_size=1)
    dm.setup()
    assert "<start_of_turn>model\nIt is 7.<end_of_turn>" in dm.processor.decode(dm.val_set.rows[0][0].input_ids)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_generation_prompt_that_is_not_how_answers_start_is_said_once(name, tokenizers, caplog, monkeypatch):
    """DeepSeek-R1 prompts with ``<think>\\n`` that its rendered answers never follow; the others agree."""
    import logging

    from transformers import AutoTokenizer

    from modalforge.text import tokenize as tokenize_module
    from modalforge.text.tokenize import generation_prompt_divergence, render, tokenize_prompt

    monkeypatch.setattr(tokenize_module, "_CHECKED", set())
    tok = AutoTokenizer.from_pretrained(str(tokenizers[name]))
    found = generation_prompt_divergence(tok, CHAT[:3], render(tok, CHAT[:3], True))
    if name == "deepseek_r1_distill":
        assert found is not None and found[0].endswith("<\uff5cAssistant\uff5c><think>\n")
        assert found[1].endswith("<\uff5cAssistant\uff5c>")
    else:
        assert found is None
    with caplog.at_level(logging.WARNING, logger="modalforge.text.tokenize"):
        for turns in (CHAT[:1], CHAT[:3]):
            tokenize_prompt(tok, turns)
    warnings = [r for r in caplog.records if "prompts generation with" in r.getMessage()]
    assert len(warnings) == (1 if name == "deepseek_r1_distill" else 0)


def test_llava_onevisions_published_template_is_caught(tokenizers):
    from transformers import AutoTokenizer

    from modalforge.plugins.multimodal.vlm.families import family
    from modalforge.text.tokenize import generation_prompt_divergence, render

    tok = AutoTokenizer.from_pretrained(str(tokenizers["qwen2_5"]))
    tok.chat_template = family("llava_onevision").CHAT_TEMPLATE
    prompted, trained = generation_prompt_divergence(tok, CHAT[:1], render(tok, CHAT[:1], True))
    assert prompted.endswith("<|im_start|>assistant\n") and trained.endswith("<|im_start|>assistant ")


def test_a_generation_block_that_stops_before_the_end_of_turn_still_learns_it(tokenizers):
    """LLaVA-OneVision's published template closes {% generation %} before <|im_end|>: the model must learn to stop."""
    from transformers import AutoTokenizer

    from modalforge.plugins.multimodal.vlm.families import family

    tok = AutoTokenizer.from_pretrained(str(tokenizers["qwen2_5"]))
    tok.chat_template = family("llava_onevision").CHAT_TEMPLATE
    out = tokenize_conversation(tok, CHAT)
    assert out.input_ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert [s.strip() for s in learned_spans(tok, out.input_ids, out.labels)] == [
        "It is 7.<|im_end|>", "That makes 18.<|im_end|>"]
