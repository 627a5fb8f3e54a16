"""A steady load of real clients for resilience tests and the chaos run.

`clients` threads send completions until stopped, every other one streaming. Each answer is
checked against the greedy completion, so a stream resumed on another replica after a kill
must continue exactly where it stopped. No client-side retries: every failure the server lets
through is counted. `resize` changes the client count. `pause_s` makes each client wait
between its requests (0: closed loop, as fast as the server answers).
"""
from __future__ import annotations

import json
import threading

import requests

DEFAULT_BODY = {"prompt": "Resilience", "max_tokens": 12, "temperature": 0}


class Load:
    """A steady load of client threads against a running server, each answer checked against
    the greedy completion; `resize` changes the number of clients."""

    def __init__(self, url: str, clients: int, body: dict | None = None,
                 timeout_s: float = 60.0, pause_s: float = 0.0) -> None:
        self.url, self.body, self.timeout_s = url, dict(body or DEFAULT_BODY), timeout_s
        self.pause_s = pause_s
        self.results: list[tuple[int, str]] = []
        self.threads: list[tuple[threading.Thread, threading.Event]] = []
        reference = requests.post(f"{url}/v1/completions", json=self.body, timeout=timeout_s)
        reference.raise_for_status()
        self.expected = reference.json()["choices"][0]["text"]
        self.resize(clients)

    def resize(self, clients: int) -> None:
        while len(self.threads) < clients:
            stop = threading.Event()
            stream = len(self.threads) % 2 == 1
            thread = threading.Thread(target=self._run, args=(stop, stream), daemon=True)
            self.threads.append((thread, stop))
            thread.start()
        while len(self.threads) > clients:
            thread, stop = self.threads.pop()
            stop.set()
            thread.join(timeout=self.timeout_s)

    def _run(self, stop: threading.Event, stream: bool) -> None:
        while not stop.is_set():
            try:
                self.results.append(self._stream() if stream else self._complete())
            except requests.RequestException as e:
                self.results.append((0, str(e)))
            except Exception as e:  # noqa: BLE001 - a malformed answer is a failure too
                # (a stream event that is not JSON, an answer without "choices"): it ended
                # the client's thread unseen, and the success rate counted on without it.
                self.results.append((-1, f"malformed answer: {type(e).__name__}: {e}"))
            stop.wait(self.pause_s)

    def _complete(self) -> tuple[int, str]:
        r = requests.post(f"{self.url}/v1/completions", json=self.body, timeout=self.timeout_s)
        if r.status_code == 200 and r.json()["choices"][0]["text"] != self.expected:
            return -1, f"wrong text {r.json()['choices'][0]['text']!r}"
        return r.status_code, r.text[:200]

    def _stream(self) -> tuple[int, str]:
        body = {**self.body, "stream": True, "stream_options": {"include_usage": True}}
        text, usage, done = "", None, False
        with requests.post(f"{self.url}/v1/completions", json=body, timeout=self.timeout_s,
                           stream=True) as r:
            if r.status_code != 200:
                return r.status_code, r.text[:200]
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return -1, str(event["error"])
                if event["choices"]:
                    text += event["choices"][0]["text"]
                usage = event.get("usage") or usage
        if not done or text != self.expected or \
                (usage or {}).get("completion_tokens") != self.body["max_tokens"]:
            return -1, f"broken stream: done={done} text={text!r} usage={usage}"
        return 200, "stream"

    def __enter__(self) -> "Load":
        return self

    def __exit__(self, *exc) -> None:
        self.resize(0)

    def failures(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200]
