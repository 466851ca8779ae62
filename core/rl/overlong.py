"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), the built-in reward ``overlong``.

A completion cut at the length limit is punished by a reward, not only truncated, and softly: the penalty rises
linearly over the last ``cache`` tokens before ``max_length``, so the policy learns to stop before the cut rather
than being hit by a cliff. On the completion's token count |y| = ``len(completion_ids[i])``:

    0                                   if |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
    -1                                  if |y| > L_max

Written by hand: a three-line formula; TRL's ``trl.rewards.get_soft_overlong_punishment`` would make trl, optional
here, a dependency.
"""

from __future__ import annotations

from typing import Any, Mapping

from modalforge.errors import ModalforgeError


def overlong(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
             max_length: int | None = None, cache: int | None = None, **_: Any) -> list[float]:
    """The soft overlong penalty of each completion, from its token count (``completion_ids``, passed by the scorer)."""
    if completion_ids is None:
        raise ModalforgeError("reward overlong needs 'completion_ids' (the completions' tokens) among the fields")
    if max_length is None or cache is None:
        raise ModalforgeError("reward overlong needs 'max_length' and 'cache' (tokens)")
    soft = max_length - cache
    out = []
    for ids in completion_ids:
        length = len(ids)
        out.append(0.0 if length <= soft else (soft - length) / cache if length <= max_length else -1.0)
    return out


def overlong_options(options: Mapping[str, Any], max_completion_length: int | None, where: str) -> dict[str, Any]:
    """Check an ``overlong`` entry's options at load time; ``max_length`` defaults to the objective's limit if given."""
    unknown = sorted(set(options) - {"max_length", "cache"})
    if unknown:
        raise ModalforgeError(f"{where}: unknown option(s) {unknown} for reward overlong; valid: max_length, cache")
    max_length = options.get("max_length", max_completion_length)
    if max_length is None:
        raise ModalforgeError(f"{where}: reward overlong needs max_length (L_max, tokens), e.g. "
                              "{reward: overlong, max_length: 512, cache: 128}")
    if "cache" not in options:
        raise ModalforgeError(f"{where}: reward overlong needs cache (L_cache, tokens: the soft band before "
                              "max_length), e.g. {reward: overlong, max_length: 512, cache: 128}")
    max_length, cache = int(max_length), int(options["cache"])
    if not 0 < cache <= max_length:
        raise ModalforgeError(f"{where}: reward overlong needs 0 < cache <= max_length (got cache={cache}, "
                              f"max_length={max_length})")
    return {"max_length": max_length, "cache": cache}
