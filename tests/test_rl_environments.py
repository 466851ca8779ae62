"""Multi-turn environments (``objective.environment``): tool-call parsing, episodes whose environment tokens are
context but never in the loss (their gradient is exactly zero), per-turn rewards, metrics, runs that finish and
resume exactly mid-rollout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modalforge.config import compose
from modalforge.errors import ModalforgeError
from modalforge.rl import Environment, ToolEnvironment, parse_tool_calls
from modalforge.rl import episodes as episodes_module
from modalforge.run import run

from cli_helpers import FAST, series
from tiny_models import built_objective

SMOKE = ["plugin=grpo", "data.batch_size=2", "objective.num_generations=2", "objective.beta=0",
         "optim.warmup_steps=0", "objective.max_completion_length=6"]
REAL = episodes_module.generate_turns  # the policy's own turns, before any test patches them
QUIET = ["trainer.enable_progress_bar=false", "callbacks=none", "checkpoint.export_on_end=false"]


def call_text(expression: str) -> str:
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + \
        "</tool_call><|im_end|>"


def scripted(objective, tool_share=1.0):
    """A policy whose first turn calls the calculator on the question (in ``tool_share`` of the contexts, by
    position) and whose later turns are the real policy's: episodes with tool calls on the tiny warm start."""
    tokenizer, real = objective.datamodule.processor, REAL

    def generate(obj, contexts, max_new_tokens, greedy):
        out = real(obj, contexts, max_new_tokens, greedy)
        for i, context in enumerate(contexts):
            text = tokenizer.decode(context, skip_special_tokens=False)
            if text.count("<|im_start|>assistant") == 1 and (i % 2 == 0 or tool_share >= 1):
                question = text.rsplit("What is ", 1)[-1].split("?")[0]
                out[i] = tokenizer(call_text(question), add_special_tokens=False)["input_ids"]
        return out

    return generate


def test_tool_calls_parse_in_the_hermes_form_and_errors_are_text():
    content, calls, errors = parse_tool_calls('I will add. <tool_call>{"name": "calculator", "arguments": '
                                              '{"expression": "2 + 3"}}</tool_call>')
    assert content == "I will add." and not errors
    assert calls == [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}}]
    assert parse_tool_calls("7") == ("7", [], [])
    _, calls, errors = parse_tool_calls("<tool_call>{not json</tool_call>")
    assert not calls and "not JSON" in errors[0]
    _, calls, errors = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')
    assert not calls and "'name'" in errors[0]
    _, calls, _ = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert calls[0]["function"]["arguments"] == {"x": 1}  # OpenAI's arguments-as-a-string


def test_calculator_is_safe_arithmetic():
    from modalforge.rl.envs.calculator import calculator, evaluate

    assert calculator("3 plus 4") == "7" and calculator("2 * (3 - 1)") == "4" and evaluate("7 / 2") == 3.5
    for bad in ("__import__('os').system('true')", "x + 1", "2 ** 10000", "[1] * 3", "open('f')"):
        with pytest.raises(ValueError):
            evaluate(bad)
    env = ToolEnvironment([calculator])
    observations, reward, done = env.step({"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1 +"}}},
        {"type": "function", "function": {"name": "nope", "arguments": {}}}]})
    assert not done and reward == 0 and env.tool_errors == 2 and env.tool_calls == 2
    assert all(o["role"] == "tool" and o["content"].startswith("Error:") for o in observations)
    assert env.step({"role": "assistant", "content": "7"}) == (None, 0.0, True)
    assert env.tools[0]["function"]["name"] == "calculator"  # transformers' get_json_schema from the docstring


def test_guess_number_gives_feedback_and_a_smaller_second_reward():
    from modalforge.rl.envs.guess_number import GuessNumberEnvironment

    env = GuessNumberEnvironment()
    assert env.reset({"prompt": "What is 2 plus 3?", "answer": "5"}) == []
    observations, reward, done = env.step({"role": "assistant", "content": "4"})
    assert observations == [{"role": "user", "content": "Higher."}] and reward == 0 and not done
    assert env.step({"role": "assistant", "content": "5"}) == (None, 0.5, True)
    env.reset({"prompt": "guess", "answer": None})
    assert env.step({"role": "assistant", "content": str(env.secret)}) == (None, 1.0, True)


