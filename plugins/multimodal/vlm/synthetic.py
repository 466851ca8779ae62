"""Offline demo of the vlm plugin: questions about the shapes demo images, with checkable answers.

Built on :mod:`modalforge.data.synthetic.shapes` (its images, captions and drawing code):

- "What colour is the shape?" -> ``red`` and "What shape is this?" -> ``circle`` (one image, two turns);
- "How many shapes are there?" -> ``3`` (one image: 1-4 shapes drawn in a 2x2 grid);
- "Which of the two images shows a circle?" -> ``first`` / ``second`` (two images in one conversation).

Records come in every chat format the plugin reads (HF/TRL ``messages`` + ``images``, OpenAI
``image_url`` parts, LLaVA ``image`` + ``conversations``) so the demo also exercises detection.
``captions_{train,val}.jsonl`` (image + caption) serve stage 1.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from modalforge.data.synthetic.shapes import COLOURS, draw, write_shapes

QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is this?",
             "count": "How many shapes are there?", "which": "Which of the two images shows a circle?"}


def _count_image(count: int, size: int, rng: random.Random):  # noqa: ANN202 - PIL image
    """``count`` shapes in random cells of a 2x2 grid; empty cells are plain grey like the shapes' own."""
    from PIL import Image

    from modalforge.data.synthetic.shapes import SHAPES

    half = size // 2
    image = Image.new("RGB", (size, size))
    cells = rng.sample(range(4), count)
    for cell in range(4):
        if cell in cells:
            tile, _, _ = draw(rng.choice(SHAPES), COLOURS[rng.choice(list(COLOURS))], half, rng)
        else:
            grey = rng.randint(90, 170)
            tile = Image.new("RGB", (half, half), (grey, grey, grey))
        image.paste(tile, ((cell % 2) * half, (cell // 2) * half))
    return image


def _chat(images: list[str], turns: list[tuple[str, str]], rng: random.Random) -> dict:
    """A conversation (the images come with the first question) in a randomly chosen record format."""
    style = rng.random()
    if style < 0.45:  # HF / TRL
        messages = []
        for k, (question, answer) in enumerate(turns):
            parts = [{"type": "image"} for _ in images] if k == 0 else []
            messages += [{"role": "user", "content": [*parts, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return {"messages": messages, "images": images}
    if style < 0.7:  # OpenAI image_url parts
        messages = []
        for k, (question, answer) in enumerate(turns):
            parts = [{"type": "image_url", "image_url": {"url": p}} for p in images] if k == 0 else []
            messages += [{"role": "user", "content": [*parts, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]
        return {"messages": messages}
    conversations = []
    for k, (question, answer) in enumerate(turns):  # LLaVA
        conversations += [{"from": "human", "value": ("<image>" * len(images) if k == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
    return {"image": images[0] if len(images) == 1 else images, "conversations": conversations}


def write_vlm_sets(folder: Path, *, num_train: int = 3000, num_val: int = 160, size: int = 32, seed: int = 0) -> None:
    """``questions_{train,val}.jsonl`` and ``captions_{train,val}.jsonl`` (paths relative to ``folder``)."""
    rng = random.Random(seed)
    write_shapes(folder / "shapes", num_train=1200, num_val=240, size=size, seed=seed)
    for split, count in (("train", num_train), ("val", num_val)):
        singles = [json.loads(line) for line in (folder / "shapes" / f"{split}.jsonl").read_text().splitlines()]
        for item in singles:
            item["image"] = f"shapes/{item['image']}"
        captions = [{"image": s["image"], "caption": s["caption"]} for s in singles]
        (folder / f"captions_{split}.jsonl").write_text("\n".join(json.dumps(c) for c in captions) + "\n")
        circles = [s for s in singles if s["label"] == "circle"]
        others = [s for s in singles if s["label"] != "circle"]
        (folder / "count" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for n in range(count):
            kind = ("single", "count", "which")[n % 3]
            if kind == "single":  # two questions about one image: the image is encoded once for both answers
                item = rng.choice(singles)
                colour = next(word for word in item["caption"].split() if word in COLOURS)
                turns = [(QUESTIONS["colour"], colour), (QUESTIONS["shape"], item["label"])]
                records.append(_chat([item["image"]], turns if rng.random() < 0.5 else turns[::-1], rng))
            elif kind == "count":
                number = rng.randint(1, 4)
                rel = f"count/{split}/{n:05d}.png"
                _count_image(number, size, rng).save(folder / rel)
                records.append(_chat([rel], [(QUESTIONS[kind], str(number))], rng))
            else:
                pair = [rng.choice(circles)["image"], rng.choice(others)["image"]]
                first = rng.random() < 0.5
                images = pair if first else pair[::-1]
                records.append(_chat(images, [(QUESTIONS[kind], "first" if first else "second")], rng))
        (folder / f"questions_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
