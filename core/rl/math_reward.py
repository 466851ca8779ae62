"""The built-in reward ``math_verify``: Hugging Face's Math-Verify judges whether the completion's answer equals the
record's reference, symbolically (``\\frac{1}{2}`` = ``0.5`` = ``1/2``; the last ``\\boxed{}`` of a sentence).

Needs the ``math`` extra (``pip install 'modalforge[math]'``): naming the reward without it is one error at load
time. Parsing and comparing are the library's (``math_verify.parse`` / ``verify``), not ours. Scores: 1.0 when
equal, 0.0 when not or when the completion does not parse; ``None`` ("does not apply") when the record's
reference itself does not parse, warned once, so a bad reference does not teach the policy anything.

Math-Verify bounds each parse and comparison with ``signal.alarm``, which works in the main thread only (elsewhere
it raises). So this reward asks the scorer to run it in the calling thread (``main_thread``), where the
training loop calls it, and off the main thread (a caller's own thread) it passes the library's timeouts as
``None`` and says once that nothing bounds a pathological expression there.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

from modalforge.errors import ModalforgeError

log = logging.getLogger(__name__)
INSTALL = "pip install 'modalforge[math]'"
OPTIONS = ("answer_field", "timeout")
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content"}]
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def math_verify(prompts: list[Any], completions: list[Any], answer_field: str = "answer", timeout: int | None = 5,
                **fields: Any) -> list[float | None]:
    """1.0 when Math-Verify finds the completion's answer equal to the record's ``answer_field``, else 0.0."""
    from math_verify import parse, verify

    if fields.get(answer_field) is None:
        raise ModalforgeError(f"reward math_verify needs an {answer_field!r} field in each record (the reference "
                              "answer; set answer_field to read another one)")
    limit = timeout if threading.current_thread() is threading.main_thread() else None
    if timeout and limit is None:
        _warn_once("thread", "reward math_verify runs outside the main thread: Math-Verify's timeouts (signal.alarm) "
                   "are off there, so a pathological expression is not cut short")
    scores: list[float | None] = []
    for completion, reference in zip(completions, fields[answer_field]):
        gold = parse(str(reference), parsing_timeout=limit) if reference is not None else []
        if not gold and reference is not None:  # a bare expression ("x+1"): math mode, as if written $x+1$
            gold = parse(f"${reference}$", parsing_timeout=limit)
        if not gold:
            _warn_once(f"gold:{reference}", "reward math_verify: the reference %r does not parse; its completions "
                       "score None (not counted)", reference)
            scores.append(None)
            continue
        answer = parse(_text(completion), parsing_timeout=limit)  # [] when nothing parses: scores 0
        scores.append(float(bool(answer) and verify(gold, answer, timeout_seconds=limit)))
    return scores


math_verify.main_thread = True  # type: ignore[attr-defined]  # read by rewards.score: signal.alarm timeouts


def math_verify_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check a ``math_verify`` entry at load time: the extra is installed, the options are known."""
    try:
        import math_verify as _  # noqa: F401
    except ImportError:
        raise ModalforgeError(f"{where}: reward math_verify needs the math extra: {INSTALL}") from None
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ModalforgeError(f"{where}: unknown option(s) {unknown} for reward math_verify; valid: "
                              f"{', '.join(OPTIONS)}")
    timeout = options.get("timeout", 5)
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0):
        raise ModalforgeError(f"{where}: reward math_verify's timeout must be whole seconds >= 0 or null (off), "
                              f"got {timeout!r}")
    return {"answer_field": str(options.get("answer_field", "answer")), "timeout": timeout or None}
