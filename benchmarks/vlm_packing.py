"""VLM throughput: modalforge with packing, with padding, and TRL's VLM SFT path, on the same data, in one run.

Prints real text tokens/s (neither padding nor image tokens) of `train plugin=vlm` with
`data.packing=true` and `false` and of TRL's `SFTTrainer` (trl, the optional `bench` extra) with the
same processor and the same tiny model, and the ratios, for one family or all of them (`--family`):
`llava` (the default `LlavaForConditionalGeneration` with a `LlavaProcessor`) and the families'
tiny twins (`model=vlm/<family> model.name_or_path=null`: Qwen2-VL, Gemma 3, Idefics3, LLaVA-OneVision,
each with its own processor class and chat template). TRL gets the model and processor the plugin
builds (its public `build_components` / `build_module`), fresh for every timed run.

Same data on every side: the demo's questions as one question -> one answer per record (TRL's
prompt-completion path learns the completion only, modalforge's chats the assistant turns: with one
turn they are the same tokens). Before timing, one batch of 8 records is collated by both and the
losses are compared (same ids, same loss mask, same image inputs, same loss to 1e-5); a family whose
batches differ is printed with the difference and its TRL side is not timed. TRL refuses packing and
padding-free batches for vision datasets, so its side is always padded. A family whose packed rows
are not exact (`data.packing=true` refused by the plugin) prints 'refused' for packing. The sides
alternate within each repeat.

    python benchmarks/vlm_packing.py --steps 40 --repeats 3
    python benchmarks/vlm_packing.py --family all --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L

import modalforge.run as run_mod
from _common import NO_EXTRAS
from modalforge.config import compose

BATCH, LR = 8, 1e-3
FAMILIES = ("llava", "qwen2_vl", "gemma3", "idefics3", "llava_onevision", "internvl")  # PaliGemma: no chat template for TRL
SIDES = ("packed", "padded", "trl")


def image_token_ids(dm) -> set[int]:  # noqa: ANN001
    """Ids that belong to an image: LLaVA's image token; for a family, every id of one image's expansion
    (Qwen2-VL's vision start/pad/end, Gemma 3's begin/soft/end tokens, Idefics3's fake-token wrappers...)."""
    ids = {dm.processor.image_token_id}
    if dm.images is not None:
        ids |= dm.images.media_token_ids()  # the expansions seen so far
    return ids


def real_tokens(batch: dict, pad_id: int, image_ids: set[int]) -> int:
    """Text tokens that are neither padding nor image tokens."""
    import torch

    ids = batch["input_ids"]
    real = (ids != pad_id) & ~torch.isin(ids, torch.tensor(sorted(image_ids)))
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        real &= mask.bool()
    return int(real.sum())


# ---- data -------------------------------------------------------------------------------------------------------
def single_turn_manifest(folder: Path, records: int) -> Path:
    """The demo's questions, first question and answer of each record, as HF/TRL messages with absolute paths."""
    from modalforge.data.readers import read_records
    from modalforge.plugins.multimodal.vlm.data import VLMDataModule
    from modalforge.plugins.multimodal.vlm.formats import parse_record

    train, _ = VLMDataModule().synthetic_data()
    lines = []
    for record in read_records(train):
        sample = parse_record(record, None, "<image>")
        user = next(m for m in sample.messages if m["role"] == "user")
        answer = next(m for m in sample.messages if m["role"] == "assistant")
        question = user["content"].replace("<image>", "")
        parts = [*({"type": "image"} for _ in sample.images), {"type": "text", "text": question}]
        lines.append({"messages": [{"role": "user", "content": parts},
                                   {"role": "assistant", "content": [{"type": "text", "text": answer["content"]}]}],
                      "images": [ref.path for ref in sample.images]})
        if len(lines) >= records:
            break
    path = folder / "single_turn.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def model_overrides(name: str) -> list[str]:
    """LLaVA: the tiny default with a random tower (trained with the rest, as on the TRL side); a family: its twin."""
    if name == "llava":
        return ["model.warmstart=null"]
    # the preset's frozen tower: frozen on both sides. LLaVA-OneVision's published template learns the answer without
    # <|im_end|> and trains after 'assistant ' but prompts with 'assistant\n' (plugin README): chatml, as its test
    template = ["data.chat_template=chatml"] if name == "llava_onevision" else []
    return [f"model=vlm/{name}", "model.name_or_path=null", *template]


def overrides(name: str, manifest: Path, steps: int, packing: bool) -> list[str]:
    return ["plugin=vlm", *model_overrides(name), f"data.train={manifest}", f"data.val={manifest}",
            f"data.packing={str(packing).lower()}", f"data.batch_size={BATCH}", f"trainer.max_steps={steps}",
            f"optim.lr={LR}", "optim.scheduler=constant", "optim.warmup_steps=0", "optim.weight_decay=0.0",
            "optim.betas=[0.9,0.999]", "seed=0", *NO_EXTRAS]


def build_ours(name: str, manifest: Path, packing: bool = False):  # noqa: ANN201 - (datamodule, objective)
    """The datamodule and objective (model configured, frozen parts frozen) that `train` builds."""
    from modalforge.run import build_components, build_module

    cfg = compose(overrides(name, manifest, 1, packing))
    dm, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    dm.setup()
    objective.connect(dm)
    module.configure_model()
    return dm, objective


def packing_refused(name: str, manifest: Path) -> str | None:
    """The plugin's reason when it refuses ``data.packing=true`` for this family (``None``: it packs)."""
    from modalforge.data.errors import DataError

    try:
        build_ours(name, manifest, packing=True)
    except DataError as err:
        return str(err).splitlines()[0]
    return None


def trl_rows(manifest: Path) -> list[dict]:
    """TRL's conversational prompt-completion rows (images opened)."""
    from PIL import Image

    rows = []
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        user, assistant = record["messages"]
        rows.append({"prompt": [user], "completion": [assistant],
                     "images": [Image.open(p).convert("RGB") for p in record["images"]]})
    return rows


def trl_trainer(dm, model, rows: list[dict], out: str, steps: int, callbacks=()):  # noqa: ANN001, ANN201
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10 ** 6,
                     max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                     adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0, seed=0, bf16=False, fp16=False,
                     dataloader_num_workers=0, max_length=None, packing=False, disable_tqdm=True)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=dm.processor,
                      callbacks=list(callbacks))


