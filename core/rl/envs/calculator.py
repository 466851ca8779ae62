"""``calculator``: one tool that evaluates arithmetic, for the arithmetic demo prompts ("What is 3 plus 4?").

The expression is parsed with :mod:`ast` and only numbers, ``+ - * / // % **`` and unary signs are
evaluated (hand-written: no maintained library evaluates a safe arithmetic subset; ``eval`` is never called).
The demo's words (``plus``, ``minus``, ``times``) are read as their operators.
"""

from __future__ import annotations

import ast
import operator
import re

from modalforge.rl.environment import ToolEnvironment

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_WORDS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/", "x": "*"}
MAX_EXPONENT = 100
MAX_LENGTH = 200


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ``ValueError`` for anything else."""
    text = str(expression)
    if len(text) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    for word, symbol in _WORDS.items():
        text = re.sub(rf"\b{word}\b", symbol, text)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            return _BINARY[type(node.op)](left, right)
        raise ValueError(f"not allowed in an arithmetic expression: {ast.dump(node)[:60]}")

    result = value(tree)
    return int(result) if isinstance(result, float) and result.is_integer() else result


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers with + - * / and parentheses, e.g. "3 + 4"
    """
    return str(evaluate(expression))


class CalculatorEnvironment(ToolEnvironment):
    """The ``calculator`` tool; the episode ends at the first answer without a tool call."""

    def __init__(self, max_turns: int = 3, call_reward: float = 0.0) -> None:
        super().__init__([calculator], max_turns=max_turns, call_reward=call_reward)


# ---- a tool-using warm start for the demo --------------------------------------------------------------------
def tool_conversations(cache_dir: str | None, tool_share: float, label_noise: float, seed: int) -> list[list[dict]]:
    """The arithmetic demo's conversations: a ``tool_share`` of them call the calculator on the question and copy its
    result; the others answer directly, a ``label_noise`` share of those off by one (the warm start's noise)."""
    import random

    from modalforge.rl.prompts import arithmetic_conversations

    rng = random.Random(seed)
    out = []
    for (user, answer) in arithmetic_conversations(cache_dir):
        expression = user["content"].removeprefix("What is ").removesuffix("?")
        if rng.random() < tool_share:
            call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
            out.append([user, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "name": "calculator", "content": calculator(expression)},
                        {"role": "assistant", "content": answer["content"]}])
        else:
            wrong = rng.random() < label_noise
            out.append([user, {"role": "assistant", "content": str(int(answer["content"]) + wrong)}])
    return out


def build_tool_policy(config: dict, sft_steps: int = 800, sft_lr: float = 3e-3, sft_batch_size: int = 64,
                      vocab_size: int = 512, cache_dir: str | None = None, seed: int = 0, tool_share: float = 0.3,
                      sft_label_noise: float = 0.6):  # noqa: ANN201 - a transformers model
    """Model builder (``model=grpo/calculator_sft``): the tiny arithmetic policy SFT'd on demonstrations of which a
    ``tool_share`` call the calculator (:func:`tool_conversations`); built once and cached like the offline default
    (:mod:`modalforge.rl.warmstart`, whose loop it reuses). RL with ``objective.environment=calculator`` can then
    learn to call the tool more often, since its answers are right."""
    import hashlib
    import json

    from transformers import AutoModelForCausalLM

    from modalforge.data.cache import cache_root, ensure_built
    from modalforge.rl.warmstart import sft_policy
    from modalforge.torch_modes import plain_torch

    settings = json.dumps({"config": dict(config), "steps": sft_steps, "lr": sft_lr, "batch": sft_batch_size,
                           "vocab": vocab_size, "seed": seed, "tool_share": tool_share, "noise": sft_label_noise,
                           "v": 1}, sort_keys=True)
    folder = cache_root(cache_dir) / "rl" / f"calculator-policy-{hashlib.sha256(settings.encode()).hexdigest()[:16]}"

    def build(tmp) -> None:  # noqa: ANN001 - a Path
        sft_policy(tmp, "the calculator policy", tool_conversations(cache_dir, tool_share, sft_label_noise, seed),
                   config=config, steps=sft_steps, lr=sft_lr, batch_size=sft_batch_size, vocab_size=vocab_size,
                   cache_dir=cache_dir, seed=seed, meta={"tool_share": tool_share, "label_noise": sft_label_noise})

    if not folder.exists():
        with plain_torch():
            ensure_built(folder, build)
    return AutoModelForCausalLM.from_pretrained(str(folder))
