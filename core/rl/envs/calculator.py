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