# ---- parity -----------------------------------------------------------------------------------------------------
# Why a family's batches differ, where the difference is known (printed with the difference; TRL is then not timed).
REASONS: dict[str, str] = {}  # none known today (LLaVA-OneVision's multi-image rows match since the per-sample expansion)


def _images(batch, key: str):  # noqa: ANN001, ANN202
    """Per-image tensors as one flat list of real images: TRL pads Idefics3's (sample, image) grid with all-zero
    images, modalforge concatenates image by image (the model flattens both and drops all-zero images)."""
    pixels = batch["pixel_values"]
    value = batch[key]
    if pixels.dim() == 5:  # (samples or images, images or tiles, 3, H, W)
        pixels, value = pixels.flatten(0, 1), value.flatten(0, 1)
        real = pixels.flatten(1).abs().sum(1) > 0
        return value[real]
    return value


def _same(theirs, ours, key: str, mask_t, mask_o) -> bool:  # noqa: ANN001
    import torch

    a, b = theirs[key], ours[key]
    if key in ("pixel_values", "pixel_attention_mask") and a.shape != b.shape:
        a, b = _images(theirs, key), _images(ours, key)
    if a.shape != b.shape:
        return False
    if a.shape == theirs["input_ids"].shape:  # a per-token array: padding aside
        a, b = a * mask_t, b * mask_o
    return bool(torch.allclose(a.float(), b.float())) if a.is_floating_point() else bool(torch.equal(a, b))


