"""Preference records as published, normalised to (prompt, chosen, rejected) message lists.

Formats (detected per record by their fields; two at once is an error):

- ``pairs``: ``chosen`` / ``rejected``, with or without ``prompt``:
  - explicit: ``prompt`` + completions (strings or message lists);
  - shared turns (UltraFeedback-binarized): ``chosen`` / ``rejected`` are whole conversations
    that share the prompt turns; the shared turns are the prompt (a ``prompt`` string beside
    them must be one of their user turns) and are never trained;
  - implicit prompt (Anthropic HH-RLHF): strings of ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns;
    the longest common prefix ending at the last ``\\n\\nAssistant:`` is the prompt (as TRL's
    ``extract_prompt``), parsed into messages;
- ``shp``: Stanford SHP, ``history`` + ``human_ref_A`` / ``human_ref_B`` + ``labels`` (1: A preferred);
- ``ranked``: ``prompt`` + ``responses`` (k completions) + ``scores`` (higher is better) or ``ranks``
  (1 is best): the best/worst pair, or every ordered pair (``all``).

A completion never contains a user turn: a pair whose conversations part before the last
user turn is refused rather than trained on the user's words.

Empty values / truncated media / duplicates / mixed types: a ``null`` or blank completion
(chosen, rejected, a response) is an error naming the record; a blank prompt is kept. A pair whose
chosen and rejected are the same (in any format, ranked ties included) is an error: there is no
preference to learn. Repeated and contradicting pairs across records are kept and counted by
:class:`~modalforge.text.preference_data.PreferenceDataModule`. A number where text belongs is an
error; SHP's ``labels`` must be 0/1 and scores/ranks numbers. No media here.
"""

from __future__ import annotations

import re
from itertools import combinations
from typing import Any, Literal

from modalforge.data.errors import DataError
from modalforge.data.readers import Record, require_fields
from modalforge.text.formats import Message, as_messages, check_messages

PREFERENCE_FORMATS = ("pairs", "shp", "ranked")
_SIGNATURES = {"pairs": ("chosen", "rejected"), "shp": ("human_ref_A", "human_ref_B"), "ranked": ("responses",)}
RankedPairs = Literal["best_worst", "all"]
#: (prompt, chosen, rejected)
Pair = tuple[list[Message], list[Message], list[Message]]
_TURN = re.compile(r"\n\n(Human|Assistant):")
ASSISTANT_MARK = "\n\nAssistant:"


def preference_format(record: Record) -> str:
    """The record's preference format; none or several is one error naming the record."""
    found = [name for name, keys in _SIGNATURES.items() if any(k in record.data for k in keys)]
    keys = sorted(k for k in record.data if not k.startswith("__"))
    if not found:
        raise DataError("record fits none of the preference formats: pairs (prompt?/chosen/rejected), "
                        "shp (history/human_ref_A/human_ref_B/labels), ranked (prompt/responses/scores|ranks); "
                        f"keys present: {keys}", source=record.source, location=record.location,
                        hint="data.columns= maps other field names, e.g. {chosen: preferred, rejected: other}")
    if len(found) > 1:
        raise DataError(f"record fits the preference formats {' and '.join(found)} ambiguously (keys present: "
                        f"{keys})", source=record.source, location=record.location,
                        hint="drop the other fields, or map one set with data.columns=")
    return found[0]


def _fail(record: Record, message: str, hint: str | None = None) -> DataError:
    return DataError(message, source=record.source, location=record.location, hint=hint)


def _field(record: Record, field: str, role: str) -> list[Message]:
    return check_messages(as_messages(record.data[field], role, record, field), record, need_assistant=False,
                          field=field)


def _completion(messages: list[Message], record: Record, field: str) -> list[Message]:
    """A completion: assistant (and tool) turns only, starting with the assistant's."""
    if not messages or messages[0]["role"] != "assistant":
        raise _fail(record, f"'{field}' does not start with an assistant turn after the prompt")
    if any(m["role"] in ("user", "system") for m in messages):
        raise _fail(record, f"'{field}' differs from the other completion before its last user turn: the "
                            "completion would train the user's words", "keep only pairs that share every turn but "
                                                                         "the last answer")
    return messages


