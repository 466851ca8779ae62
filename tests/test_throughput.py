"""One definition of throughput for every plugin: input tokens/s, learned tokens/s, samples/s."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modalforge.callbacks.throughput import ThroughputLogger
from modalforge.text.packing import collate_rows, input_token_count
from modalforge.text.tokenize import IGNORE, Tokenized


def _examples():
    # prompt tokens are ignored (IGNORE), the rest is learned
    return [Tokenized(list(range(1, n + 1)), [IGNORE] * (n // 2) + list(range(n // 2 + 1, n + 1)))
            for n in (5, 3, 7, 4)]


def test_input_tokens_are_the_same_padded_or_packed():
    examples = _examples()
    total = sum(len(e) for e in examples)
    padded = collate_rows([[e] for e in examples], pad_id=0, packed=False)
    packed = collate_rows([examples[:2], examples[2:]], pad_id=0, packed=True)  # rows of 8 and 11: one padded
    assert padded["input_ids"].numel() > total and packed["input_ids"].numel() > total
    assert int(input_token_count(padded)) == int(input_token_count(packed)) == total


class _Logger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def test_logger_writes_input_and_learned_tokens_per_second_and_lr_on_logging_steps(monkeypatch):
    clock = iter([0.0, 2.0])  # the window opens at t=0 and closes at t=2
    monkeypatch.setattr("modalforge.callbacks.throughput.time.perf_counter", lambda: next(clock, 2.0))
    logger, module = _Logger(), SimpleNamespace()
    loop = SimpleNamespace(_batches_that_stepped=0)
    groups = [{"lr": 1e-3}, {"lr": 1e-3}]
    trainer = SimpleNamespace(world_size=1, log_every_n_steps=2, fit_loop=SimpleNamespace(epoch_loop=loop),
                              optimizers=[SimpleNamespace(param_groups=groups)], is_global_zero=True, loggers=[logger])
    callback = ThroughputLogger()
    for tokens, learned in ((100, torch.tensor(40)), (torch.tensor(60), 20)):  # ints or 0-d tensors
        module.last_num_tokens, module.last_num_learned_tokens, module.last_batch_size = tokens, learned, 4
        callback.on_train_batch_start(trainer, module, None, 0)
        callback.on_train_batch_end(trainer, module, None, None, 0)
        loop._batches_that_stepped += 1
    ((step, metrics),) = logger.rows  # one row, on the logging step (index 1), as Lightning's own rows
    assert step == 1
    assert metrics == pytest.approx({"train/tokens_per_s": 80.0, "train/learned_tokens_per_s": 30.0,
                                     "train/samples_per_s": 4.0, "train/lr": 1e-3})
    assert callback.progress_bar_metrics == pytest.approx({"train/tokens_per_s": 80.0, "train/lr": 1e-3})
    groups[1]["lr"] = 1e-4  # optim.param_groups with their own rates: one series per group
    callback.on_train_batch_start(trainer, module, None, 0)
    callback._write(trainer, {}, 3)
    assert logger.rows[-1][1] == pytest.approx({"train/lr": 1e-3, "train/lr/group0": 1e-3, "train/lr/group1": 1e-4})