def _separator_only(theirs, ours, tokenizer) -> str | None:  # noqa: ANN001
    """Whether TRL's loss mask is modalforge's plus one token per row, right after its last learned token (what the
    template renders after the end of turn, e.g. chatml's '\\n' after <|im_end|>): that token, else ``None``."""
    import torch

    learn_t, learn_o = theirs["labels"] != -100, ours["labels"] != -100
    if (learn_o & ~learn_t).any():
        return None
    extra = learn_t & ~learn_o
    tokens = set()
    for r in range(extra.shape[0]):
        at = extra[r].nonzero().flatten().tolist()
        last = learn_o[r].nonzero().flatten().tolist()
        if len(at) != 1 or not last or at[0] != last[-1] + 1:
            return None
        tokens.add(int(theirs["input_ids"][r, at[0]]))
    return repr(tokenizer.decode(sorted(tokens))) if len(tokens) == 1 and torch.any(extra) else None


def parity(name: str, manifest: Path) -> tuple[bool, str]:
    """Both collate the first 8 records; same ids, loss mask, image inputs and loss? (ok, note for the table).

    One difference is allowed and printed: TRL's prompt-completion path learns everything the template renders
    after the prompt, so it also learns the separator after the end-of-turn token (one token per record), which
    modalforge's assistant span stops before. Same ids and inputs, so the same computation; the losses are then
    compared on modalforge's loss mask (TRL's labels without that token), and TRL trains on its own mask."""
    import torch

    from modalforge.data.readers import read_records
    from modalforge.plugins.multimodal.vlm.data import load_image

    dm, objective = build_ours(name, manifest)
    model = objective.model
    rows = trl_rows(manifest)[:BATCH]
    note = ""
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(dm, model, rows, out, 1)
        theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
        examples = [dm.tokenize(dm.parse(r)) for r in list(read_records(str(manifest)))[:BATCH]]
        ours = dm.collate([([e], [load_image(ref, e) for ref in e.images]) for e in examples])
        mask_t, mask_o = theirs["attention_mask"].bool(), ours["attention_mask"].bool()
        keys = sorted((set(theirs) | set(ours)) - {"input_ids", "attention_mask", "labels", "completion_mask"})
        differs = []
        same_ids = (theirs["input_ids"].shape == ours["input_ids"].shape
                    and torch.equal(theirs["input_ids"] * mask_t, ours["input_ids"] * mask_o))
        if not same_ids:
            rows_t = [theirs["input_ids"][r][mask_t[r]].tolist() for r in range(BATCH)]
            rows_o = [ours["input_ids"][r][mask_o[r]].tolist() for r in range(BATCH)]
            bad = [r for r in range(BATCH) if r >= len(rows_t) or rows_t[r] != rows_o[r]]
            differs.append(f"input_ids (records {bad}: {[len(examples[r].images) for r in bad]} images, "
                           f"{[len(rows_t[r]) for r in bad]} ids in TRL's, {[len(rows_o[r]) for r in bad]} in ours)")
        elif not torch.equal(theirs["labels"] != -100, ours["labels"] != -100):
            separator = _separator_only(theirs, ours, dm.tokenizer)
            if separator is None:
                differs.append("loss mask")
            else:
                note = f"TRL also learns {separator} after each end of turn (loss compared on modalforge's mask)"
                print(f"  {name}: loss masks differ by one token per record: {note}")
        differs += [k if k in theirs and k in ours else f"{k} (only {'TRL' if k in theirs else 'modalforge'})"
                    for k in keys if not (k in theirs and k in ours and _same(theirs, ours, k, mask_t, mask_o))]
        if differs:
            print(f"  {name}: the batches differ in {', '.join(differs)}")
            if name in REASONS:
                print(f"  reason: {REASONS[name]}")
            bad = next((r for r in range(BATCH) if not torch.equal(theirs["input_ids"][r][mask_t[r]],
                                                                    ours["input_ids"][r][mask_o[r]])), 0)
            print(f"  record {bad}, TRL then modalforge (image tokens left out):")
            image_ids = image_token_ids(dm)
            for side, batch in (("TRL", theirs), ("modalforge", ours)):
                ids = batch["input_ids"][bad][batch["attention_mask"][bad].bool()].tolist()
                text = dm.tokenizer.decode([i for i in ids if i not in image_ids]).replace("\n", "\\n")
                learned = dm.tokenizer.decode(batch["labels"][bad][batch["labels"][bad] != -100])
                print(f"    {side:10s} {len(ids)} ids: {text[:200]!r} | learned: {learned!r}")
        model.train()
        with torch.no_grad():
            own = float(trainer.compute_loss(model, dict(theirs)))
            if same_ids and not differs:
                theirs = {**theirs, "labels": theirs["labels"].masked_fill(ours["labels"] == -100, -100)}
            trl_loss = float(trainer.compute_loss(model, dict(theirs)))
            our_loss = float(objective._forward(dict(ours)).loss)  # noqa: SLF001 - the training step's loss
    gap = abs(trl_loss - our_loss)
    print(f"  {name}: one batch of {BATCH}: TRL loss {trl_loss:.8f} (on its own mask {own:.8f}), modalforge "
          f"{our_loss:.8f} (|diff| {gap:.1e}); ids and image inputs {'identical' if not differs else 'DIFFER'}",
          flush=True)
    ok = not differs and gap <= 1e-5
    if differs:
        note = f"batches differ in {', '.join(differs)}" + (f": {REASONS[name]}" if name in REASONS else "")
    elif not ok:
        note = f"loss diff {gap:.1e} > 1e-5"
    else:
        note = f"same ids and image inputs, loss diff {gap:.0e}" + (f"; {note}" if note else "")
    return ok, note


