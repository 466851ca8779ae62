"""What the vlm family tests share: the two-colour squares manifest, a family twin's overrides, built components."""

from __future__ import annotations

import json
from pathlib import Path

from modalforge.config import compose
from modalforge.plugins.multimodal.vlm.families import family
from modalforge.run import build_components, build_module

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
FAST = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0", "logger=csv", "module.num_samples=0"]


def write_colour_manifest(root: Path, count: int = 32) -> Path:
    """Squares of two colours in two sizes (dynamic-resolution families see two token counts), as chats."""
    from PIL import Image

    lines = []
    for i in range(count):
        name = list(COLOURS)[i % 2]
        size = (32, 32) if i % 4 < 2 else (48, 32)
        path = root / f"{i}.png"
        Image.new("RGB", size, COLOURS[name]).save(path)
        lines.append({"images": [str(path)], "messages": [
            {"role": "user", "content": "<image>What colour is it?"}, {"role": "assistant", "content": name}]})
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    return root / "train.jsonl"


def family_overrides(name: str, manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    """A family's tiny twin on ``manifest`` (train and val), packed where the family packs exactly."""
    packing = str(family(name).PACKING).lower()
    return ["plugin=vlm", f"model=vlm/{name}", "model.name_or_path=null", f"data.train={manifest}",
            f"data.val={manifest}", "data.vocab_size=300", "data.batch_size=4", f"data.packing={packing}",
            "data.num_eval_questions=4", "data.max_length=256", f"run_dir={run_dir}", *FAST, *extra]


def setup_components(overrides: list[str]):  # noqa: ANN201 - (datamodule, objective)
    """The datamodule (set up) and objective (connected, model configured) a run of ``overrides`` builds."""
    cfg = compose(overrides)
    dm, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    dm.setup()
    objective.connect(dm)
    module.configure_model()
    return dm, objective
