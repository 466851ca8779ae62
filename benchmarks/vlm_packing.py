"""VLM throughput: modalforge with packing, with padding, and TRL's VLM SFT path, on the same data, in one run.

Prints real text tokens/s (neither padding nor image tokens) of `train plugin=vlm` with
`data.packing=true` and `false` and of TRL's `SFTTrainer` (trl, the optional `bench` extra) with a
`LlavaProcessor` and the same tiny `LlavaForConditionalGeneration`, and the ratios.

Same data on every side: the demo's questions as one question -> one answer per record (TRL's
prompt-completion path learns the completion only, modalforge's chats the assistant turns: with one
turn they are the same tokens). Before timing, one batch of 8 records is collated by both and the
losses are compared (same ids, same loss mask, same loss to 1e-5). TRL refuses packing and
padding-free batches for vision datasets, so its side is always padded. The three sides alternate.

    python benchmarks/vlm_packing.py --steps 40 --repeats 3
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


def real_tokens(batch: dict, pad_id: int, image_id: int) -> int:
    """Text tokens that are neither padding nor image tokens."""
    ids = batch["input_ids"]
    real = (ids != pad_id) & (ids != image_id)
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


def overrides(manifest: Path, steps: int, packing: bool) -> list[str]:
    return ["plugin=vlm", f"data.train={manifest}", f"data.val={manifest}", f"data.packing={str(packing).lower()}",
            f"data.batch_size={BATCH}", f"trainer.max_steps={steps}", f"optim.lr={LR}", "optim.scheduler=constant",
            "optim.warmup_steps=0", "optim.weight_decay=0.0", "optim.betas=[0.9,0.999]", "seed=0", "model.warmstart=null",
            *NO_EXTRAS]  # a random tower trained with the rest, as on the TRL side


def build_ours(manifest: Path, packing: bool = False):  # noqa: ANN201 - (datamodule, objective)
    from modalforge.run import build_components, build_module

    cfg = compose(overrides(manifest, 1, packing))
    dm, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    dm.setup()
    objective.connect(dm)
    module.configure_model()
    return dm, objective


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
                     dataloader_num_workers=0, max_length=None, packing=False)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=dm.processor,
                      callbacks=list(callbacks))


# ---- parity -----------------------------------------------------------------------------------------------------
def parity(manifest: Path) -> bool:
    """Both collate the first 8 records; same ids, loss mask and loss? Prints what differs."""
    import torch

    from modalforge.data.readers import read_records
    from modalforge.plugins.multimodal.vlm.data import load_image
    from modalforge.plugins.text.sft.objective import token_loss_and_accuracy

    dm, objective = build_ours(manifest)
    model = objective.model
    rows = trl_rows(manifest)[:BATCH]
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(dm, model, rows, out, 1)
        theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
        examples = [dm.tokenize(dm.parse(r)) for r in list(read_records(str(manifest)))[:BATCH]]
        ours = dm.collate([([e], [load_image(ref, e) for ref in e.images]) for e in examples])
        mask_t, mask_o = theirs["attention_mask"].bool(), ours["attention_mask"].bool()
        same = (theirs["input_ids"].shape == ours["input_ids"].shape
                and torch.equal(theirs["input_ids"] * mask_t, ours["input_ids"] * mask_o)
                and torch.equal(theirs["labels"] != -100, ours["labels"] != -100)
                and torch.allclose(theirs["pixel_values"], ours["pixel_values"]))
        if not same:
            print("tokens differ on the first record: TRL ids / loss mask, then modalforge's")
            for batch in (theirs, ours):
                ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
                print("  ", dm.tokenizer.decode(ids).replace(dm.processor.image_token, "")[:160].replace("\n", "\\n"),
                      "| learned:", repr(dm.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])))
        model.train()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(model, dict(theirs)))
            logits = model(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"],
                           attention_mask=ours["attention_mask"]).logits
            our_loss = float(token_loss_and_accuracy(logits, ours["labels"])[0])
    gap = abs(trl_loss - our_loss)
    print(f"one batch of {BATCH}: TRL loss {trl_loss:.8f}, modalforge {our_loss:.8f} (|diff| {gap:.1e}); "
          f"ids, loss mask and pixels {'identical' if same else 'DIFFER'}")
    return same and gap <= 1e-5


# ---- timed runs -------------------------------------------------------------------------------------------------
class RealTokenTimer(L.Callback):
    """Counts text tokens that are neither padding nor image tokens, and their time (first step excluded)."""

    def __init__(self) -> None:
        self.tokens, self.slots, self.start, self.end, self.seen = 0, 0, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.seen == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen += 1
        if self.seen > 1:
            dm = trainer.datamodule
            self.tokens += real_tokens(batch, dm.tokenizer.pad_token_id, dm.processor.image_token_id)
            self.slots += batch["input_ids"].numel()
            self.end = time.perf_counter()


def measure_ours(manifest: Path, packing: bool, steps: int) -> tuple[float, float]:
    """(real text tokens/s, share of the batch that is real text)."""
    timer = RealTokenTimer()
    with tempfile.TemporaryDirectory() as tmp:
        run_mod.run(compose(overrides(manifest, steps, packing)), tmp, callbacks=[timer])
    return timer.tokens / (timer.end - timer.start), timer.tokens / max(timer.slots, 1)


def measure_trl(manifest: Path, rows: list[dict], steps: int) -> tuple[float, float]:
    from transformers import TrainerCallback

    times: list[float] = []
    tokens: list[int] = []
    slots: list[int] = []

    class Steps(TrainerCallback):
        def on_step_end(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            times.append(time.perf_counter())

    dm, objective = build_ours(manifest)  # the same model and processor as modalforge's side, fresh
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(dm, objective.model, rows, out, steps, callbacks=[Steps()])
        collate = trainer.data_collator

        def counting(examples):  # noqa: ANN001, ANN202 - the i-th batch collated is the i-th step's
            batch = collate(examples)
            tokens.append(real_tokens(batch, dm.tokenizer.pad_token_id, dm.processor.image_token_id))
            slots.append(batch["input_ids"].numel())
            return batch

        trainer.data_collator = counting
        trainer.train()
    return sum(tokens[1:len(times)]) / (times[-1] - times[0]), sum(tokens) / max(sum(slots), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", type=int, default=1200)
    parser.add_argument("--no-trl", action="store_true", help="packing vs padding only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = single_turn_manifest(Path(tmp), args.records)
        rows = None
        if not args.no_trl:
            try:
                import trl  # noqa: F401

                rows = trl_rows(manifest)
                if not parity(manifest):
                    print("TRL side not timed: the two do not compute the same loss on the same batch")
                    rows = None
            except ImportError as err:
                print(f"TRL side not timed: {err} (pip install 'modalforge[bench]')")
            except Exception as err:  # noqa: BLE001 - say why TRL cannot run this, then time the rest
                print(f"TRL side not timed: {type(err).__name__}: {err}")
                rows = None
        figures: dict[str, list[float]] = {"packed": [], "padded": [], "trl": []}
        share: dict[str, float] = {}
        for i in range(args.repeats):
            for name, packing in (("packed", True), ("padded", False)):
                rate, share[name] = measure_ours(manifest, packing, args.steps)
                figures[name].append(rate)
            line = f"repeat {i}: packed {figures['packed'][-1]:,.0f}, padded {figures['padded'][-1]:,.0f}"
            if rows is not None:
                rate, share["trl"] = measure_trl(manifest, rows, args.steps)
                figures["trl"].append(rate)
                line += f", TRL {rate:,.0f}"
            print(line + " real text tokens/s", flush=True)
    print("\ntext-token share of the batch (the rest: image tokens and padding): "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items()))
    for name, values in figures.items():
        if values:
            print(f"{name:7s}: {statistics.median(values):10,.0f} real text tokens/s (median of {len(values)})")
    paired = lambda a, b: statistics.median(x / y for x, y in zip(figures[a], figures[b]))  # noqa: E731
    print(f"ratio packed / padded: {paired('packed', 'padded'):.2f} (median of paired repeats)")
    if figures["trl"]:
        print(f"ratio padded / TRL   : {paired('padded', 'trl'):.2f} (both padded: the framework's own cost)")
        print(f"ratio packed / TRL   : {paired('packed', 'trl'):.2f}")


if __name__ == "__main__":
    main()