# ---- timed runs -------------------------------------------------------------------------------------------------
class RealTokenTimer(L.Callback):
    """Counts text tokens that are neither padding nor image tokens, and their time (first step excluded):
    wall time and this process's CPU time (all threads; less sensitive to other work on a shared machine)."""

    def __init__(self) -> None:
        self.tokens, self.slots, self.start, self.end, self.seen = 0, 0, None, None, 0
        self.cpu_start, self.cpu_end = None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.seen == 1:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen += 1
        if self.seen > 1:
            dm = trainer.datamodule
            self.tokens += real_tokens(batch, dm.tokenizer.pad_token_id, image_token_ids(dm))
            self.slots += batch["input_ids"].numel()
            self.end, self.cpu_end = time.perf_counter(), time.process_time()


def measure_ours(name: str, manifest: Path, packing: bool, steps: int) -> tuple[float, float, float]:
    """(real text tokens/s, share of the batch that is real text, real text tokens per CPU-second)."""
    timer = RealTokenTimer()
    with tempfile.TemporaryDirectory() as tmp:
        run_mod.run(compose(overrides(name, manifest, steps, packing)), tmp, callbacks=[timer])
    return (timer.tokens / (timer.end - timer.start), timer.tokens / max(timer.slots, 1),
            timer.tokens / (timer.cpu_end - timer.cpu_start))


