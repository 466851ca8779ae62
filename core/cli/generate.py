"""``modalforge generate``: read a trained model's answers from its ``final/`` folder, with nothing but transformers.

Why: after a run the first question is "what does it say now?". The folder is loaded as any user would
(``AutoModelForCausalLM`` + ``AutoTokenizer``, or ``AutoModelForImageTextToText`` + ``AutoProcessor``),
each prompt is rendered with the folder's chat template (``add_generation_prompt``), and generation
stops at EOS or the template's end of turn (:mod:`modalforge.text.stops`, plus the folder's
``generation_config``). Greedy unless ``--temperature`` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from modalforge.errors import ConfigError, ModalforgeError

Kind = Literal["text", "image_text"]


class ModelFolderKindError(ModalforgeError):
    """A folder that holds no text or vision-language model this command can load."""


@dataclass
class Completion:
    """One prompt's answer: the text and the generated token ids (stop token included, when reached)."""

    prompt: str
    text: str
    token_ids: list[int]


def folder_kind(folder: Path) -> Kind:
    """``text`` (a causal LM) or ``image_text`` (an image-text-to-text model), from ``config.json``; else an error naming what is there."""
    if not folder.is_dir():
        raise ModelFolderKindError("does not exist" if not folder.exists() else "is not a folder", where=str(folder),
                                   hint="give a run's final/ folder (or a `modalforge export` folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        adapter = (folder / "adapter_config.json").is_file()
        names = sorted(p.name for p in folder.iterdir())
        found = "a PEFT adapter alone (adapter_config.json)" if adapter else \
            "files " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
        hint = ("`modalforge export <run_dir> --merge-lora` writes full weights" if adapter else
                "generate reads a text (causal LM) or vision-language final/; `modalforge eval` scores any run")
        raise ModelFolderKindError(f"holds no Hugging Face model (no config.json): found {found}", where=str(folder),
                                   hint=hint)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "image_text"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "text"
    try:
        architectures = AutoConfig.from_pretrained(folder).architectures
    except Exception:  # noqa: BLE001 - only names what was found
        architectures = None
    raise ModelFolderKindError(f"holds a {model_type or 'model without model_type'} model "
                               f"({', '.join(architectures or []) or 'no architectures'}), neither a causal LM "
                               "nor an image-text-to-text model", where=str(folder),
                               hint="generate samples from a text or vision-language run's final/")


def _sampling(max_new_tokens: int, temperature: float | None, top_p: float | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": bool(temperature)}
    if temperature:
        kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
    return kwargs


def _stops(model: Any, tokenizer: Any) -> list[int]:
    """EOS, the template's end-of-turn ids, and any the folder's ``generation_config`` lists."""
    from modalforge.text.stops import stop_token_ids

    listed = model.generation_config.eos_token_id
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([*stop_token_ids(tokenizer), *listed]))


def _render(processor: Any, content: Any) -> Any:
    """The chat-templated prompt as model inputs; a tokenizer without a template gets the plain text."""
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt")
    return processor(text=content if isinstance(content, str) else content[-1]["text"], return_tensors="pt")


def generate(folder: str | Path, prompts: Sequence[str], *, max_new_tokens: int = 64, image: str | None = None,
             temperature: float | None = None, top_p: float | None = None) -> list[Completion]:
    """Each prompt's completion from the model in ``folder`` (greedy unless ``temperature``)."""
    import torch

    folder = Path(folder).expanduser()
    kind = folder_kind(folder)
    if kind == "image_text" and not image:
        raise ConfigError("is required for a vision-language model", where="--image",
                          hint=f"modalforge generate {folder} --image photo.png --prompt 'What is in it?'")
    if kind == "text":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        processor = tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(folder)
        tokenizer = processor.tokenizer
        model = AutoModelForImageTextToText.from_pretrained(folder)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    picture = _image(image) if image else None
    results = []
    for prompt in prompts:
        content: Any = prompt if picture is None else [{"type": "image", "image": picture},
                                                       {"type": "text", "text": prompt}]
        inputs = _render(processor, content)
        with torch.no_grad():
            out = model.generate(**inputs, eos_token_id=_stops(model, tokenizer), pad_token_id=pad,
                                 **_sampling(max_new_tokens, temperature, top_p))
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        results.append(Completion(prompt, tokenizer.decode(new, skip_special_tokens=True).strip(), new))
    return results


def _image(path: str) -> Any:
    from PIL import Image

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("does not exist", where=f"--image {path}")
    return Image.open(file).convert("RGB")


def read_prompts(prompt: str | None, file: str | None) -> list[str]:
    """``--prompt`` and/or the non-empty lines of ``--file``; one of them is required."""
    prompts = [prompt] if prompt else []
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ConfigError("does not exist", where=f"--file {file}")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt given", where="--prompt / --file",
                          hint="--prompt 'What is 2+3?' or --file prompts.txt (one prompt a line)")
    return prompts


def main(args: Any) -> None:
    """``modalforge generate`` (arguments from :func:`add_arguments`)."""
    prompts = read_prompts(args.prompt, args.file)
    for c in generate(args.folder, prompts, max_new_tokens=args.max_new_tokens, image=args.image,
                      temperature=args.temperature, top_p=args.top_p):
        print(f"prompt: {c.prompt}\ncompletion: {c.text}\n", flush=True)


def add_arguments(parser: Any) -> None:
    parser.add_argument("folder", help="a run's final/ folder (or a `modalforge export` folder)")
    parser.add_argument("--prompt", default=None, help="one prompt (a user message)")
    parser.add_argument("--file", default=None, help="a text file of prompts, one a line")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per prompt")
    parser.add_argument("--image", default=None, help="an image file (required for a vision-language model)")
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --temperature)")
