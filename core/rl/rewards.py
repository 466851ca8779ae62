"""Rewards are plain Python: ``fn(prompts, completions, **fields) -> list[float | None]``.

A reward is named in ``objective.rewards`` by
- a built-in: ``exact_match`` (the last number of the completion equals the record's ``answer``),
  ``format`` (the completion matches a regex), ``length`` (penalty beyond a target length),
  ``digits`` (share of digit characters: a dense reward for smoke tests), ``overlong`` (DAPO's soft overlong
  punishment, ``overlong.py``), ``math_verify`` (Math-Verify's symbolic answer check against ``answer``; the
  ``math`` extra, ``math_reward.py``);
- an import path ``pkg.module:fn`` or a file path ``path/to/file.py:fn``;
- ``reward_model:/path/to/final``: a ``reward_model`` run's output or any HF sequence classifier;
- ``http://...`` / ``https://...``: a reward server or an OpenAI-compatible judge (``http_reward.py``).

Each entry is a string or a mapping ``{reward: <spec>, weight: 2.0, name: ..., <kwargs for the fn>}``.
The callable receives the prompts (as in the data: string or messages), the completions (strings),
``completion_ids`` and every other field of the records (``answer``...), each a list with one entry
per completion, TRL's convention, so a TRL reward function works unchanged. It returns one float
per completion, or ``None`` where it does not apply. With several rewards, ``score`` calls them in threads, so a
slow one (a server, a judge) overlaps the others; a reward model, or a function with ``main_thread = True``
(``math_verify``: its timeouts are ``signal.alarm``), runs in the calling thread meanwhile.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.rl.http_reward import HttpReward, RewardRequestError
from modalforge.rl.math_reward import math_verify, math_verify_options
from modalforge.rl.overlong import overlong, overlong_options

log = logging.getLogger(__name__)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# ---- built-ins ----------------------------------------------------------------------
def _text(completion: Any) -> str:
    """A completion's text: TRL passes conversational completions as ``[{"role": "assistant", "content"}]``."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def exact_match(prompts: list[Any], completions: list[str], answer: list[Any] | None = None,
                **_: Any) -> list[float | None]:
    """1.0 when the completion's last number equals the record's ``answer`` (numerically), else 0.0."""
    if answer is None:
        raise ModalforgeError("reward exact_match needs an 'answer' field in each record")
    scores: list[float | None] = []
    for completion, expected in zip(completions, answer):
        found = NUMBER.findall(_text(completion))
        try:
            scores.append(float(bool(found) and math.isclose(float(found[-1]), float(expected))))
        except (TypeError, ValueError):
            scores.append(float(bool(found) and found[-1] == str(expected).strip()))
    return scores


def format_reward(prompts: list[Any], completions: list[str], pattern: str = r"^\s*-?\d+\s*$",
                  **_: Any) -> list[float]:
    """1.0 when the whole completion matches ``pattern`` (default: a bare integer)."""
    regex = re.compile(pattern, re.DOTALL)
    return [float(regex.fullmatch(_text(c)) is not None) for c in completions]


def length_penalty(prompts: list[Any], completions: list[str], target: int = 8, scale: float = 8.0,
                   **_: Any) -> list[float]:
    """``-max(0, len(completion) - target) / scale`` (characters): no cost up to ``target``."""
    return [-max(0, len(_text(c)) - target) / scale for c in completions]


