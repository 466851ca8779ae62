"""Coloured shapes with labels and captions: the offline demo set of the vision plugins.

Each image is one shape (circle, square, triangle, cross, ring, bar) in one colour on
a random-grey background, at a random position and size, with a little noise. Labels
(the shape) make a classification task; captions ("a small red circle on the left")
make an image-text task whose retrieval is learnable but not trivial.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from modalforge.progress import preparing

SHAPES = ["circle", "square", "triangle", "cross", "ring", "bar"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30)}


def draw(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random):  # noqa: ANN201 - PIL image
    """One ``size`` x ``size`` RGB image of ``shape``; returns (image, "small"/"large", "left"/"right")."""
    from PIL import Image, ImageDraw

    grey = rng.randint(90, 170)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    large = rng.random() < 0.5
    radius = int(size * (rng.uniform(0.28, 0.36) if large else rng.uniform(0.14, 0.2)))
    left = rng.random() < 0.5
    cx = int(size * (rng.uniform(0.3, 0.42) if left else rng.uniform(0.58, 0.7)))
    cy = int(size * rng.uniform(0.35, 0.65))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif shape == "cross":
        w = max(1, radius // 3)
        pen.rectangle((cx - radius, cy - w, cx + radius, cy + w), fill=colour)
        pen.rectangle((cx - w, cy - radius, cx + w, cy + radius), fill=colour)
    elif shape == "ring":
        pen.ellipse(box, outline=colour, width=max(2, radius // 3))
    else:  # bar
        pen.rectangle((cx - radius, cy - radius // 3, cx + radius, cy + radius // 3), fill=colour)
    for _ in range(size):  # speckle noise so the task is not pixel-exact
        x, y = rng.randrange(size), rng.randrange(size)
        g = rng.randint(60, 200)
        image.putpixel((x, y), (g, g, g))
    return image, ("large" if large else "small"), ("left" if left else "right")


def write_shapes(folder: Path, *, num_train: int = 1800, num_val: int = 360, size: int = 32, seed: int = 0) -> None:
    """Write ``<split>/<shape>/<n>.png`` (ImageFolder layout) and ``<split>.jsonl`` manifests.

    Each manifest line: ``{"image": "<split>/<shape>/<n>.png", "label": "<shape>", "caption": "..."}``
    with paths relative to ``folder``.
    """
    rng = random.Random(seed)
    with preparing("writing the synthetic shapes demo", total=num_train + num_val, unit="image",
                   cached_in=folder.parent) as progress:
        for split, count in (("train", num_train), ("val", num_val)):
            lines = []
            for n in progress.track(range(count)):
                shape = SHAPES[n % len(SHAPES)]
                colour_name = rng.choice(list(COLOURS))
                image, scale, side = draw(shape, COLOURS[colour_name], size, rng)
                rel = Path(split) / shape / f"{n:05d}.png"
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                image.save(folder / rel)
                caption = f"a {scale} {colour_name} {shape} on the {side}"
                lines.append(json.dumps({"image": rel.as_posix(), "label": shape, "caption": caption}))
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
