"""Environments for multi-turn online RL: what answers the policy between its turns.

An :class:`Environment` is created once per episode (``objective.environment`` names a factory: a class or a
function returning one). The episode starts from the record's prompt plus what ``reset(record)`` returns; then,
turn after turn, the policy writes one assistant message, ``step(message)`` answers with observation messages
(``tool`` or ``user`` turns, appended to the context), a reward for the turn and whether the episode is done.
The episode also ends after ``max_turns`` assistant turns or when its token budget
(``objective.max_episode_tokens``) is spent. The observation tokens are in the context but never in the loss.

:class:`ToolEnvironment` turns plain Python functions into a tool environment: the assistant's tool calls are
parsed (:func:`parse_tool_calls`), each tool is run and its result (or its error, as text) is the ``tool``
message; an assistant turn without a tool call ends the episode (its text is what the rewards score).

    def add(a: int, b: int) -> int:
        \"\"\"Add two numbers.

        Args:
            a: the first number
            b: the second number
        \"\"\"
        return a + b

    def environment():  # objective.environment=my_env.py:environment
        return ToolEnvironment([add], max_turns=3)
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any, Callable, Mapping, Sequence

Message = dict[str, Any]


class Environment:
    """One episode's environment: ``reset`` once, then ``step`` after every assistant turn.

    Attributes:
        max_turns: assistant turns at most (``objective.max_turns`` caps it further when set).
        tools: JSON schemas of the tools (``tokenizer.apply_chat_template(tools=...)``), or ``None``.
        tool_errors: failed tool runs this episode (``train/tool_errors`` adds the calls that could not be parsed);
        tool_calls: the tool calls it ran (``train/tool_calls`` counts the parsed calls itself).
    """

    max_turns: int = 4
    tools: list[dict[str, Any]] | None = None

    def __init__(self) -> None:
        self.tool_calls = 0
        self.tool_errors = 0

    def reset(self, record: Mapping[str, Any]) -> list[Message]:
        """Observation messages to append to the prompt before the first turn (may be empty).

        ``record``: ``prompt`` and ``messages`` (the prompt as messages) and the record's other fields."""
        return []

    def step(self, message: Message) -> tuple[list[Message] | None, float, bool]:
        """(observation messages or None, this turn's reward, done) after one assistant message
        (``{"role": "assistant", "content": str, "tool_calls": [...]}``, ``tool_calls`` when it made any)."""
        raise NotImplementedError


# ---- tool calls ---------------------------------------------------------------------------
#: Hermes / Qwen's form, which the built-in chatml template renders: <tool_call>{"name", "arguments"}</tool_call>
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ToolCallError(ValueError):
    """A tool call that cannot be read (bad JSON, no name): the episode sees it as a tool error."""