def test_episode_appends_tool_turns_masked_out_of_the_loss(monkeypatch):
    objective, batch = built_objective([*SMOKE, "objective.environment=calculator",
                                         "objective.max_completion_length=64"])
    monkeypatch.setattr(episodes_module, "generate_turns", scripted(objective))
    objective._rollout = rollout = objective._new_rollout(batch)
    tokenizer, metrics = objective.datamodule.processor, objective._rollout_metrics
    assert metrics["turns_per_episode"] == 2 and metrics["tool_calls"] == 1 and metrics["tool_errors"] == 0
    for i in range(len(rollout)):
        ids, attention = rollout.completion_ids[i], rollout.attention_mask[i].bool()
        learned = rollout.completion_mask[i].bool()
        env_text = tokenizer.decode(ids[attention & ~learned], skip_special_tokens=False)
        result = batch["fields"][i // 2]["answer"]
        assert env_text == f"\n<|im_start|>tool\n{result}<|im_end|>\n<|im_start|>assistant\n"
        assert tokenizer.decode(ids[learned], skip_special_tokens=False).startswith("<tool_call>")
        assert (learned <= attention).all()

    # the gradient of the loss w.r.t. the hidden states that predict the environment's tokens is exactly zero;
    # the generated tokens' is not (advantages set apart from zero)
    hidden = {}
    norm = objective.model.model.norm

    def keep(module, inputs, output):
        output.retain_grad()
        hidden["h"] = output

    handle = norm.register_forward_hook(keep)
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = objective._loss(rollout)
    loss.backward()
    handle.remove()
    grad = hidden["h"].grad  # (N, P + T, H): position k predicts token k + 1
    start = rollout.prompt_ids.shape[1] - 1
    predicting = grad[:, start:start + rollout.completion_ids.shape[1]].abs().sum(-1)
    env = rollout.attention_mask.bool() & ~rollout.completion_mask.bool()
    assert env.any() and (predicting[env] == 0).all()
    assert (predicting[rollout.completion_mask.bool()] > 0).all()


def test_per_turn_rewards_add_to_the_configured_ones(monkeypatch):
    objective, batch = built_objective([*SMOKE, "objective.environment=guess_number", "objective.rewards=[format]"])
    answers = [int(f["answer"]) for f in batch["fields"]]
    tokenizer = objective.datamodule.processor

    def generate(obj, contexts, max_new_tokens, greedy):  # wrong first (too low), right second
        out = []
        for i, context in enumerate(contexts):
            turn = tokenizer.decode(context, skip_special_tokens=False).count("<|im_start|>assistant")
            guess = answers[i // 2] - 1 if turn == 1 else answers[i // 2]
            out.append(tokenizer(f"{guess}<|im_end|>", add_special_tokens=False)["input_ids"])
        return out

    monkeypatch.setattr(episodes_module, "generate_turns", generate)
    _, total, truncated, metrics = objective._sample(batch)
    # format (a bare integer: 1) + guess_number's second-turn reward (0.5)
    assert total.tolist() == [1.5] * 4 and not truncated.any() and metrics["turns_per_episode"] == 2


def test_budget_and_turn_limits_truncate_episodes(monkeypatch):
    objective, batch = built_objective([*SMOKE, "objective.environment=calculator", "objective.max_turns=1",
                                "objective.max_completion_length=64"])
    monkeypatch.setattr(episodes_module, "generate_turns", scripted(objective))
    rollout, _, truncated, metrics = objective._sample(batch)
    assert truncated.all() and metrics["truncated_episodes"] == 1 and (rollout.completion_mask == 1).all()
    objective, batch = built_objective([*SMOKE, "objective.environment=calculator", "objective.max_episode_tokens=64",
                                "objective.max_completion_length=64"])
    monkeypatch.setattr(episodes_module, "generate_turns", scripted(objective))
    rollout, _, truncated, _ = objective._sample(batch)
    assert truncated.all() and rollout.attention_mask.sum(1).max() <= 64


def test_options_are_checked():
    with pytest.raises(ModalforgeError, match="objective.environment='nope'"):
        built_objective([*SMOKE, "objective.environment=nope"])
    with pytest.raises(ModalforgeError, match="does not import"):
        built_objective([*SMOKE, "objective.environment=no_such_module:factory"])


class Echo(Environment):
    """A user-written environment: repeats the turn once, then ends with a reward of 0.25."""

    max_turns = 3

    def step(self, message):
        self.turns = getattr(self, "turns", 0) + 1
        return ([{"role": "user", "content": "again"}], 0.0, False) if self.turns < 2 else (None, 0.25, True)


def echo():
    return Echo()


def run_overrides(env: str, steps: int) -> list[str]:
    return [*SMOKE, *FAST, *QUIET, f"objective.environment={env}", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=null", "trainer.limit_val_batches=1", "objective.rewards=[exact_match]"]


def test_a_file_environment_runs_and_resumes_mid_rollout_exactly(tmp_path):
    common = [*run_overrides(f"{__file__}:echo", 4)[:-4], "trainer.val_check_interval=null",
              "trainer.limit_val_batches=0", "objective.num_iterations=2", "objective.steps_per_generation=2",
              "checkpoint.every_n_train_steps=3"]
    _, straight, _ = run(compose([*common, "trainer.max_steps=6"]), tmp_path / "a")
    run(compose([*common, "trainer.max_steps=3"]), tmp_path / "b")  # stops at step 3 of 4 of the first rollout
    _, resumed, _ = run(compose([*common, "trainer.max_steps=6", "ckpt_path=last"]), tmp_path / "b")
    a, b = series(tmp_path / "a", "train/loss"), series(tmp_path / "b", "train/loss")
    assert len(a) == 6 and [a[s] for s in sorted(a)] == pytest.approx([b[s] for s in sorted(b)], abs=1e-6)
    assert set(series(tmp_path / "a", "train/turns_per_episode").values()) == {2.0}
    for (name, x), (_, y) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, msg=name)


def test_the_readme_tool_environment_works_as_written(tmp_path):
    from pathlib import Path

    from modalforge.rl.environment import load_environment

    readme = (Path(__file__).parents[1] / "plugins" / "text" / "grpo" / "README.md").read_text()
    code = readme.split("```python\n# my_tools.py\n", 1)[1].split("```", 1)[0]
    assert len(code.splitlines()) < 40
    (tmp_path / "my_tools.py").write_text(code)
    env = load_environment(f"{tmp_path / 'my_tools.py'}:environment")()
    _, calls, _ = parse_tool_calls('<tool_call>{"name": "multiply", "arguments": {"a": 6, "b": 7}}</tool_call>')
    observations, _, done = env.step({"role": "assistant", "content": "", "tool_calls": calls})
    assert observations[0]["content"] == "42" and not done
    assert env.tools[0]["function"]["parameters"]["properties"]["a"]["type"] == "number"


def test_tool_demonstrations_render_as_parsable_calls():
    from modalforge.rl.envs.calculator import tool_conversations
    from modalforge.rl.prompts import arithmetic_tokenizer
    from modalforge.text.tokenize import render

    tokenizer = arithmetic_tokenizer(None)
    conversations = tool_conversations(None, tool_share=0.5, label_noise=0.6, seed=0)
    with_tool = next(c for c in conversations if len(c) == 4)
    text = render(tokenizer, with_tool[:2]).split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    _, calls, errors = parse_tool_calls(text)
    assert not errors and calls == with_tool[1]["tool_calls"]
    assert 0.4 < sum(len(c) == 4 for c in conversations) / len(conversations) < 0.6
