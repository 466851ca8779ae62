"""A reward served over HTTP: ``objective.rewards=[{reward: "http://host:port/score", ...}]``.

Two forms (``format``):
- ``json`` (default): POST ``{"prompts": [...], "completions": [...], <fields>}`` in batches of ``batch_size``,
  answered by ``{"rewards": [float | null, ...]}`` with one value per completion of the batch;
- ``openai``: an OpenAI-compatible chat-completions judge, one request per completion with ``template`` filled
  with the prompt and completion (and any record field); the first number of the reply is the score.

Requests run concurrently (``concurrency``), each with a ``timeout``; connection errors, timeouts, 429 and 5xx are
retried ``retries`` times with exponential backoff, other 4xx are not (the request itself is wrong). After the last
try, ``on_failure: neutral`` (default) scores the failed completions ``None`` ("does not apply") and warns once per
call: a judge that flakes once in a long run must not kill it. ``on_failure: error`` stops with one line.

Written by hand on the standard library (``urllib``, ``concurrent.futures``): the project depends on no HTTP
client, and retry/backoff/failure policy is ours to state either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import string
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from modalforge.errors import ModalforgeError

log = logging.getLogger(__name__)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
DEFAULT_TEMPLATE = ("Rate how well the response answers the prompt, from 0 (useless) to 10 (perfect). "
                    "Reply with the number only.\n\nPrompt:\n{prompt}\n\nResponse:\n{completion}\n\nScore:")
OPTIONS = ("format", "timeout", "retries", "backoff", "concurrency", "batch_size", "on_failure", "model",
           "template", "api_key_env")


class RewardRequestError(ModalforgeError):
    """A reward's requests failed for good; ``failed`` are the completions' indices, so ``score`` names the records."""

    def __init__(self, message: str, failed: Sequence[int]) -> None:
        super().__init__(message)
        self.failed = list(failed)


class _Failure(Exception):
    """One request's last failure, said in words: ``HTTP 503``, ``timed out after 2 s``, ``connection refused``."""