def parse_hh(text: str, record: Record, field: str) -> list[Message]:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` as messages (text before the first turn is refused)."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise _fail(record, f"'{field}' has text before its first '\\n\\nHuman:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def implicit_prompt(chosen: str, rejected: str, record: Record) -> Pair:
    """HH-RLHF: the prompt is the common prefix up to its last ``\\n\\nAssistant:``; the rest are the answers."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT_MARK, 0, common)  # the last marker wholly inside the shared prefix
    if cut < 0:
        raise _fail(record, "no 'prompt' field, and chosen/rejected share no '\\n\\nHuman: ... \\n\\nAssistant:' "
                            "prefix to take the prompt from", "give a 'prompt' field (or map one with data.columns=)")
    end = cut + len(ASSISTANT_MARK)
    prompt = parse_hh(chosen[:cut], record, "chosen")
    if not prompt or prompt[-1]["role"] != "user":
        raise _fail(record, "the shared prefix of chosen/rejected does not end with a Human turn")
    completions = []
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        rest = text[end:]
        if _TURN.search(rest):
            raise _fail(record, f"'{field}' differs from the other completion before its last Human turn: the "
                                "completion would train the user's words")
        if not rest.strip():
            raise _fail(record, f"'{field}' has an empty answer after the prompt")
        completions.append([{"role": "assistant", "content": rest.strip()}])
    return prompt, completions[0], completions[1]


def _shared_turns(record: Record) -> Pair:
    chosen, rejected = _field(record, "chosen", "assistant"), _field(record, "rejected", "assistant")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise _fail(record, "chosen and rejected are the same conversation: no preference to learn")
    while n and chosen[n - 1]["role"] == "assistant":  # a shared start of the answer is still the answer
        n -= 1
    shared = chosen[:n]
    prompt_field = record.data.get("prompt")
    if prompt_field is None:
        prompt = shared
    elif not shared:
        prompt = _field(record, "prompt", "user")
    elif isinstance(prompt_field, str):
        users = [str(m.get("content") or "").strip() for m in shared if m["role"] == "user"]
        if prompt_field.strip() not in users:
            raise _fail(record, "'prompt' is not one of the user turns that chosen and rejected share: which one "
                                "is the prompt is ambiguous", "drop 'prompt', or keep only the answers in "
                                                                "chosen/rejected")
        prompt = shared
    else:
        prompt = _field(record, "prompt", "user")
        if prompt != shared:
            raise _fail(record, "'prompt' differs from the turns that chosen and rejected share: which is the "
                                "prompt is ambiguous")
    if not prompt:
        raise _fail(record, "no prompt: neither a 'prompt' field nor turns that chosen and rejected share")
    return prompt, _completion(chosen[n:], record, "chosen"), _completion(rejected[n:], record, "rejected")


def _pairs(record: Record) -> list[Pair]:
    require_fields(record, {"chosen": (str, list), "rejected": (str, list)})
    chosen, rejected = record.data["chosen"], record.data["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        return [_shared_turns(record)]
    if record.data.get("prompt") is None:
        return [implicit_prompt(chosen, rejected, record)]
    return [(_field(record, "prompt", "user"), _field(record, "chosen", "assistant"),
             _field(record, "rejected", "assistant"))]


def _shp(record: Record) -> list[Pair]:
    require_fields(record, {"history": str, "human_ref_A": str, "human_ref_B": str, "labels": (int, bool)})
    label = record.data["labels"]
    if label not in (0, 1):
        raise _fail(record, f"SHP 'labels' is {label!r}, expected 1 (A preferred) or 0 (B preferred)")
    a, b = _field(record, "human_ref_A", "assistant"), _field(record, "human_ref_B", "assistant")
    prompt = _field(record, "history", "user")
    return [(prompt, a, b) if label == 1 else (prompt, b, a)]


def _ranked(record: Record, pairs: RankedPairs) -> list[Pair]:
    require_fields(record, {"prompt": (str, list), "responses": list})
    has = [k for k in ("scores", "ranks") if record.data.get(k) is not None]
    if len(has) != 1:
        raise _fail(record, "a ranked record needs 'scores' (higher is better) or 'ranks' (1 is best)"
                    + (", not both: which one orders the responses is ambiguous" if has else ""))
    values, responses = record.data[has[0]], record.data["responses"]
    if not isinstance(values, list) or len(values) != len(responses) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise _fail(record, f"'{has[0]}' must be {len(responses)} numbers, one per response")
    if len(responses) < 2:
        raise _fail(record, "a ranked record needs at least two responses")
    goodness = values if has[0] == "scores" else [-v for v in values]
    prompt = _field(record, "prompt", "user")
    completions = [check_messages(as_messages(r, "assistant", record, f"responses[{i}]"), record,
                                  need_assistant=False, field=f"responses[{i}]") for i, r in enumerate(responses)]
    if pairs == "best_worst":
        best = max(range(len(goodness)), key=lambda i: goodness[i])
        worst = min(range(len(goodness)), key=lambda i: goodness[i])
        if goodness[best] == goodness[worst]:
            raise _fail(record, f"every response has the same {has[0][:-1]}: no preference to learn")
        return [(prompt, completions[best], completions[worst])]
    ordered = [(i, j) if goodness[i] > goodness[j] else (j, i)
               for i, j in combinations(range(len(goodness)), 2) if goodness[i] != goodness[j]]
    if not ordered:
        raise _fail(record, f"every response has the same {has[0][:-1]}: no preference to learn")
    return [(prompt, completions[i], completions[j]) for i, j in ordered]


def preference_pairs(record: Record, ranked_pairs: RankedPairs = "best_worst") -> list[Pair]:
    """The (prompt, chosen, rejected) pairs of one record, in any of the preference formats."""
    if ranked_pairs not in ("best_worst", "all"):
        raise DataError(f"data.ranked_pairs={ranked_pairs!r} is not one of: best_worst, all")
    fmt = preference_format(record)
    pairs = _shp(record) if fmt == "shp" else _ranked(record, ranked_pairs) if fmt == "ranked" else _pairs(record)
    for _, chosen, rejected in pairs:
        if chosen == rejected:
            raise _fail(record, "chosen and rejected are the same completion: no preference to learn",
                        "drop the record, or give it two different completions")
    return pairs