def digits(prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
    """Share of the completion's characters that are digits (dense; learnable from a random policy)."""
    texts = [_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


BUILTINS: dict[str, Callable[..., list]] = {"exact_match": exact_match, "format": format_reward,
                                            "length": length_penalty, "digits": digits, "overlong": overlong,
                                            "math_verify": math_verify}


# ---- a reward model is a reward too -------------------------------------------------
class RewardModel(nn.Module):
    """Scores ``prompt + completion`` with an HF sequence classifier (first logit), re-tokenising the text.

    Re-tokenising makes a reward model with another tokenizer than the policy's work; that is said once.
    """

    def __init__(self, path: str, max_length: int = 1024) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # noqa: BLE001
            raise ModalforgeError(f"objective.rewards: reward_model:{path} could not be loaded: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.path, self.max_length = path, max_length

    def check_tokenizer(self, policy_tokenizer: Any) -> None:
        """Say once when the policy's tokenizer differs: the completions' text is re-tokenised."""
        if policy_tokenizer is not None and policy_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            log.warning("reward_model:%s has another tokenizer than the policy: completions are re-tokenised "
                        "as text for it", self.path)

    def _text(self, prompt: Any, completion: str) -> str:
        if isinstance(prompt, list) and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                                      tokenize=False)
        text = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
        return f"{text}{completion}"

    @torch.no_grad()
    def forward(self, prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length).to(device)
        return self.model(**enc).logits[:, 0].float().tolist()


# ---- loading ------------------------------------------------------------------------
@dataclass
class Reward:
    """One reward of the run: its display name, weight and callable (with bound keyword arguments)."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


def _import(spec: str, where: str) -> Callable[..., Any]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModalforgeError(f"{where}={spec!r}: expected a built-in ({', '.join(BUILTINS)}), "
                              "'pkg.module:fn', 'path/to/file.py:fn' or 'reward_model:/path'")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"modalforge_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
        fn = getattr(module, attr)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's to fix
        raise ModalforgeError(f"{where}={spec!r} does not import: {type(err).__name__}: {err}") from None
    if not callable(fn):
        raise ModalforgeError(f"{where}={spec!r} is not callable")
    return fn


def load_rewards(specs: Sequence[Any], weights: Sequence[float] | None = None,
                 max_completion_length: int | None = None) -> list[Reward]:
    """The run's rewards from ``objective.rewards`` (and ``objective.reward_weights``, TRL's name).

    ``max_completion_length``, when given, is ``overlong``'s default ``max_length``.
    """
    if not specs:
        raise ModalforgeError("objective.rewards is empty: name at least one reward (e.g. [exact_match])")
    if weights is not None and len(weights) != len(specs):
        raise ModalforgeError(f"objective.reward_weights has {len(weights)} entries for {len(specs)} rewards")
    rewards = []
    for i, entry in enumerate(specs):
        where = f"objective.rewards[{i}]"
        options = dict(entry) if isinstance(entry, Mapping) else {"reward": entry}
        spec = str(options.pop("reward", options.pop("path", "")))
        weight = float(options.pop("weight", weights[i] if weights is not None else 1.0))
        name = options.pop("name", None)
        if spec in BUILTINS:
            fn, default_name = BUILTINS[spec], spec
            if spec == "overlong":
                options = overlong_options(options, max_completion_length, where)
            elif spec == "math_verify":
                options = math_verify_options(options, where)
        elif spec.startswith(("http://", "https://")):
            fn = HttpReward.from_options(spec, options, name, where)
            default_name, options = fn.name, {}
        elif spec.startswith("reward_model:"):
            path = spec.split(":", 1)[1]
            fn, default_name = RewardModel(path, **options), f"reward_model:{Path(path).name}"
            options = {}
        else:
            fn, default_name = _import(spec, where), spec.rpartition(":")[2]
        rewards.append(Reward(str(name or default_name), fn, weight, options))
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ModalforgeError(f"objective.rewards: two rewards share a name ({names}); give one a 'name'")
    return rewards


def score(rewards: Sequence[Reward], prompts: list[Any], completions: list[str], fields: Mapping[str, list],
          where: Sequence[str]) -> torch.Tensor:
    """``(N, R)`` rewards (NaN where a reward returned ``None``), checked for count and type.

    ``where`` names each completion's record (file and line) for error messages.
    """
    grad = torch.is_grad_enabled()  # grad mode is per thread: the rewards see the caller's

    def call(reward: Reward) -> tuple[Any, Exception | None]:
        try:
            with torch.set_grad_enabled(grad):
                return reward.fn(prompts=prompts, completions=completions, **fields, **reward.kwargs), None
        except Exception as err:  # noqa: BLE001 - raised below, in column order
            return None, err

    # Slow rewards (servers, judges, programs) overlap in threads; results and errors in column order.
    # Reward models stay in this thread, one after another: under FSDP2 their forward all-gathers, and
    # collectives issued from two threads could pair up differently on each rank. So do rewards that say
    # ``main_thread`` (math_verify: signal.alarm works in the main thread only); they run while the others do.
    here = [r for r in rewards if isinstance(r.fn, nn.Module) or getattr(r.fn, "main_thread", False)]
    threaded = [r for r in rewards if all(r is not h for h in here)]
    outcomes_by_id: dict[int, tuple[Any, Exception | None]] = {}
    if len(threaded) > 1 or (threaded and here):
        with ThreadPoolExecutor(max_workers=len(threaded), thread_name_prefix="reward") as pool:
            futures = [(id(r), pool.submit(call, r)) for r in threaded]
            for reward in here:
                outcomes_by_id[id(reward)] = call(reward)
            outcomes_by_id.update((key, future.result()) for key, future in futures)
    for reward in rewards:
        if id(reward) not in outcomes_by_id:
            outcomes_by_id[id(reward)] = call(reward)
    outcomes = [outcomes_by_id[id(r)] for r in rewards]
    columns = []
    for reward, (values, err) in zip(rewards, outcomes):
        if isinstance(err, RewardRequestError):  # a server failed for good: name the records it failed for
            records = [where[i] for i in err.failed]
            raise ModalforgeError(f"{err} (records {records[0]} ... {records[-1]})") from None
        if isinstance(err, ModalforgeError):
            raise err
        if err is not None:  # the user's code: name it, the records and the error
            raise ModalforgeError(f"reward {reward.name!r} raised {type(err).__name__}: {err} "
                                  f"(records {where[0]} ... {where[-1]})") from err
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ModalforgeError(f"reward {reward.name!r} returned {got} value(s) for {len(completions)} "
                                  f"completions; it must return one float (or None) per completion")
        column = []
        for value, record in zip(values, where):
            if value is None:
                column.append(math.nan)
            elif isinstance(value, (int, float)) and not isinstance(value, complex):
                column.append(float(value))
            else:
                raise ModalforgeError(f"reward {reward.name!r} returned {value!r} ({type(value).__name__}) for the "
                                      f"completion of {record}; expected a float or None")
        columns.append(column)
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(completions), len(rewards))


def combine(per_reward: torch.Tensor, rewards: Sequence[Reward]) -> torch.Tensor:
    """Weighted sum over rewards, ignoring ``None`` (NaN); NaN where every reward skipped the completion."""
    weights = torch.tensor([r.weight for r in rewards], dtype=per_reward.dtype)
    total = (per_reward * weights).nansum(1)
    total[torch.isnan(per_reward).all(1)] = math.nan
    return total