def _text(value: Any) -> str:
    """A prompt or completion as text: messages (``[{"role", "content"}]``) are joined by newlines."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content") or "") for m in value if isinstance(m, dict))
    return str(value)


class HttpReward:
    """Scores completions by POSTing them to ``url``; see the module docstring for the forms and failure policy."""

    def __init__(self, url: str, name: str | None = None, format: str = "json", timeout: float = 30.0,
                 retries: int = 2, backoff: float = 0.5, concurrency: int = 8, batch_size: int | None = None,
                 on_failure: str = "neutral", model: str | None = None, template: str | None = None,
                 api_key_env: str | None = None) -> None:
        self.url, self.name = url, name or url.split("://", 1)[-1]
        where = f"reward {self.name!r}"
        if format not in ("json", "openai"):
            raise ModalforgeError(f"{where}: format={format!r}; expected 'json' or 'openai'")
        if on_failure not in ("neutral", "error"):
            raise ModalforgeError(f"{where}: on_failure={on_failure!r}; expected 'neutral' or 'error'")
        if not float(timeout) > 0 or int(retries) < 0 or float(backoff) < 0 or int(concurrency) < 1 \
                or (batch_size is not None and int(batch_size) < 1):
            raise ModalforgeError(f"{where}: needs timeout > 0, retries >= 0, backoff >= 0, concurrency >= 1 and "
                                  f"batch_size >= 1 (got {timeout}, {retries}, {backoff}, {concurrency}, {batch_size})")
        if format == "openai" and not model:
            raise ModalforgeError(f"{where}: format=openai needs 'model' (the judge's model name on the server)")
        if format == "json" and (model or template):
            raise ModalforgeError(f"{where}: 'model' and 'template' are options of format=openai only")
        self.template = template or DEFAULT_TEMPLATE
        try:
            self.placeholders = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as err:
            raise ModalforgeError(f"{where}: template does not parse: {err}") from None
        if "completion" not in self.placeholders:
            raise ModalforgeError(f"{where}: template must contain {{completion}}")
        self.format, self.on_failure, self.model = format, on_failure, model
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency, self.batch_size = int(concurrency), None if batch_size is None else int(batch_size)
        self.api_key_env = api_key_env

    @classmethod
    def from_options(cls, url: str, options: Mapping[str, Any], name: str | None, where: str) -> "HttpReward":
        """Build from an ``objective.rewards`` entry's options; an unknown option is an error listing the valid ones."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ModalforgeError(f"{where}: unknown option(s) {unknown} for an http(s) reward; valid: "
                                  f"{', '.join(OPTIONS)} (and reward, name, weight)")
        return cls(url, name=name, **options)

    # ---- one request ---------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            token = os.environ.get(self.api_key_env)
            if not token:
                raise ModalforgeError(f"reward {self.name!r}: api_key_env={self.api_key_env!r} but that environment "
                                      "variable is unset or empty")
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _post(self, body: dict[str, Any], headers: dict[str, str]) -> Any:
        """POST ``body`` and return the decoded JSON reply, retrying what may pass; raises ``_Failure`` at the end."""
        data = json.dumps(body, default=str).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                failure = f"HTTP {err.code}"
                if 400 <= err.code < 500 and err.code != 429:
                    detail = err.read(200).decode(errors="replace").strip().splitlines()
                    raise _Failure(failure + (f" ({detail[0]})" if detail else "")) from None
            except (TimeoutError, socket.timeout):
                failure = f"timed out after {self.timeout:g} s"
            except urllib.error.URLError as err:
                reason = err.reason
                failure = f"timed out after {self.timeout:g} s" if isinstance(reason, (TimeoutError, socket.timeout)) \
                    else "connection refused" if isinstance(reason, ConnectionRefusedError) \
                    else f"{type(reason).__name__}: {reason}"
            except (ConnectionError, OSError) as err:  # reset mid-reply, remote closed...
                failure = f"{type(err).__name__}: {err}"
            else:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise _Failure(f"reply is not JSON: {raw[:80]!r}") from None
        raise _Failure(f"{failure} ({self.retries + 1} attempt{'s' if self.retries else ''})")

    # ---- the two forms -------------------------------------------------------------------
    def _json_batch(self, start: int, stop: int, prompts: list[Any], completions: list[Any],
                    fields: Mapping[str, list], headers: dict[str, str]) -> list[Any]:
        body = {"prompts": prompts[start:stop], "completions": completions[start:stop],
                **{k: v[start:stop] for k, v in fields.items()}}
        reply = self._post(body, headers)
        values = reply.get("rewards") if isinstance(reply, dict) else None
        if not isinstance(values, list) or len(values) != stop - start:
            got = f"{len(values)} rewards" if isinstance(values, list) else f"{type(reply).__name__} without a 'rewards' list"
            # a server that answers the wrong shape is broken, not flaky: an error whatever on_failure says
            raise ModalforgeError(f"reward {self.name!r}: {self.url} answered {got} for {stop - start} completions; "
                                  'expected {"rewards": [float | null, ...]} with one value per completion')
        return values

    def _judge(self, i: int, prompts: list[Any], completions: list[Any], fields: Mapping[str, list],
               headers: dict[str, str]) -> float:
        values = {k: v[i] for k, v in fields.items() if k in self.placeholders}
        missing = self.placeholders - {"prompt", "completion"} - set(values)
        if missing:
            raise ModalforgeError(f"reward {self.name!r}: template names {sorted(missing)}, which the records lack")
        content = self.template.format(**values, prompt=_text(prompts[i]), completion=_text(completions[i]))
        body = {"model": self.model, "messages": [{"role": "user", "content": content}]}
        reply = self._post(body, headers)
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Failure(f"reply has no choices[0].message.content: {str(reply)[:80]}") from None
        found = NUMBER.search(str(text or ""))
        if not found:
            raise _Failure(f"no number in the judge's reply {str(text)[:60]!r}")
        return float(found.group())

    def __call__(self, prompts: list[Any], completions: list[Any], **fields: Any) -> list[float | None]:
        headers = self._headers()
        n = len(completions)
        if self.format == "json":
            size = self.batch_size or max(n, 1)
            spans = [(s, min(s + size, n)) for s in range(0, n, size)]
            calls: list[Callable[[], Any]] = [
                lambda s=s, e=e: self._json_batch(s, e, prompts, completions, fields, headers) for s, e in spans]
        else:
            spans = [(i, i + 1) for i in range(n)]
            calls = [lambda i=i: [self._judge(i, prompts, completions, fields, headers)] for i in range(n)]

        def attempt(call: Callable[[], Any]) -> Any:
            try:
                return call()
            except _Failure as failure:
                return failure

        if len(calls) <= 1:
            results = [attempt(call) for call in calls]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(calls))) as pool:
                results = list(pool.map(attempt, calls))
        scores: list[float | None] = [None] * n
        failed: list[int] = []
        reasons: dict[str, int] = {}
        for (start, stop), result in zip(spans, results):
            if isinstance(result, _Failure):
                failed.extend(range(start, stop))
                reasons[str(result)] = reasons.get(str(result), 0) + 1
            else:
                scores[start:stop] = result
        if failed:
            why = "; ".join(f"{r}" + (f" x{c}" if c > 1 else "") for r, c in reasons.items())
            if self.on_failure == "error":
                raise RewardRequestError(f"reward {self.name!r}: POST {self.url} failed for {len(failed)} of {n} "
                                         f"completions: {why}", failed)
            log.warning("reward %r: POST %s failed for %d of %d completions: %s; they score None (on_failure=neutral)",
                        self.name, self.url, len(failed), n, why)
        return scores