def _call(data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
        raise ToolCallError(f"a tool call is a JSON object with a 'name' and 'arguments', got {data!r}")
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ToolCallError(f"the arguments of {data['name']!r} are not JSON: {err}") from None
    if not isinstance(arguments, Mapping):
        raise ToolCallError(f"the arguments of {data['name']!r} must be an object, got {arguments!r}")
    return {"type": "function", "function": {"name": data["name"], "arguments": dict(arguments)}}


def parse_tool_calls(text: str, tokenizer: Any = None) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(content without the calls, tool calls in the chat-template form, errors) of one assistant turn's text.

    A tokenizer with a ``response_schema`` (transformers' ``parse_response``) parses in its template's own format;
    otherwise the Hermes/Qwen form ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` is read (the
    built-in chatml template's; hand-written: a regex and ``json``). A call that cannot be read is an error
    string, not an exception: the episode answers it with an error observation.
    """
    if tokenizer is not None and getattr(tokenizer, "response_schema", None):
        try:
            parsed = tokenizer.parse_response(text)
            calls = [_call(c.get("function", c)) for c in parsed.get("tool_calls") or []]
            return str(parsed.get("content") or ""), calls, []
        except Exception as err:  # noqa: BLE001 - a malformed call is the policy's error, not the run's
            return text, [], [f"could not parse the tool call: {err}"]
    calls, errors = [], []
    for body in TOOL_CALL.findall(text):
        try:
            calls.append(_call(json.loads(body)))
        except json.JSONDecodeError as err:
            errors.append(f"the tool call is not JSON: {err}")
        except ToolCallError as err:
            errors.append(str(err))
    content = TOOL_CALL.sub("", text).strip() if calls or errors else text
    return content, calls, errors


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a function from its signature and Google-style docstring (transformers'
    ``get_json_schema``, what ``apply_chat_template(tools=[fn])`` uses); a bare function gets a minimal one."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception:  # noqa: BLE001 - no docstring / types: name and parameters only
        params = {name: {"type": "string"} for name in inspect.signature(fn).parameters}
        return {"type": "function", "function": {"name": fn.__name__, "description": (fn.__doc__ or "").strip(),
                                                 "parameters": {"type": "object", "properties": params,
                                                                "required": list(params)}}}


class ToolEnvironment(Environment):
    """Plain functions as tools: each tool call is run, its result (``str()``) or error is a ``tool`` message.

    A turn without a tool call ends the episode (reward 0 from the environment: the configured rewards score that
    final answer). ``call_reward``: reward per tool call that ran (0: none; a small bonus can shape early runs).
    """

    def __init__(self, tools: Sequence[Callable[..., Any]], max_turns: int = 4, call_reward: float = 0.0) -> None:
        super().__init__()
        self.functions = {fn.__name__: fn for fn in tools}
        self.tools = [tool_schema(fn) for fn in tools]
        self.max_turns, self.call_reward = max_turns, call_reward

    def run_tool(self, name: str, arguments: Mapping[str, Any]) -> str:
        fn = self.functions.get(name)
        if fn is None:
            raise ToolCallError(f"no tool named {name!r} (tools: {', '.join(self.functions)})")
        return str(fn(**arguments))

    def step(self, message: Message) -> tuple[list[Message] | None, float, bool]:
        calls, errors = message.get("tool_calls") or [], list(message.get("tool_errors") or [])
        if not calls and not errors:
            return None, 0.0, True
        out: list[Message] = [{"role": "tool", "content": f"Error: {e}"} for e in errors]
        reward = 0.0
        for call in calls:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            self.tool_calls += 1
            try:
                result, reward = self.run_tool(name, arguments), reward + self.call_reward
            except Exception as err:  # noqa: BLE001 - a failing tool is an observation, never a dead run
                result = f"Error: {type(err).__name__}: {err}"
                self.tool_errors += 1
            out.append({"role": "tool", "name": name, "content": result})
        return out, reward, False


# ---- loading ------------------------------------------------------------------------------
BUILTIN_ENVIRONMENTS = {"calculator": "modalforge.rl.envs.calculator:CalculatorEnvironment",
                        "python": "modalforge.rl.envs.python:PythonEnvironment",
                        "guess_number": "modalforge.rl.envs.guess_number:GuessNumberEnvironment"}


def load_environment(spec: Any) -> Callable[[], Environment]:
    """``objective.environment``: a built-in name, ``pkg.module:factory``, ``file.py:factory``, or a mapping
    ``{environment: <spec>, **kwargs for the factory}``; returns a zero-argument factory (one call per episode)."""
    import functools
    import importlib

    from modalforge.errors import ModalforgeError
    from modalforge.rl.rewards import _import

    options = dict(spec) if isinstance(spec, Mapping) else {"environment": spec}
    name = str(options.pop("environment", options.pop("name", "")))
    if name in BUILTIN_ENVIRONMENTS:
        module, attr = BUILTIN_ENVIRONMENTS[name].split(":")
        factory = getattr(importlib.import_module(module), attr)
    elif ":" in name:
        factory = _import(name, "objective.environment")
    else:
        raise ModalforgeError(f"objective.environment={name!r}: expected a built-in ({', '.join(BUILTIN_ENVIRONMENTS)}),"
                              " 'pkg.module:factory' or 'path/to/file.py:factory'")
    made = functools.partial(factory, **options)

    def checked() -> Environment:
        env = made()
        if not (hasattr(env, "step") and hasattr(env, "reset")):
            raise ModalforgeError(f"objective.environment={name!r} made {type(env).__name__}, not an Environment "
                                  "(reset(record) and step(message))")
        for counter in ("tool_calls", "tool_errors"):
            if not hasattr(env, counter):
                setattr(env, counter, 0)
        return env

    return checked
