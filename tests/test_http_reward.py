"""http(s):// rewards against a real local server: both forms, batching, retries, timeouts, refusals, failure policy."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest
import torch

from modalforge.errors import ModalforgeError
from modalforge.rl.http_reward import HttpReward
from modalforge.rl.rewards import load_rewards, score


class Server:
    """A ThreadingHTTPServer on 127.0.0.1:0 whose POST answer is ``handle(body, headers, n) -> (status, reply)``."""

    def __init__(self, handle: Callable[[dict, dict, int], tuple[int, object]]) -> None:
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.bodies.append(body)
                    n = len(outer.bodies)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, reply = handle(body, dict(self.headers), n)
                finally:
                    with lock:
                        outer.in_flight -= 1
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def by_length(body, headers, n):
    return 200, {"rewards": [float(len(c)) for c in body["completions"]]}


PROMPTS, COMPLETIONS = ["p0", "p1", "p2", "p3", "p4"], ["a", "bb", "ccc", "dddd", "eeeee"]
WHERE = [f"f, line {i + 1}" for i in range(5)]


def test_json_form_returns_the_servers_scores_with_the_fields():
    with Server(by_length) as server:
        reward = HttpReward(server.url)
        assert reward(PROMPTS, COMPLETIONS, answer=list("12345")) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert reward([], []) == []
    assert len(server.bodies) == 1
    assert server.bodies[0] == {"prompts": PROMPTS, "completions": COMPLETIONS, "answer": list("12345")}


def test_json_form_batches_and_keeps_order_and_nulls():
    def handle(body, headers, n):
        return 200, {"rewards": [None if c == "ccc" else float(len(c)) for c in body["completions"]]}

    with Server(handle) as server:
        reward = HttpReward(server.url, batch_size=2)
        assert reward(PROMPTS, COMPLETIONS, answer=list("12345")) == [1.0, 2.0, None, 4.0, 5.0]
    sent = sorted(server.bodies, key=lambda b: b["prompts"][0])
    assert [b["completions"] for b in sent] == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]
    assert [b["answer"] for b in sent] == [["1", "2"], ["3", "4"], ["5"]]


def test_500_twice_then_200_is_retried():
    def handle(body, headers, n):
        return (500, {"error": "busy"}) if n <= 2 else by_length(body, headers, n)

    with Server(handle) as server:
        reward = HttpReward(server.url, retries=2, backoff=0.01, on_failure="error")
        assert reward(PROMPTS[:2], COMPLETIONS[:2]) == [1.0, 2.0]
    assert len(server.bodies) == 3


def test_500_beyond_the_retries_fails_and_4xx_is_not_retried(caplog):
    with Server(lambda body, headers, n: (503, {})) as server:
        with caplog.at_level(logging.WARNING, logger="modalforge.rl.http_reward"):
            assert HttpReward(server.url, retries=1, backoff=0.01)(PROMPTS[:2], COMPLETIONS[:2]) == [None, None]
        assert len(server.bodies) == 2
        assert any("failed for 2 of 2 completions: HTTP 503 (2 attempts); they score None" in r.getMessage() for r in caplog.records)
    with Server(lambda body, headers, n: (400, {"error": "bad field"})) as server:
        with pytest.raises(ModalforgeError, match="HTTP 400"):
            HttpReward(server.url, retries=3, backoff=0.01, on_failure="error")(PROMPTS[:2], COMPLETIONS[:2])
        assert len(server.bodies) == 1


def test_a_server_past_the_timeout_neither_hangs_nor_passes(caplog):
    def slow(body, headers, n):
        time.sleep(1.5)
        return by_length(body, headers, n)

    with Server(slow) as server:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="modalforge.rl.http_reward"):
            got = HttpReward(server.url, timeout=0.3, retries=1, backoff=0.01, batch_size=2)(PROMPTS, COMPLETIONS)
        assert got == [None] * 5
        warnings = [r.getMessage() for r in caplog.records if r.name == "modalforge.rl.http_reward"]
        assert len(warnings) == 1 and "failed for 5 of 5" in warnings[0] and "timed out after 0.3 s" in warnings[0]
        neutral = time.monotonic() - start

        judge = load_rewards([{"reward": server.url, "name": "judge", "timeout": 0.3, "retries": 1, "backoff": 0.01,
                               "on_failure": "error"}])
        start = time.monotonic()
        with pytest.raises(ModalforgeError) as err:
            score(judge, PROMPTS[:2], COMPLETIONS[:2], {}, WHERE[:2])
        error = time.monotonic() - start
    message = str(err.value)
    assert "reward 'judge'" in message and server.url in message and "timed out after 0.3 s (2 attempts)" in message
    assert "records f, line 1 ... f, line 2" in message and "\n" not in message
    # bounded by timeout x attempts (+ backoff and slack), far below the server's 1.5 s x 2 attempts
    assert neutral < 2.5 and error < 2.5


def test_a_refused_connection():
    with socket.socket() as s:  # a port that was free a moment ago and has nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    assert HttpReward(url, retries=1, backoff=0.01)(PROMPTS[:2], COMPLETIONS[:2]) == [None, None]
    with pytest.raises(ModalforgeError, match=f"POST {url} failed for 2 of 2 completions: connection refused"):
        HttpReward(url, retries=1, backoff=0.01, on_failure="error")(PROMPTS[:2], COMPLETIONS[:2])


def test_a_wrong_length_reply_is_an_error_naming_the_reward_even_when_neutral():
    with Server(lambda body, headers, n: (200, {"rewards": [1.0]})) as server:
        rewards = load_rewards([{"reward": server.url, "name": "rm"}])
        with pytest.raises(ModalforgeError, match=r"reward 'rm': .* answered 1 rewards for 2 completions"):
            score(rewards, PROMPTS[:2], COMPLETIONS[:2], {}, WHERE[:2])
    with Server(lambda body, headers, n: (200, {"scores": [1.0, 2.0]})) as server:
        with pytest.raises(ModalforgeError, match="without a 'rewards' list"):
            HttpReward(server.url, name="rm")(PROMPTS[:2], COMPLETIONS[:2])


def test_openai_form_with_bearer_token_and_concurrent_requests(monkeypatch):
    monkeypatch.setenv("JUDGE_TOKEN", "sekret")
    seen_auth = []

    def chat(body, headers, n):
        seen_auth.append(headers.get("Authorization"))
        assert body["model"] == "judge-1" and len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        content = body["messages"][0]["content"]
        time.sleep(0.3)
        completion = content.split("A: ")[1]
        reply = "I cannot judge" if completion == "ccc" else f"Score: {len(completion)}.5 out of 10, maybe 3"
        return 200, {"choices": [{"message": {"role": "assistant", "content": reply}}]}

    with Server(chat) as server:
        reward = HttpReward(server.url, format="openai", model="judge-1", api_key_env="JUDGE_TOKEN",
                            template="Q: {prompt} (answer {answer}) A: {completion}", concurrency=4)
        got = reward(PROMPTS, COMPLETIONS, answer=list("12345"))
    assert got == [1.5, 2.5, None, 4.5, 5.5]  # the first number of each reply; no number: a failure, None
    assert seen_auth == ["Bearer sekret"] * 5
    assert sorted(b["messages"][0]["content"] for b in server.bodies)[0] == "Q: p0 (answer 1) A: a"
    assert 1 < server.max_in_flight <= 4
    monkeypatch.delenv("JUDGE_TOKEN")
    with pytest.raises(ModalforgeError, match="api_key_env='JUDGE_TOKEN'.*unset"):
        reward(PROMPTS, COMPLETIONS, answer=list("12345"))


def test_load_rewards_builds_it_from_a_mapping_and_rejects_unknown_options():
    with Server(by_length) as server:
        rewards = load_rewards(["digits", {"reward": server.url, "weight": 0.5, "timeout": 5, "batch_size": 2}])
        assert [r.name for r in rewards] == ["digits", server.url.split("://")[1]]
        assert isinstance(rewards[1].fn, HttpReward) and rewards[1].fn.batch_size == 2 and rewards[1].weight == 0.5
        assert rewards[1].fn.on_failure == "neutral" and rewards[1].kwargs == {}
        per = score(rewards, PROMPTS[:2], ["1a", "bb"], {}, WHERE[:2])
    torch.testing.assert_close(per, torch.tensor([[0.5, 2.0], [0.0, 2.0]]))
    with pytest.raises(ModalforgeError, match=r"objective.rewards\[0\]: unknown option\(s\) \['timeut'\].*valid: format, "
                                              r"timeout, retries"):
        load_rewards([{"reward": "https://judge.example/v1/chat/completions", "timeut": 3}])
    with pytest.raises(ModalforgeError, match="format=openai needs 'model'"):
        load_rewards([{"reward": "https://judge.example/v1/chat/completions", "format": "openai"}])
    with pytest.raises(ModalforgeError, match="on_failure='skip'"):
        load_rewards([{"reward": "http://127.0.0.1:1/score", "on_failure": "skip"}])
