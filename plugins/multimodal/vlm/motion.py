"""Offline video demo of the vlm plugin: "Which way does the square move?" over a few frames.

Each clip is a square of a random colour on a grey background, starting at a random place and moving
the same number of pixels per frame left, right, up or down (the answer; balanced). Clips are stored
as lists of PNG frames, so the demo needs no video codec; records are HF/TRL ``messages`` with a
``{"type": "video"}`` part and a ``videos`` list, half with the frames inline in the part instead.
Every clip is drawn for its own record: direction is only learnable from motion, not by memorising.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from modalforge.data.synthetic.shapes import COLOURS
from modalforge.progress import preparing

QUESTION = "Which way does the square move?"
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def draw_clip(direction: str, frames: int, size: int, rng: random.Random) -> list:
    """``frames`` PIL frames of a square moving ``direction`` across a ``size`` x ``size`` field."""
    from PIL import Image, ImageDraw

    side = size // 4
    step = max(1, (size - side) // frames)  # the path spans most of the field: motion crosses token borders
    dx, dy = DIRECTIONS[direction]
    travel = step * (frames - 1)
    # start so that the whole path stays inside the field
    x_lo, x_hi = (travel, size - side) if dx < 0 else (0, size - side - travel) if dx > 0 else (0, size - side)
    y_lo, y_hi = (travel, size - side) if dy < 0 else (0, size - side - travel) if dy > 0 else (0, size - side)
    x, y = rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi)
    grey = rng.randint(90, 170)
    colour = COLOURS[rng.choice(list(COLOURS))]
    clip = []
    for t in range(frames):
        frame = Image.new("RGB", (size, size), (grey, grey, grey))
        left, top = x + dx * step * t, y + dy * step * t
        ImageDraw.Draw(frame).rectangle([left, top, left + side - 1, top + side - 1], fill=colour)
        clip.append(frame)
    return clip


def write_motion_sets(folder: Path, *, num_train: int = 2000, num_val: int = 128, frames: int = 4, size: int = 32,
                      seed: int = 0) -> None:
    """``motion_{train,val}.jsonl`` with each clip's frames under ``clips/<split>/`` (paths relative to ``folder``)."""
    rng = random.Random(seed)
    names = list(DIRECTIONS)
    with preparing("vlm: writing the synthetic motion clips", total=num_train + num_val, unit="clip",
                   cached_in=folder.parent) as progress:
        for split, count in (("train", num_train), ("val", num_val)):
            (folder / "clips" / split).mkdir(parents=True, exist_ok=True)
            records = []
            for n in progress.track(range(count)):
                direction = names[n % len(names)]
                paths = []
                for t, frame in enumerate(draw_clip(direction, frames, size, rng)):
                    rel = f"clips/{split}/{n:05d}-{t}.png"
                    frame.save(folder / rel)
                    paths.append(rel)
                video = {"type": "video", "video": paths} if n % 2 else {"type": "video"}
                record = {"messages": [{"role": "user", "content": [video, {"type": "text", "text": QUESTION}]},
                                       {"role": "assistant", "content": direction}]}
                if not n % 2:
                    record["videos"] = [paths]
                records.append(record)
            (folder / f"motion_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
