"""Offline demo of the vlm plugin: questions about the shapes demo images, with checkable answers.

Built on :mod:`modalforge.data.synthetic.shapes` (its drawing code and captions), one new image per record:

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

from modalforge.data.synthetic.shapes import COLOURS, SHAPES, draw
from modalforge.progress import preparing

QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is this?",
             "count": "How many shapes are there?", "which": "Which of the two images shows a circle?"}


def _count_image(count: int, size: int, rng: random.Random):  # noqa: ANN202 - PIL image
    """``count`` shapes in random cells of a 2x2 grid; empty cells are plain grey like the shapes' own."""
    from PIL import Image

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


def _single(shape: str, size: int, rng: random.Random):  # noqa: ANN202 - (PIL image, colour name, caption)
    """One shape in a random colour, with the shapes demo's caption ("a small red circle on the left")."""
    colour = rng.choice(list(COLOURS))
    image, scale, side = draw(shape, COLOURS[colour], size, rng)
    return image, colour, f"a {scale} {colour} {shape} on the {side}"


def write_vlm_sets(folder: Path, *, num_train: int = 6000, num_val: int = 240, size: int = 32, seed: int = 0) -> None:
    """``questions_{train,val}.jsonl`` and ``captions_{train,val}.jsonl`` (paths relative to ``folder``).

    Every image is drawn for its own record (none is shared between records or splits): a tiny tower
    trained from scratch memorises a small pool of images instead of learning shapes (measured: a probe
    on the shapes demo's 1200 images reaches 0.3-0.6 shape accuracy, on fresh images 0.9). Answers are
    balanced: shapes and counts cycle, the circle is first or second with probability 1/2.
    """
    rng = random.Random(seed)
    others = [s for s in SHAPES if s != "circle"]
    with preparing("vlm: writing the synthetic shapes questions", total=num_train + num_val, unit="record",
                   cached_in=folder.parent) as progress:
        for split, count in (("train", num_train), ("val", num_val)):
            (folder / "images" / split).mkdir(parents=True, exist_ok=True)
            records, captions = [], []

            def save(image, n: int, k: int = 0) -> str:  # noqa: ANN001 - PIL image
                rel = f"images/{split}/{n:05d}-{k}.png"
                image.save(folder / rel)
                return rel

            for n in progress.track(range(count)):
                kind = ("single", "count", "which")[n % 3]
                if kind == "single":  # two questions about one image: the image is encoded once for both answers
                    shape = SHAPES[(n // 3) % len(SHAPES)]
                    image, colour, caption = _single(shape, size, rng)
                    rel = save(image, n)
                    captions.append({"image": rel, "caption": caption})
                    turns = [(QUESTIONS["colour"], colour), (QUESTIONS["shape"], shape)]
                    records.append(_chat([rel], turns if rng.random() < 0.5 else turns[::-1], rng))
                elif kind == "count":
                    number = 1 + (n // 3) % 4
                    records.append(_chat([save(_count_image(number, size, rng), n)], [(QUESTIONS[kind], str(number))],
                                         rng))
                else:
                    first = rng.random() < 0.5
                    shapes = ["circle", rng.choice(others)] if first else [rng.choice(others), "circle"]
                    images = [save(_single(shape, size, rng)[0], n, k) for k, shape in enumerate(shapes)]
                    records.append(_chat(images, [(QUESTIONS[kind], "first" if first else "second")], rng))
            (folder / f"questions_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
            (folder / f"captions_{split}.jsonl").write_text("\n".join(json.dumps(c) for c in captions) + "\n")
