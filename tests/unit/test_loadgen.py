"""orchestrator.serving.loadgen.Load against a fake server (requests.post patched): every
answer is counted, malformed ones as failures."""
import json
import time

import pytest

from orchestrator.serving import loadgen

TEXT = " and more"


class FakeAnswer:
    def __init__(self, body: dict | None = None, lines: list[bytes] = ()) -> None:
        self.status_code, self.body, self.lines = 200, body, lines
        self.text = json.dumps(body)

    def json(self):
        return self.body

    def raise_for_status(self) -> None:
        pass

    def iter_lines(self):
        return iter(self.lines)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_server(completion: dict, stream_lines: list[bytes]):
    def post(url, json, timeout, stream=False):
        return FakeAnswer(lines=stream_lines) if json.get("stream") else FakeAnswer(completion)
    return post


def wait_for_results(load: loadgen.Load, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(load.results) < count and time.monotonic() < deadline:
        time.sleep(0.01)


GOOD = {"choices": [{"text": TEXT}]}
GOOD_STREAM = [b'data: {"choices": [{"text": " and more"}]}',
               b'data: {"choices": [], "usage": {"completion_tokens": 12}}', b"data: [DONE]"]


def test_well_formed_answers_count_as_successes(monkeypatch):
    monkeypatch.setattr(loadgen.requests, "post", fake_server(GOOD, GOOD_STREAM))
    with loadgen.Load("http://fake", clients=2, pause_s=0.01) as load:
        wait_for_results(load, 20)
    assert len(load.results) >= 20 and load.failures() == []


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("completion, stream_lines", [
    (GOOD, [b"data: {not json"]),  # a stream event that is not JSON
    ({"choices": [{"text": TEXT}], "id": "x"}, GOOD_STREAM[:1] + [b'data: {"id": 1}']),
], ids=["stream-not-json", "stream-event-without-choices"])
def test_a_malformed_stream_event_is_a_failure_and_the_client_goes_on(
        monkeypatch, completion, stream_lines):
    # Such an answer raised out of the client's thread (only request errors were caught): the
    # client stopped unseen, and the success rate counted on without it.
    monkeypatch.setattr(loadgen.requests, "post", fake_server(completion, stream_lines))
    with loadgen.Load("http://fake", clients=2, pause_s=0.01) as load:
        wait_for_results(load, 20)
        time.sleep(0.05)
        streamed = len(load.failures())
        time.sleep(0.1)
        assert len(load.failures()) > streamed  # the streaming client still runs
    assert load.failures()[0][0] == -1 and "malformed answer" in load.failures()[0][1]


def test_a_completion_without_choices_is_a_failure(monkeypatch):
    answers = iter([GOOD])  # the reference answer, then broken ones

    def post(url, json, timeout, stream=False):
        return FakeAnswer(next(answers, {"error": "oops"}), GOOD_STREAM)
    monkeypatch.setattr(loadgen.requests, "post", post)
    with loadgen.Load("http://fake", clients=1, pause_s=0.01) as load:
        wait_for_results(load, 5)
    assert len(load.results) >= 5
    assert all(code == -1 and "KeyError" in text for code, text in load.failures())
