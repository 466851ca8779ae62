"""Generation stops at the chat template's end of turn: in the sample generator and in a run's final/.

The end-of-turn marker is read off each template's rendering (the published templates of
``tests/chat_templates``), so Gemma's ``<end_of_turn>`` and Phi's ``<|end|>`` stop as ChatML's
``<|im_end|>`` does. ``final/generation_config.json`` lists it beside EOS, so plain ``model.generate``
on a chat-tuned ``final/`` stops at the end of the turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.data.tokenizers import train_bpe
from modalforge.text.generate import answer
from modalforge.text.stops import end_of_turn_tokens, set_generation_stops, stop_token_ids
from modalforge.text.templates import SPECIAL_TOKENS, TEMPLATES
from modalforge.run import run

from cli_helpers import FAST

PUBLISHED = Path(__file__).parent / "chat_templates"
DEEPSEEK_END = "<\uff5cend\u2581of\u2581sentence\uff5c>"
# template file: (bos, eos, the end-of-turn marker generation must stop at)
FAMILIES = {
    "llama3_1": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "qwen2_5": (None, "<|endoftext|>", "<|im_end|>"),
    "qwen3": (None, "<|endoftext|>", "<|im_end|>"),
    "deepseek_r1_distill": ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", DEEPSEEK_END, DEEPSEEK_END),
    "phi3_5": (None, "<|endoftext|>", "<|end|>"),
    "mistral_v0_3": ("<s>", "</s>", "</s>"),
    "gemma2": ("<bos>", "<eos>", "<end_of_turn>"),
    "gemma3": ("<bos>", "<eos>", "<end_of_turn>"),
    "smollm2": (None, "<|endoftext|>", "<|im_end|>"),
    "zephyr": (None, "</s>", "</s>"),
}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|eom_id|>", "<|python_tag|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>",
            "</tool_call>", "<think>", "</think>", "<\uff5cbegin\u2581of\u2581sentence\uff5c>", DEEPSEEK_END,
            "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
            "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
TEXTS = ["What is 3 plus 4?", "It is 7.", "And 2 times 9?", "That makes 18.", "Hi there"] * 4


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stops") / "base"
    train_bpe(TEXTS, 300, extra_special_tokens=SPECIALS).save_pretrained(str(folder))
    return folder


def family_tokenizer(base: Path, name: str):  # noqa: ANN201
    from transformers import AutoTokenizer

    bos, eos, _ = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if bos:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.chat_template = (PUBLISHED / f"{name}.jinja").read_text(encoding="utf-8")
    return tokenizer


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_end_of_turn_marker_is_read_off_each_published_template(base, name):
    tokenizer = family_tokenizer(base, name)
    marker = FAMILIES[name][2]
    assert end_of_turn_tokens(tokenizer) == [marker]
    ids = stop_token_ids(tokenizer)
    assert ids[0] == tokenizer.eos_token_id and tokenizer.convert_tokens_to_ids(marker) in ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_builtin_templates_stop_at_their_marker_not_at_a_tool_call_closer(name):
    tokenizer = train_bpe(TEXTS, 300, extra_special_tokens=SPECIAL_TOKENS[name], chat_template=TEMPLATES[name])
    assert end_of_turn_tokens(tokenizer) == [{"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[name]]


def tiny_model(vocab_size: int):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()


def force(model, token_id: int) -> list[int]:  # noqa: ANN001
    """The LM head always prefers ``token_id``; returns a list that counts the forward passes."""
    calls: list[int] = []

    def hook(module, inputs, logits):  # noqa: ANN001, ANN202
        calls.append(1)
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        bias[token_id] = 1e4
        return logits + bias

    model.lm_head.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("name", ["gemma3", "phi3_5", "qwen2_5"])
def test_the_sample_generator_stops_at_gemma_and_phi_markers(base, name):
    tokenizer = family_tokenizer(base, name)
    model = tiny_model(len(tokenizer))
    calls = force(model, tokenizer.convert_tokens_to_ids(FAMILIES[name][2]))
    (text,) = answer(model, tokenizer, [[{"role": "user", "content": "What is 3 plus 4?"}]], max_new_tokens=6)
    assert text == "What is 3 plus 4? -> "
    assert len(calls) == 1  # the marker came first and ended the turn: no second token was asked for


def test_an_existing_eos_list_is_kept_and_extended(base):
    tokenizer = family_tokenizer(base, "llama3_1")
    model = tiny_model(len(tokenizer))
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|eom_id|>")]
    set_generation_stops(model, tokenizer)
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}
    assert set(model.generation_config.eos_token_id) == ids


def test_the_sft_demos_final_stops_at_the_end_of_turn(tmp_path):
    """Plain ``model.generate`` on ``final/``: its generation config ends the turn at ``<|im_end|>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run_dir = tmp_path / "run"
    run(compose(["plugin=sft", *FAST, "trainer.max_steps=2", "trainer.limit_val_batches=0", "logger=none",
                 "callbacks=none", "trainer.enable_progress_bar=false", f"run_dir={run_dir}"]), run_dir)
    final = run_dir / "final"
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = GenerationConfig.from_pretrained(str(final)).eos_token_id
    assert isinstance(eos, list) and end in eos and tokenizer.eos_token_id in eos
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == eos

    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    calls = force(model, end)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == [end] and len(calls) == 1