def measure_trl(name: str, manifest: Path, rows: list[dict], steps: int) -> tuple[float, float, float]:
    from transformers import TrainerCallback

    times: list[float] = []
    cpu: list[float] = []
    tokens: list[int] = []
    slots: list[int] = []

    class Steps(TrainerCallback):
        def on_step_end(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            times.append(time.perf_counter())
            cpu.append(time.process_time())

    dm, objective = build_ours(name, manifest)  # the same model and processor as modalforge's side, fresh
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(dm, objective.model, rows, out, steps, callbacks=[Steps()])
        collate = trainer.data_collator

        def counting(examples):  # noqa: ANN001, ANN202 - the i-th batch collated is the i-th step's
            batch = collate(examples)
            tokens.append(real_tokens(batch, dm.tokenizer.pad_token_id, image_token_ids(dm)))
            slots.append(batch["input_ids"].numel())
            return batch

        trainer.data_collator = counting
        trainer.train()
    timed = sum(tokens[1:len(times)])
    return timed / (times[-1] - times[0]), sum(tokens) / max(sum(slots), 1), timed / (cpu[-1] - cpu[0])


def bench_family(name: str, manifest: Path, args: argparse.Namespace) -> dict:
    """One family's figures: {side: [tokens/s per repeat]}, shares, and why a side was not timed."""
    print(f"\n== {name} ==", flush=True)
    notes: dict[str, str] = {}
    refused = packing_refused(name, manifest)
    if refused:
        notes["packed"] = f"refused: {refused}"
        print(f"  packing refused by the plugin: {refused}")
    rows = None
    if args.no_trl:
        notes["trl"] = "not run (--no-trl)"
    else:
        try:
            import trl  # noqa: F401

            ok, why = parity(name, manifest)
            notes["parity"] = why
            if ok:
                rows = trl_rows(manifest)
            else:
                notes["trl"] = "not timed: not the same batch"
                print("  TRL side not timed: the two do not compute the same loss on the same batch")
        except ImportError as err:
            notes["trl"] = f"not timed: {err}"
            print(f"  TRL side not timed: {err} (pip install 'modalforge[bench]')")
        except Exception as err:  # noqa: BLE001 - say why TRL cannot run this, then time the rest
            notes["trl"] = f"TRL error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"  TRL side not timed: {type(err).__name__}: {err}")
    figures: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    share: dict[str, float] = {}
    for i in range(args.repeats):
        parts = []
        for side, packing in (("packed", True), ("padded", False)):
            if side in notes:
                continue
            rate, share[side], per_cpu = measure_ours(name, manifest, packing, args.steps)
            figures[side].append(rate)
            cpu[side].append(per_cpu)
            parts.append(f"{side} {rate:,.0f}")
        if rows is not None:
            try:
                rate, share["trl"], per_cpu = measure_trl(name, manifest, rows, args.steps)
                figures["trl"].append(rate)
                cpu["trl"].append(per_cpu)
                parts.append(f"TRL {rate:,.0f}")
            except Exception as err:  # noqa: BLE001 - TRL trains on one batch but not on many: say so
                notes["trl"] = f"TRL error while training: {type(err).__name__}: {str(err).splitlines()[0]}"
                print(f"  {notes['trl']}")
                rows = None
        print(f"  repeat {i}: " + ", ".join(parts) + " real text tokens/s", flush=True)
    return {"figures": figures, "cpu": cpu, "share": share, "notes": notes}


def paired(figures: dict[str, list[float]], a: str, b: str) -> float | None:
    if not figures[a] or not figures[b]:
        return None
    return statistics.median(x / y for x, y in zip(figures[a], figures[b]))


def report(name: str, result: dict) -> str:
    """Prints one family's figures; returns its table row."""
    figures, cpu, share, notes = result["figures"], result["cpu"], result["share"], result["notes"]
    print(f"\n{name}: text-token share of the batch (the rest: image tokens and padding): "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items()))
    cells = []
    for side in SIDES:
        values = figures[side]
        if values:
            print(f"  {side:7s}: {statistics.median(values):10,.0f} real text tokens/s, "
                  f"{statistics.median(cpu[side]):10,.0f} per CPU-second (medians of {len(values)})")
            cells.append(f"{statistics.median(values):,.0f} ({statistics.median(cpu[side]):,.0f})")
        else:
            print(f"  {side:7s}: {notes.get(side, 'not timed')}")
            cells.append("refused" if notes.get(side, "").startswith("refused") else "—")
    for a, b, what in (("packed", "padded", ""), ("padded", "trl", " (both padded: the framework's own cost)"),
                       ("packed", "trl", "")):
        ratio, per_cpu = paired(figures, a, b), paired(cpu, a, b)
        if ratio is not None:
            print(f"  ratio {a} / {b}: {ratio:.2f}, per CPU-second {per_cpu:.2f}{what} (medians of paired repeats)")
        cells.append("—" if ratio is None else f"{ratio:.2f} ({per_cpu:.2f})")
    rest = [v for k, v in notes.items() if k != "parity"]
    return f"| {name} | " + " | ".join(cells) + f" | {notes.get('parity', '—')} | " + "; ".join(rest) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="llava",
                        help="the tiny LLaVA (default), one family's tiny twin, or all of them one after the other")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", type=int, default=1200)
    parser.add_argument("--no-trl", action="store_true", help="packing vs padding only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every side (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = FAMILIES if args.family == "all" else (args.family,)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = single_turn_manifest(Path(tmp), args.records)
        for name in names:
            table.append(report(name, bench_family(name, manifest, args)))
    print("\nreal text tokens/s (per CPU-second in brackets), medians of repeats; ratios: medians of paired repeats")
    print("| family | packed | padded | TRL | packed / padded | padded / TRL | packed / TRL | parity | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
