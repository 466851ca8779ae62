"""The shipped environments (``calculator``, ``python``, ``guess_number``) each run end to end in a short
``train plugin=grpo objective.environment=<name>`` on the tiny offline default; the python tool's limits (time,
memory, output) and crashes are observations, never a dead run."""

from __future__ import annotations

import math

import pytest

from modalforge.config import compose
from modalforge.rl import episodes as episodes_module
from modalforge.rl.envs.python import PythonEnvironment, run_python
from modalforge.run import run

from cli_helpers import FAST, series
from test_rl_environments import QUIET, REAL, SMOKE, scripted


def test_python_runs_code_and_its_failures_are_text():
    assert run_python("print(6 * 7)") == "42"
    assert run_python("while True: pass", timeout=1).startswith("Error: timed out after 1 s")
    runaway = run_python("while True: print('x' * 100)", max_output=500)
    assert runaway.endswith("Error: output longer than 500 bytes, stopped") and len(runaway) < 600
    assert "MemoryError" in run_python("x = bytearray(2 * 1024 ** 3)", memory_mb=256)
    assert "killed by signal SIGABRT" in run_python("import os; os.abort()")
    assert run_python("1 / 0").startswith("Error: exit code 1: ZeroDivisionError")
    env = PythonEnvironment(timeout=1)
    observations, reward, done = env.step({"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "python", "arguments": {"code": "import time; time.sleep(5)"}}}]})
    assert not done and observations[0]["content"].startswith("Error: timed out") and env.tool_errors == 1


def python_call(obj, contexts, max_new_tokens, greedy, real=REAL):
    """First turns call the python tool (one with code that crashes), later turns are the policy's."""
    import json

    tokenizer = obj.datamodule.processor
    out = real(obj, contexts, max_new_tokens, greedy)
    for i, context in enumerate(contexts):
        if tokenizer.decode(context, skip_special_tokens=False).count("<|im_start|>assistant") == 1:
            code = "print(2 + 2)" if i % 2 else "raise SystemExit(3)"
            text = "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + \
                "</tool_call><|im_end|>"
            out[i] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return out


@pytest.mark.parametrize("name", ["calculator", "python", "guess_number"])
def test_shipped_environment_trains_end_to_end(tmp_path, monkeypatch, name):
    overrides = [*SMOKE, *FAST, *QUIET, f"objective.environment={name}", "trainer.max_steps=2",
                 "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "objective.max_completion_length=80"]
    if name == "calculator":  # the tiny warm start never writes a tool call: half of the first turns are scripted
        monkeypatch.setattr(episodes_module, "generate_turns", lambda obj, *a: scripted(obj, 0.5)(obj, *a))
    elif name == "python":
        monkeypatch.setattr(episodes_module, "generate_turns", python_call)
    run(compose(overrides), tmp_path)
    losses = series(tmp_path, "train/loss")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values())
    for key in ("train/turns_per_episode", "train/tool_calls", "train/tool_errors", "train/truncated_episodes"):
        assert len(series(tmp_path, key)) == 2, key
    assert series(tmp_path, "val/reward")
    turns = series(tmp_path, "train/turns_per_episode")
    if name in ("calculator", "python"):
        assert all(v > 1 for v in turns.values()) and all(v > 0 for v in series(tmp_path, "train/tool_calls").values())
    if name == "python":  # the crashing program is a tool error, the run goes on
        assert all(v > 0 for v in series(tmp_path, "train/tool_errors").values())
